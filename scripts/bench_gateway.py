#!/usr/bin/env python3
"""What the gateway (MODEL_BACKEND=openai) costs, measured with wrk (Debian package `wrk`) on this machine.

    python scripts/bench_gateway.py [--seconds 10] [--connections 32]

1. Request rate and added latency: a fixed-answer upstream (scripts/fixed_upstream.py) measured directly and
   through the gateway, non-streaming chat completions: p50 at one connection, requests/s at --connections.
2. Streaming, read directly and through the gateway, interleaved: time to first token and streamed tokens/s
   (a) from the fixed-answer upstream pacing its 200 tokens (--token-delay-ms): the gateway's own cost;
   (b) from this service with the embedded model, the same seeded request: the real thing, noisier, since
       the model and the gateway share the machine's two cores.

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


def wrk(url: str, connections: int, seconds: int, body: dict, cpu: int | None = None) -> tuple[float, float]:
    """(requests/s, p50 ms) for POSTing `body` to `url`; `cpu`: wrk runs pinned to that CPU."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(json.dumps(body))}\n'
                     'wrk.headers["Content-Type"] = "application/json"\n')
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--stream-runs", type=int, default=11)
    parser.add_argument("--token-delay-ms", type=float, default=5.0)
    args = parser.parse_args()

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
