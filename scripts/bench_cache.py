#!/usr/bin/env python3
"""Cache hits on one worker, with Redis and the rate limiter on, measured with wrk (Debian package `wrk`).

    python scripts/bench_cache.py [--seconds 10] [--connections 32]

Starts a redis-server (Debian package `redis-server`) and `python -m inference` (embedded default model) on free
ports, sends one request to fill the cache, then measures the same request with wrk: p50 at one connection and
requests/s at --connections. The limit is set high enough never to refuse, so every request still pays for its
rate-limit decision (one Lua script call) and its cache lookup (one GET): two Redis round trips.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gateway import free_port, serve, wait_ready, wrk  # noqa: E402

BODY = {"prompt": "What is 2+2?", "temperature": 0, "max_tokens": 24}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--tracing", action="store_true", help="also export traces (OTEL_EXPORTER_OTLP_ENDPOINT)")
    args = parser.parse_args()

    redis_port, port = free_port(), free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL)
    service = serve(port, REDIS_URL=f"redis://127.0.0.1:{redis_port}/0", RATE_LIMIT_PER_MINUTE="1000000000",
                    CACHE_MODE="all")
    try:
        wait_ready(f"http://127.0.0.1:{port}/ready")
        url = f"http://127.0.0.1:{port}/api/v1/infer"
        import json

        request = urllib.request.Request(url, data=json.dumps(BODY).encode(), headers={"Content-Type": "application/json"})
        for expected in ("MISS", "HIT"):
            with urllib.request.urlopen(request) as response:
                assert response.headers["X-Cache"] == expected, response.headers["X-Cache"]
                assert response.headers["RateLimit"], "the limiter must be on"
        wrk(url, 4, 2, BODY)  # warm-up
        rps1, p50 = wrk(url, 1, args.seconds, BODY)
        rps, p50n = wrk(url, args.connections, args.seconds, BODY)
        print("cache hits, Redis and rate limiter on, one worker:")
        print(f"  1 connection: p50 {p50:.3f} ms ({rps1:.0f} req/s)")
        print(f"  {args.connections} connections: {rps:.0f} req/s (p50 {p50n:.1f} ms)")
    finally:
        service.terminate()
        service.wait()
        redis.terminate()
        redis.wait()


if __name__ == "__main__":
    main()
