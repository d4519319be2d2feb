#!/usr/bin/env python3
"""Cache hits on one worker, with Redis and the rate limiter on, measured with wrk (Debian package `wrk`).

    python scripts/bench_cache.py [--seconds 10] [--connections 32] [--tracing [--sample-ratio R] | --matrix]

Starts a redis-server (Debian package `redis-server`) and `python -m inference` (embedded default model) on free
ports, sends one request to fill the cache, then measures the same request with wrk: p50 at one connection and
requests/s at --connections. The limit is set high enough never to refuse, so every request still pays for its
rate-limit decision (one Lua script call) and its cache lookup (one GET): two Redis round trips.
With --tracing every request is also traced (server, rate_limit and cache lookup spans), exported in batches.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gateway import free_port, serve, wait_ready, wrk  # noqa: E402

BODY = {"prompt": "What is 2+2?", "temperature": 0, "max_tokens": 24}


def trace_sink() -> ThreadingHTTPServer:
    """An OTLP/HTTP endpoint that accepts every batch of spans and drops it: tracing's cost is the service's."""

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def measure(*, redis_url: str | None, ratio: float | None, seconds: int, connections: int
            ) -> tuple[float, float, float]:
    """(requests/s at 1 connection, p50 ms there, requests/s at `connections`) of cache hits on a fresh server,
    the limiter on; `ratio` None: tracing off, else the share of traces kept (exported to a sink)."""
    port = free_port()
    env = {"RATE_LIMIT_PER_MINUTE": "1000000000", "CACHE_MODE": "all"}
    if redis_url:
        env.update(REDIS_URL=redis_url, REDIS_KEY_PREFIX=f"bench-{port}")  # a cache of its own: the first is a miss
    sink = None
    if ratio is not None:
        sink = trace_sink()
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{sink.server_address[1]}"
        if ratio < 1:
            env.update(OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG=str(ratio))
    service = serve(port, **env)
    try:
        wait_ready(f"http://127.0.0.1:{port}/ready")
        url = f"http://127.0.0.1:{port}/api/v1/infer"
        request = urllib.request.Request(url, data=json.dumps(BODY).encode(), headers={"Content-Type": "application/json"})
        for expected in ("MISS", "HIT"):
            with urllib.request.urlopen(request) as response:
                assert response.headers["X-Cache"] == expected, response.headers["X-Cache"]
                assert response.headers["RateLimit"], "the limiter must be on"
        wrk(url, 4, 2, BODY)  # warm-up
        rps1, p50 = wrk(url, 1, seconds, BODY)
        rps, _ = wrk(url, connections, seconds, BODY)
        return rps1, p50, rps
    finally:
        service.terminate()
        service.wait()
        if sink is not None:
            sink.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--tracing", action="store_true",
                        help="trace requests, exported over OTLP/HTTP to a sink in this script")
    parser.add_argument("--sample-ratio", type=float, default=1.0, help="with --tracing: the share of traces kept")
    parser.add_argument("--matrix", action="store_true",
                        help="tracing off, 10%% sampled and every request, each with the in-memory store and with "
                             "Redis, in one run: requests/s and the ratios to tracing off")
    args = parser.parse_args()

    redis_port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    try:
        if args.matrix:
            print(f"cache hits, rate limiter on, one worker, {args.connections} connections (wrk, {args.seconds} s):")
            print("  store   tracing                 req/s   vs off   p50 at 1 connection")
            for store, url in (("memory", None), ("redis", redis_url)):
                off = None
                for label, ratio in (("off", None), ("10% sampled", 0.1), ("every request", 1.0)):
                    rps1, p50, rps = measure(redis_url=url, ratio=ratio, seconds=args.seconds,
                                             connections=args.connections)
                    off = off or rps
                    print(f"  {store:<7} {label:<20} {rps:>8.0f}   {rps / off:>5.2f}x   {p50:.3f} ms", flush=True)
            return
        rps1, p50, rps = measure(redis_url=redis_url, ratio=args.sample_ratio if args.tracing else None,
                                 seconds=args.seconds, connections=args.connections)
        tracing = f"on, {args.sample_ratio:.0%} sampled" if args.tracing else "off"
        print(f"cache hits, Redis and rate limiter on, tracing {tracing}, one worker:")
        print(f"  1 connection: p50 {p50:.3f} ms ({rps1:.0f} req/s)")
        print(f"  {args.connections} connections: {rps:.0f} req/s")
    finally:
        redis.terminate()
        redis.wait()


if __name__ == "__main__":
    main()
