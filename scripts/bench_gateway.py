#!/usr/bin/env python3
"""What the gateway (MODEL_BACKEND=openai) costs, measured with wrk (Debian package `wrk`) on this machine.

    python scripts/bench_gateway.py [--seconds 10] [--connections 32]
    python scripts/bench_gateway.py --compare [--baseline DIR] [--litellm EXE] [--rounds 5] [--json F]

1. Request rate and added latency: a fixed-answer upstream (scripts/fixed_upstream.py) measured directly and
   through the gateway, non-streaming chat completions: p50 at one connection, requests/s at --connections.
2. Streaming, read directly and through the gateway, interleaved: time to first token and streamed tokens/s
   (a) from the fixed-answer upstream pacing its 200 tokens (--token-delay-ms): the gateway's own cost;
   (b) from this service with the embedded model, the same seeded request: the real thing, noisier, since
       the model and the gateway share the machine's two cores.

With --compare, instead: requests/s at --connections on two paths, proxied (to the fixed-answer upstream) and cache
hits (the same greedy request again), for this checkout's gateway and, in the same run and interleaved round by
round, for --baseline (another checkout of this repository, e.g. `git worktree add /tmp/before c60cf06`, run with
this interpreter) and --litellm (LiteLLM's proxy executable, e.g. from `pip install 'litellm[proxy]'` in a
virtualenv of its own; its in-memory cache for the cache path); medians of --rounds and the ratios between them.

Everything runs on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHAT_BODY = {"model": "fixed-answer", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 20}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} not ready after {timeout}s")


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def serve(port: int, **env: str) -> subprocess.Popen:
    return start(["-m", "inference", "--env-file", "/nonexistent"],
                 {"PORT": str(port), "LOG_LEVEL": "WARNING", **env})


def wrk(url: str, connections: int, seconds: int, body: dict, cpu: int | None = None,
        headers: dict[str, str] | None = None) -> tuple[float, float]:
    """(requests/s, p50 ms) for POSTing `body` to `url`; `cpu`: wrk runs pinned to that CPU."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(json.dumps(body))}\n'
                     'wrk.headers["Content-Type"] = "application/json"\n')
        for name, value in (headers or {}).items():
            script.write(f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}\n")
    threads = min(2, connections)
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    out = subprocess.run([*pin, "wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script.name,
                          url], capture_output=True, text=True, check=True).stdout
    os.unlink(script.name)
    if "Non-2xx" in out:
        raise SystemExit(f"errors during the run:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    value, unit = re.search(r"50%\s+([\d.]+)(us|ms|s)", out).groups()
    p50 = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    return rps, p50


def stream_once(url: str, body: dict) -> tuple[float, float, int]:
    """(time to first token s, tokens/s after the first token, tokens) of one streamed chat completion."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    start_time = time.perf_counter()
    first = last = None
    tokens = 0
    with urllib.request.urlopen(request, timeout=300) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    return first - start_time, (tokens - 1) / (last - first), tokens


def report(title: str, urls: dict[str, str], body: dict, runs: int) -> None:
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in urls}
    for _ in range(runs):  # interleaved, so both see the same machine state
        for name, url in urls.items():
            results[name].append(stream_once(url, body))
    ttft = {k: statistics.median(r[0] for r in v) * 1000 for k, v in results.items()}
    tps = {k: statistics.median(r[1] for r in v) for k, v in results.items()}
    spread = {k: (min(r[1] for r in v), max(r[1] for r in v)) for k, v in results.items()}
    print(f"{title}, streamed chat completion ({results['upstream'][0][2]} tokens, median of {runs}):")
    print(f"  time to first token: upstream {ttft['upstream']:.1f} ms, via gateway {ttft['gateway']:.1f} ms "
          f"(added {ttft['gateway'] - ttft['upstream']:.1f} ms)")
    print(f"  streamed tokens/s: upstream {tps['upstream']:.1f} (runs {spread['upstream'][0]:.1f}-"
          f"{spread['upstream'][1]:.1f}), via gateway {tps['gateway']:.1f} (runs {spread['gateway'][0]:.1f}-"
          f"{spread['gateway'][1]:.1f}): {tps['gateway'] / tps['upstream']:.3f}x")


LITELLM_KEY = "sk-bench-0123456789abcdef"  # LiteLLM's proxy refuses to start without a master key
LITELLM_CONFIG = """model_list:
  - model_name: fixed-answer
    litellm_params: {{model: openai/fixed-answer, api_base: "http://127.0.0.1:{port}/v1", api_key: unused}}
"""
LITELLM_CACHE = """litellm_settings:
  cache: true
  cache_params: {type: local}
"""


def litellm(executable: str, port: int, upstream: int, cache: bool, folder: str) -> subprocess.Popen:
    config = Path(folder) / f"litellm-{port}.yaml"
    config.write_text(LITELLM_CONFIG.format(port=upstream) + (LITELLM_CACHE if cache else ""))
    env = {**os.environ, "LITELLM_MASTER_KEY": LITELLM_KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    return subprocess.Popen([executable, "--config", str(config), "--port", str(port), "--num_workers", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def compare(args: argparse.Namespace) -> dict:
    """requests/s of each contender on each path: medians of interleaved rounds, and the ratios."""
    body = {**CHAT_BODY, "temperature": 0}  # greedy: the same request is a cache hit for every contender
    upstream = free_port()
    procs = [start(["scripts/fixed_upstream.py", "--port", str(upstream)], {})]
    targets: dict[tuple[str, str], tuple[str, dict[str, str]]] = {}
    folder = tempfile.mkdtemp(prefix="bench-gateway-")
    try:
        wait_ready(f"http://127.0.0.1:{upstream}/v1/models")
        for path, cache in (("proxied", "off"), ("cache hits", "all")):
            env = {"MODEL_BACKEND": "openai", "UPSTREAM_URL": f"http://127.0.0.1:{upstream}/v1", "CACHE_MODE": cache,
                   "RATE_LIMIT_ENABLED": "false"}
            contenders = [("this", None)] + ([("baseline", args.baseline)] if args.baseline else [])
            for name, tree in contenders:
                port = free_port()
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "inference", "--env-file", "/nonexistent"], cwd=tree or ROOT,
                    env={**os.environ, "PORT": str(port), "LOG_LEVEL": "WARNING", **env},
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                targets[name, path] = (f"http://127.0.0.1:{port}", {})
            if args.litellm:
                port = free_port()
                procs.append(litellm(args.litellm, port, upstream, cache == "all", folder))
                targets["litellm", path] = (f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {LITELLM_KEY}"})
        for (name, _), (base, headers) in targets.items():
            if name == "litellm":
                wait_litellm(base, headers)
            else:
                wait_ready(f"{base}/ready", timeout=180)
            wrk(f"{base}/v1/chat/completions", 4, 2, body, headers=headers)  # warm: pools, the first cache entry
        runs: dict[tuple[str, str], list[float]] = {key: [] for key in targets}
        keys = list(targets)
        for round_ in range(args.rounds):
            for key in keys[round_ % len(keys):] + keys[:round_ % len(keys)]:
                base, headers = targets[key]
                print(f"round {round_ + 1}: {key[0]}, {key[1]}", file=sys.stderr)
                runs[key].append(wrk(f"{base}/v1/chat/completions", args.connections, args.seconds, body,
                                     headers=headers)[0])
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
    medians = {f"{name}, {path}": statistics.median(found) for (name, path), found in runs.items()}
    report = {"connections": args.connections, "seconds": args.seconds, "rounds": args.rounds,
              "requests_per_second": medians, "runs": {f"{n}, {p}": found for (n, p), found in runs.items()},
              "ratios": {}}
    for path in ("proxied", "cache hits"):
        for other in ("baseline", "litellm"):
            if (other, path) in runs:
                report["ratios"][f"this / {other}, {path}"] = medians[f"this, {path}"] / medians[f"{other}, {path}"]
    return report


def wait_litellm(base: str, headers: dict[str, str], timeout: float = 180) -> None:
    """LiteLLM's proxy is ready when it answers a model list."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{base}/v1/models", headers=headers), timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"LiteLLM at {base} not ready after {timeout}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--stream-runs", type=int, default=11)
    parser.add_argument("--token-delay-ms", type=float, default=5.0)
    parser.add_argument("--compare", action="store_true", help="proxied and cache-hit requests/s against others")
    parser.add_argument("--baseline", help="another checkout of this repository, measured in the same run")
    parser.add_argument("--litellm", help="LiteLLM's proxy executable, measured in the same run")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds for --compare (medians)")
    parser.add_argument("--json", help="write the --compare report here as JSON")
    args = parser.parse_args()
    if args.compare:
        report = compare(args)
        print(f"requests/s at {args.connections} connections, medians of {args.rounds} interleaved rounds:")
        for name, value in report["requests_per_second"].items():
            print(f"  {name:24s} {value:8.0f}   (rounds: {', '.join(f'{r:.0f}' for r in report['runs'][name])})")
        for name, value in report["ratios"].items():
            print(f"  {name:32s} {value:.3f}x")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
        return

    fixed_port, gateway_port = free_port(), free_port()
    procs = [start(["scripts/fixed_upstream.py", "--port", str(fixed_port)], {})]
    procs.append(serve(gateway_port, MODEL_BACKEND="openai", UPSTREAM_URL=f"http://127.0.0.1:{fixed_port}/v1"))
    try:
        wait_ready(f"http://127.0.0.1:{fixed_port}/v1/models")
        wait_ready(f"http://127.0.0.1:{gateway_port}/ready")
        direct = f"http://127.0.0.1:{fixed_port}/v1/chat/completions"
        gateway = f"http://127.0.0.1:{gateway_port}/v1/chat/completions"
        wrk(gateway, 4, 2, CHAT_BODY)  # warm-up: connection pools, caches
        up_rps1, up_p50 = wrk(direct, 1, args.seconds, CHAT_BODY)
        gw_rps1, gw_p50 = wrk(gateway, 1, args.seconds, CHAT_BODY)
        up_rps, _ = wrk(direct, args.connections, args.seconds, CHAT_BODY)
        gw_rps, gw_p50_n = wrk(gateway, args.connections, args.seconds, CHAT_BODY)
        print("fixed-answer upstream, non-streaming chat completions:")
        print(f"  1 connection:  upstream p50 {up_p50:.3f} ms ({up_rps1:.0f} req/s); "
              f"via gateway p50 {gw_p50:.3f} ms ({gw_rps1:.0f} req/s); added p50 {gw_p50 - up_p50:.3f} ms")
        print(f"  {args.connections} connections: upstream {up_rps:.0f} req/s; via gateway {gw_rps:.0f} req/s "
              f"(p50 {gw_p50_n:.1f} ms)")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()

    paced_port, gateway_port = free_port(), free_port()
    procs = [start(["scripts/fixed_upstream.py", "--port", str(paced_port), "--tokens", "200",
                    "--token-delay-ms", str(args.token_delay_ms)], {})]
    procs.append(serve(gateway_port, MODEL_BACKEND="openai", UPSTREAM_URL=f"http://127.0.0.1:{paced_port}/v1"))
    try:
        wait_ready(f"http://127.0.0.1:{paced_port}/v1/models")
        wait_ready(f"http://127.0.0.1:{gateway_port}/ready")
        body = {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}}
        report(f"paced fixed-answer upstream (200 tokens, one every {args.token_delay_ms:g} ms)", {
            "upstream": f"http://127.0.0.1:{paced_port}/v1/chat/completions",
            "gateway": f"http://127.0.0.1:{gateway_port}/v1/chat/completions"}, body, args.stream_runs)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()

    model_port, gateway_port = free_port(), free_port()
    procs = [serve(model_port)]
    procs.append(serve(gateway_port, MODEL_BACKEND="openai", UPSTREAM_URL=f"http://127.0.0.1:{model_port}/v1"))
    try:
        wait_ready(f"http://127.0.0.1:{model_port}/ready")
        wait_ready(f"http://127.0.0.1:{gateway_port}/ready")
        with urllib.request.urlopen(f"http://127.0.0.1:{model_port}/v1/models") as response:
            model = json.load(response)["data"][0]["id"]
        body = {"model": model, "messages": [{"role": "user", "content": "Write a story about a lighthouse."}],
                "max_tokens": 200, "temperature": 0.8, "seed": 11, "stream": True,
                "stream_options": {"include_usage": True}}
        report("embedded-model upstream (this service, llama.cpp)", {
            "upstream": f"http://127.0.0.1:{model_port}/v1/chat/completions",
            "gateway": f"http://127.0.0.1:{gateway_port}/v1/chat/completions"}, body, args.stream_runs)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
