#!/usr/bin/env python3
"""Single-request latency and generation speed of POST /api/v1/infer against a running server.

    python -m inference &                      # or any deployment
    python scripts/bench_infer.py --url http://127.0.0.1:8000 --requests 10 --max-tokens 128

Requests are sent one after another (no concurrency), so the figures are what one user sees: end-to-end latency
per request, completion tokens per second of wall time, and for streamed requests the time to the first token
against the time to the whole answer. Uses only the standard library.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe the water cycle.",
    "Write a poem about autumn leaves.",
]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url + "/api/v1/infer", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    post(args.url, {"prompt": "Hello", "max_tokens": 4})  # warm-up
    latencies, speeds, tokens = [], [], []
    for i in range(args.requests):
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens, "temperature": 0.7, "seed": i}
        start = time.perf_counter()
        result = post(args.url, body)
        elapsed = time.perf_counter() - start
        latencies.append(elapsed)
        tokens.append(result["completion_tokens"])
        speeds.append(result["completion_tokens"] / elapsed)
    print(f"requests: {args.requests}, max_tokens: {args.max_tokens}")
    print(f"completion tokens per request: mean {statistics.mean(tokens):.0f}")
    print(f"latency: p50 {statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")
    print(f"tokens/s (completion tokens / wall time): mean {statistics.mean(speeds):.1f}")
    firsts, totals = [], []
    for i in range(args.requests):
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens, "temperature": 0.7, "seed": i,
                "stream": True}
        request = urllib.request.Request(args.url + "/api/v1/infer", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        first = None
        with urllib.request.urlopen(request, timeout=300) as response:
            for line in response:
                if first is None and line.startswith(b"event: token"):
                    first = time.perf_counter() - start
        firsts.append(first)
        totals.append(time.perf_counter() - start)
    print(f"streamed (stream=true): time to first token p50 {statistics.median(firsts) * 1000:.0f} ms, "
          f"whole answer p50 {statistics.median(totals) * 1000:.0f} ms")
    short = [post(args.url, {"prompt": "What is 2+2?", "temperature": 0, "max_tokens": 24}) for _ in range(3)]
    start = time.perf_counter()
    for _ in range(5):
        post(args.url, {"prompt": "What is 2+2?", "temperature": 0, "max_tokens": 24})
    print(f"'What is 2+2?' at temperature 0: {(time.perf_counter() - start) / 5 * 1000:.0f} ms per request, "
          f"answer {short[0]['output']!r}")


if __name__ == "__main__":
    main()
