#!/usr/bin/env python3
"""Build the container image with podman and run it the way a cluster would, then check that it serves.

Steps:
  1. the base image `debian:bookworm-slim`: used as it is when podman has it, otherwise bootstrapped here with
     debootstrap (Debian 12, minbase, the same apt sources and dpkg exclusions as the official slim image) and
     imported under that name, so the Dockerfile builds without a registry (--pull-base pulls it instead);
  2. `podman build` of the Dockerfile (Docker format, so HEALTHCHECK is kept); RUN steps that reach PyPI see
     this machine's CA bundle and a pip.conf naming it, mounted read-only for the build only;
  3. `podman run` as a cluster would: read-only root filesystem with only /tmp writable, the image's non-root
     user, every capability dropped, no new privileges, host network with a real redis-server on the host;
  4. checks: ready without downloading anything, an inference answers, the repeat is an `X-Cache: HIT` whose
     entry is in Redis, /metrics answers, the request's trace reaches an OTLP/HTTP collector on the host (spans
     leave through the export process, `python -m inference.telemetry.export`, inside the container), and SIGTERM stops
     the container cleanly well before a grace period.
     With --upstream, the upstream-only image (build argument BACKEND=openai) is built too and run as a gateway
     in front of the first container.

Prints the build time and the image size; exits non-zero on the first failed check. Needs root, podman,
debootstrap (only when the base is missing) and redis-server.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = "docker.io/library/debian:bookworm-slim"
# podman cannot raise rlimits in some sandboxes (ours): every build and run pins them to what is allowed.
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
CPU_LIMIT = 1.5  # the serving container's --cpus
# crun refuses hosts whose cgroups are in hybrid mode (v1 controllers plus an empty v2 tree, as here); runc
# runs there, and everywhere else too. PODMAN_RUNTIME overrides ("" = podman's own default).
RUNTIME = os.environ.get("PODMAN_RUNTIME", "runc" if shutil.which("runc") else "")
GRACE_SECONDS = 30  # Kubernetes' default terminationGracePeriodSeconds; a clean stop must come well before it
DEBIAN_SOURCES = """\
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
# As in the official slim images: no documentation, man pages or translations from later installs.
DPKG_EXCLUDES = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
"""


# As in the official images: apt removes the packages it downloaded once they are installed.
APT_CLEAN = """\
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::Languages "none";
"""


class CheckFailed(RuntimeError):
    pass


def say(message: str) -> None:
    print(f"[image-test] {message}", file=sys.stderr, flush=True)


def run(*command: str, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("check", True)
    if command[0] == "podman" and RUNTIME:
        command = ("podman", "--runtime", RUNTIME, *command[1:])
    return subprocess.run(command, **kwargs)


def output(*command: str) -> str:
    return run(*command, capture_output=True, text=True).stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_base(mirror: str, pull: bool) -> None:
    if run("podman", "image", "exists", BASE_IMAGE, check=False).returncode == 0:
        say(f"base image {BASE_IMAGE} present")
        return
    if pull:
        say(f"pulling {BASE_IMAGE}")
        run("podman", "pull", BASE_IMAGE, stdout=subprocess.DEVNULL)
        return
    if shutil.which("debootstrap") is None:
        raise CheckFailed(f"{BASE_IMAGE} is missing and debootstrap is not installed (apt-get install debootstrap)")
    say(f"bootstrapping {BASE_IMAGE} with debootstrap (Debian 12 minbase, about a minute)")
    with tempfile.TemporaryDirectory(prefix="debian-rootfs-", dir="/var/tmp") as rootfs:
        run("debootstrap", "--variant=minbase", "bookworm", rootfs, mirror, stdout=subprocess.DEVNULL)
        root = Path(rootfs)
        (root / "etc/apt/sources.list").unlink(missing_ok=True)
        (root / "etc/apt/sources.list.d/debian.sources").write_text(DEBIAN_SOURCES)
        (root / "etc/dpkg/dpkg.cfg.d/docker").write_text(DPKG_EXCLUDES)
        (root / "etc/apt/apt.conf.d/docker-clean").write_text(APT_CLEAN)
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (root / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        tar = subprocess.Popen(["tar", "-C", rootfs, "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        run("podman", "import", "--change", 'CMD ["bash"]', "-", BASE_IMAGE, stdin=tar.stdout,
            stdout=subprocess.DEVNULL)
        if tar.wait() != 0:
            raise CheckFailed("tar of the bootstrapped root filesystem failed")
    say(f"imported {BASE_IMAGE}")


def host_ca_bundle() -> Path | None:
    """The CA bundle pip uses here (a proxy's CA may be in it), for the build's RUN steps only."""
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def build(tag: str, *, backend: str, workdir: Path) -> float:
    command = ["podman", "build", "--format", "docker", "--pull=never", *ULIMITS, "--build-arg", f"BACKEND={backend}",
               "--tag", tag]
    bundle = host_ca_bundle()
    if bundle is not None:
        ca_dir = workdir / "host-ca"
        ca_dir.mkdir(exist_ok=True)
        shutil.copy(bundle, ca_dir / "ca-certificates.crt")
        pip_conf = workdir / "pip.conf"
        pip_conf.write_text("[global]\ncert = /run/host-ca/ca-certificates.crt\n")
        command += ["--volume", f"{ca_dir}:/run/host-ca:ro", "--volume", f"{pip_conf}:/etc/pip.conf:ro"]
    say(f"building {tag} (BACKEND={backend})")
    started = time.monotonic()
    run(*command, str(ROOT))
    return time.monotonic() - started


def image_size(tag: str) -> int:
    return int(output("podman", "image", "inspect", "--format", "{{.Size}}", tag))


def start_redis(port: int, workdir: Path) -> subprocess.Popen:
    server = shutil.which("redis-server")
    if server is None:
        raise CheckFailed("redis-server is not installed (apt-get install redis-server)")
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise CheckFailed("redis-server did not start")


def redis_keys(port: int, pattern: str) -> list[str]:
    found = output("redis-cli", "-p", str(port), "--scan", "--pattern", pattern)
    return found.split() if found else []


def start_container(tag: str, name: str, env: dict[str, str], cpus: float | None = None) -> None:
    command = ["podman", "run", "--detach", "--name", name, *ULIMITS, "--network", "host",
               *(["--cpus", str(cpus)] if cpus else []),
               "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp:rw,size=64m",
               "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
    for key, value in env.items():
        command += ["--env", f"{key}={value}"]
    run(*command, tag, stdout=subprocess.DEVNULL)


def logs(name: str) -> str:
    return run("podman", "logs", name, capture_output=True, text=True, check=False).stderr


def http(method: str, url: str, body: dict | None = None, timeout: float = 60,
         headers: dict[str, str] | None = None) -> tuple[int, Message, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def wait_ready(url: str, name: str, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        state = output("podman", "inspect", "--format", "{{.State.Status}}", name)
        if state != "running":
            raise CheckFailed(f"container {name} is {state} before becoming ready:\n{logs(name)}")
        try:
            if http("GET", f"{url}/ready", timeout=2)[0] == 200:
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.25)
    raise CheckFailed(f"{name} not ready after {timeout:.0f} s:\n{logs(name)}")


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)
    say(f"ok: {message}")


def stop_cleanly(name: str) -> tuple[float, int]:
    started = time.monotonic()
    run("podman", "kill", "--signal", "TERM", name, stdout=subprocess.DEVNULL)
    code = int(output("podman", "wait", name))
    return time.monotonic() - started, code


class Collector:
    """An OTLP/HTTP trace collector on the host: the names of the spans it receives, by trace id."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        spans = self.spans = {}

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                request = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["Content-Length"])))
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        for span in scope.spans:
                            spans.setdefault(span.trace_id.hex(), []).append(span.name)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, trace_id: str, names: set[str], timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not names <= set(self.spans.get(trace_id, ())):
            time.sleep(0.1)
        return self.spans.get(trace_id, [])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def check_serving_image(tag: str, redis_port: int, name: str, collector: Collector) -> str:
    """Run the embedded-model image against Redis, tracing to `collector`; returns its URL (the container keeps
    running)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # An index nobody listens on: a download attempt would fail at once rather than pass unnoticed.
    # A CPU limit below the host's cores, as `docker run --cpus` or a Kubernetes limit sets it: llama.cpp must get
    # the threads the quota allows, not one per host core.
    start_container(tag, name, {"PORT": str(port), "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                                "RATE_LIMIT_PER_MINUTE": "600", "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
                                "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "200"},
                    cpus=CPU_LIMIT)
    ready = wait_ready(url, name, timeout=180)
    say(f"ready in {ready:.1f} s")
    log = logs(name)
    check("fetching the default model" not in log, "ready without downloading anything")
    threads = max(1, min(int(CPU_LIMIT), os.cpu_count() or 1))
    check(f"N_THREADS=0 -> {threads}: " in log,
          f"with --cpus {CPU_LIMIT} llama.cpp gets {threads} thread(s), from the cgroup quota")
    user = output("podman", "image", "inspect", "--format", "{{.Config.User}}", tag)
    check(user.isdigit() and user != "0", f"runs as a numeric non-root user ({user})")
    health = output("podman", "image", "inspect", "--format", "{{json .Config.Healthcheck}}", tag)
    check("inference" in health, f"HEALTHCHECK kept in the image ({health})")

    body = {"prompt": "What is 2+2?", "temperature": 0, "max_tokens": 24}
    status, headers, raw = http("POST", f"{url}/api/v1/infer", body)
    answer = json.loads(raw)
    check(status == 200 and answer.get("output") and answer.get("completion_tokens", 0) > 0,
          f"an inference answers ({status}: {answer.get('output', raw[:200])!r})")
    check(headers.get("X-Cache") == "MISS", f"the first answer is a cache MISS ({headers.get('X-Cache')})")
    check(bool(redis_keys(redis_port, "inference:cache:*")), "the answer is stored in Redis")
    status, headers, again = http("POST", f"{url}/api/v1/infer", body)
    check(status == 200 and headers.get("X-Cache") == "HIT" and again == raw,
          f"the repeat is an X-Cache: HIT, byte for byte ({headers.get('X-Cache')})")
    check(bool(redis_keys(redis_port, "inference:rl:*")), "the rate limiter counts in Redis")
    status, _, metrics = http("GET", f"{url}/metrics")
    check(status == 200 and b'inference_cache_requests_total{result="hit"} 1.0' in metrics,
          "/metrics answers and counts the hit")
    trace_id = os.urandom(16).hex()
    status, _, _ = http("POST", f"{url}/api/v1/infer", body,
                        headers={"traceparent": f"00-{trace_id}-{os.urandom(8).hex()}-01"})
    names = collector.wait_for(trace_id, {"POST /api/v1/infer", "rate_limit", "cache lookup"}, timeout=30)
    check(status == 200 and {"POST /api/v1/infer", "rate_limit", "cache lookup"} <= set(names),
          f"the request's trace reaches the collector from the export process in the container ({sorted(names)})")
    check_engine_restart(url, name, body)
    return url


# Run inside the container: SIGSEGV to the engine process (the service's child running llama.cpp).
KILL_ENGINE = ("import os, signal\n"
               "pids = [int(p) for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid() and "
               "b'inference.engine.llama.worker' in open(f'/proc/{p}/cmdline', 'rb').read()]\n"
               "assert len(pids) == 1, pids\n"
               "os.kill(pids[0], signal.SIGSEGV)\n"
               "print(pids[0])\n")


def check_engine_restart(url: str, name: str, body: dict) -> None:
    """A native crash of the engine process inside the read-only, non-root container: the service stays up,
    restarts the engine, and answers again."""
    pid = output("podman", "exec", name, "python", "-c", KILL_ENGINE)
    started = time.monotonic()
    while http("GET", f"{url}/ready", timeout=2)[0] != 200:
        if time.monotonic() - started > 60:
            raise CheckFailed(f"not ready again 60 s after the engine process died:\n{logs(name)}")
        time.sleep(0.05)
    back = time.monotonic() - started
    status, _, raw = http("POST", f"{url}/api/v1/infer", {**body, "prompt": "Name a colour."})
    check(status == 200 and json.loads(raw).get("completion_tokens", 0) > 0,
          f"after SIGSEGV to the engine process ({pid}) the service is ready again in {back:.1f} s and answers")
    _, _, metrics = http("GET", f"{url}/metrics")
    check(b'inference_engine_restarts_total{cause="SIGSEGV"} 1.0' in metrics and "died of SIGSEGV" in logs(name),
          "the restart is counted by cause and logged")


def check_gateway_image(tag: str, upstream_url: str, redis_port: int, name: str) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    start_container(tag, name, {"PORT": str(port), "UPSTREAM_URL": f"{upstream_url}/v1",
                                "REDIS_URL": f"redis://127.0.0.1:{redis_port}/1", "RATE_LIMIT_PER_MINUTE": "600"})
    wait_ready(url, name, timeout=60)
    status, headers, raw = http("POST", f"{url}/api/v1/infer", {"prompt": "Name a colour.", "temperature": 0,
                                                                 "max_tokens": 8})
    check(status == 200 and json.loads(raw)["completion_tokens"] > 0,
          f"the upstream-only image answers through the embedded one ({status})")
    info = json.loads(http("GET", f"{url}/api/v1/model")[2])
    check(str(info.get("backend")).startswith("openai"), f"the upstream-only image serves with MODEL_BACKEND=openai ({info.get('backend')})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default="localhost/inference:test", help="image tag to build (default: %(default)s)")
    parser.add_argument("--upstream", action="store_true", help="also build and run the upstream-only image")
    parser.add_argument("--mirror", default="http://deb.debian.org/debian", help="Debian mirror for debootstrap")
    parser.add_argument("--pull-base", action="store_true",
                        help="pull the base image from its registry instead of bootstrapping it (where one is reachable)")
    parser.add_argument("--keep", action="store_true", help="keep the images afterwards (they are kept by default "
                        "anyway; this only skips removing the containers on failure, for inspection)")
    args = parser.parse_args()

    for tool in ("podman", "redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            print(f"image test: {tool} is not installed", file=sys.stderr)
            return 2
    suffix = os.getpid()
    names = [f"inference-test-{suffix}", f"inference-gateway-test-{suffix}"]
    report: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="image-test-") as tmp:
        workdir = Path(tmp)
        redis = collector = None
        try:
            ensure_base(args.mirror, args.pull_base)
            seconds = build(args.tag, backend="llama", workdir=workdir)
            report["image"] = {"tag": args.tag, "build_seconds": round(seconds, 1), "size_mb": image_size(args.tag) / 1e6}
            gateway_tag = args.tag.rsplit(":", 1)[0] + "-upstream:" + args.tag.rsplit(":", 1)[1]
            if args.upstream:
                seconds = build(gateway_tag, backend="openai", workdir=workdir)
                report["upstream_image"] = {"tag": gateway_tag, "build_seconds": round(seconds, 1),
                                            "size_mb": image_size(gateway_tag) / 1e6}
            redis_port = free_port()
            redis = start_redis(redis_port, workdir)
            collector = Collector()
            url = check_serving_image(args.tag, redis_port, names[0], collector)
            if args.upstream:
                check_gateway_image(gateway_tag, url, redis_port, names[1])
                elapsed, code = stop_cleanly(names[1])
                check(code in (0, 143) and elapsed < GRACE_SECONDS / 3,
                      f"the gateway stops on SIGTERM in {elapsed:.1f} s with exit code {code}")
            elapsed, code = stop_cleanly(names[0])
            check(code in (0, 143) and elapsed < GRACE_SECONDS / 3,
                  f"SIGTERM stops the container in {elapsed:.1f} s with exit code {code}")
            report["stop_seconds"] = round(elapsed, 1)
            check("Traceback" not in logs(names[0]), "no traceback in the container's log")
        except (CheckFailed, subprocess.CalledProcessError) as exc:
            print(f"image test FAILED: {exc}", file=sys.stderr)
            return 1
        finally:
            if collector is not None:
                collector.close()
            if redis is not None:
                redis.terminate()
                redis.wait()
            if not args.keep:
                for name in names:
                    run("podman", "rm", "--force", "--ignore", name, check=False, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
    for key in ("image", "upstream_image"):
        if key in report:
            image = report[key]
            print(f"{image['tag']}: {image['size_mb']:.0f} MB, built in {image['build_seconds']:.0f} s")
    print(f"image test passed; SIGTERM to exit in {report['stop_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
