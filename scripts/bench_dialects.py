#!/usr/bin/env python3
"""What Anthropic's and the Responses API's dialects cost against OpenAI's chat, measured with wrk (Debian package
`wrk`) on this machine.

    python scripts/bench_dialects.py [--seconds 10] [--connections 32]

The same request as /v1/chat/completions, as /v1/messages (checked in Anthropic's terms, translated into the OpenAI
chat request it means and rendered back in Anthropic's shape) and as /v1/responses (the same, in the Responses API's
terms; stored, as by default: in memory), non-streaming:
1. proxied: the gateway (MODEL_BACKEND=openai) in front of a fixed-answer upstream (scripts/fixed_upstream.py);
2. the cache-hit path: the same gateway with CACHE_MODE=all, after a first request, so every request is a hit.
Reported: p50 at one connection and requests/s at --connections (medians of --rounds, the paths interleaved),
and /v1/messages' cost relative to chat.
Everything runs on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import sys
import urllib.request
import json
import statistics
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gateway import free_port, serve, start, wait_ready, wrk  # noqa: E402

MESSAGES = [{"role": "user", "content": "Hello there"}]
BODIES = {"/v1/chat/completions": {"model": "fixed-answer", "messages": MESSAGES, "max_tokens": 20},
          "/v1/messages": {"model": "fixed-answer", "messages": MESSAGES, "max_tokens": 20},
          "/v1/responses": {"model": "fixed-answer", "input": MESSAGES, "max_output_tokens": 20}}


def measure(base: str, seconds: int, connections: int, rounds: int) -> dict[str, tuple[float, float, float]]:
    """path -> (p50 ms at 1 connection, requests/s at 1, requests/s at `connections`): medians of `rounds`, the
    paths interleaved (in rotating order), so that all see the same machine."""
    runs: dict[str, list[tuple[float, float, float]]] = {path: [] for path in BODIES}
    for path, body in BODIES.items():
        post = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                      headers={"Content-Type": "application/json"})
        urllib.request.urlopen(post).read()  # warm: the model check, pools, the cache's first entry
        wrk(base + path, 4, 2, body)
    for round_ in range(rounds):
        paths = list(BODIES)
        for path in paths[round_ % len(paths):] + paths[:round_ % len(paths)]:
            rps1, p50 = wrk(base + path, 1, seconds, BODIES[path])
            rps, _ = wrk(base + path, connections, seconds, BODIES[path])
            runs[path].append((p50, rps1, rps))
    return {path: tuple(statistics.median(r[i] for r in found) for i in range(3))  # type: ignore[misc]
            for path, found in runs.items()}


def show(title: str, results: dict[str, tuple[float, float, float]], connections: int) -> None:
    chat = results["/v1/chat/completions"]
    print(f"{title}:")
    for path, (p50, rps1, rps) in results.items():
        print(f"  {path:22s} p50 {p50:.3f} ms ({rps1:.0f} req/s at 1 connection); {rps:.0f} req/s at {connections}")
    for path, found in results.items():
        if path != "/v1/chat/completions":
            print(f"  {path} costs {(found[0] / chat[0] - 1) * 100:+.1f}% p50, "
                  f"{(1 - found[2] / chat[2]) * 100:+.1f}% requests/s at {connections} connections")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    upstream = free_port()
    procs = [start(["scripts/fixed_upstream.py", "--port", str(upstream)], {})]
    try:
        wait_ready(f"http://127.0.0.1:{upstream}/v1/models")
        for title, cache in (("proxied to a fixed-answer upstream", "off"), ("cache hits", "all")):
            port = free_port()
            gateway = serve(port, MODEL_BACKEND="openai", UPSTREAM_URL=f"http://127.0.0.1:{upstream}/v1",
                            CACHE_MODE=cache, RATE_LIMIT_ENABLED="false")
            try:
                wait_ready(f"http://127.0.0.1:{port}/ready")
                show(title, measure(f"http://127.0.0.1:{port}", args.seconds, args.connections, args.rounds),
                     args.connections)
            finally:
                gateway.terminate()
                gateway.wait()
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
