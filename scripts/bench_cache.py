#!/usr/bin/env python3
"""Cache hits on one worker, with Redis and the rate limiter on, measured with wrk (Debian package `wrk`).

    python scripts/bench_cache.py [--seconds 10] [--connections 32] [--tracing [--sample-ratio R]]
    python scripts/bench_cache.py --matrix [--rounds 5] [--seconds 5]

Starts a redis-server (Debian package `redis-server`) and `python -m inference` (embedded default model) on free
ports, sends one request to fill the cache, then measures the same request with wrk: p50 at one connection and
requests/s at --connections. The limit is set high enough never to refuse, so every request still pays for its
rate-limit decision (one Lua script call) and its cache lookup (one GET): two Redis round trips.
With --tracing every request is also traced (server, rate_limit and cache lookup spans), exported in batches.

--matrix measures what tracing costs: off, on with no request sampled, 10% sampled and every request, each with
the in-memory store and with Redis (eight servers), in interleaved rounds. Every process of each server (the HTTP
process, the engine process, the span export process) is pinned to CPU 0, and wrk, redis-server and this script
(with the OTLP sinks) to CPU 1; what counts is
requests per CPU-second of the server's processes together, read from /proc before and after each run: a pod's
CPU limit covers the export process too. It prints the median requests/s, requests per CPU-second, its ratio to
tracing off with the same store, and the spans each server dropped (export queue full).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gateway import ROOT, free_port, serve, wait_ready, wrk  # noqa: E402

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


class Server:
    """`python -m inference` on a free port, cache hits primed, the limiter on; `ratio` None: tracing off, else the
    share of traces kept, exported over OTLP/HTTP to a sink of its own in this process."""

    def __init__(self, *, redis_url: str | None, ratio: float | None, cpu: int | None = None) -> None:
        self.port = port = free_port()
        env = {"RATE_LIMIT_PER_MINUTE": "1000000000", "CACHE_MODE": "all"}
        if redis_url:  # a cache of its own: the first request is a miss
            env.update(REDIS_URL=redis_url, REDIS_KEY_PREFIX=f"bench-{port}")
        self.sink = None
        if ratio is not None:
            self.sink = trace_sink()
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{self.sink.server_address[1]}"
            env.update(OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG=str(ratio))
        if cpu is None:
            self.process = serve(port, **env)
        else:  # every process it starts inherits the affinity
            self.process = subprocess.Popen(
                [sys.executable, "-m", "inference", "--env-file", "/nonexistent"], cwd=ROOT,
                env={**os.environ, "PORT": str(port), "LOG_LEVEL": "WARNING", **env},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
        self.url = f"http://127.0.0.1:{port}/api/v1/infer"

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server's processes have used: the HTTP process and its children."""
        ticks = os.sysconf("SC_CLK_TCK")
        total, pending = 0.0, [self.process.pid]
        while pending:
            pid = pending.pop()
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
                for task in Path(f"/proc/{pid}/task").iterdir():
                    pending += [int(child) for child in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
        return total

    def prime(self) -> None:
        wait_ready(f"http://127.0.0.1:{self.port}/ready")
        request = urllib.request.Request(self.url, data=json.dumps(BODY).encode(),
                                         headers={"Content-Type": "application/json"})
        for expected in ("MISS", "HIT"):
            with urllib.request.urlopen(request) as response:
                assert response.headers["X-Cache"] == expected, response.headers["X-Cache"]
                assert response.headers["RateLimit"], "the limiter must be on"
        wrk(self.url, 4, 2, BODY)  # warm-up: the first exports, the first requests of every code path

    def spans_dropped(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics") as response:
            text = response.read().decode()
        found = re.search(r"^inference_spans_dropped_total (\S+)", text, re.MULTILINE)
        return f"{float(found.group(1)):.0f}" if found else "-"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()
        if self.sink is not None:
            self.sink.shutdown()


TRACING = (("off", None), ("on, none sampled", 0.0), ("on, 10% sampled", 0.1), ("on, every request", 1.0))


def matrix(redis_url: str, rounds: int, seconds: int, connections: int, stores: tuple[str, ...]) -> None:
    """Every tracing setting with each store, each on a server of its own, all started first and then measured in
    turns: `rounds` rounds, each server once a round, the starting one rotating. Servers on CPU 0, wrk on CPU 1;
    the figure is requests per CPU-second of the server's processes (HTTP, engine, span export), so what the export
    process spends counts, and wrk's share of the machine does not."""
    configs = [(store, label, ratio) for store in stores for label, ratio in TRACING]
    servers = [Server(redis_url=redis_url if store == "redis" else None, ratio=ratio, cpu=0)
               for store, _, ratio in configs]
    try:
        for server in servers:
            server.prime()
        rates: list[list[float]] = [[] for _ in configs]
        per_cpu: list[list[float]] = [[] for _ in configs]
        for round_ in range(rounds):
            # Per store, its four settings back to back (their ratios compare neighbours in time), the order
            # rotating from round to round.
            order = []
            for store in stores:
                mine = [i for i, config in enumerate(configs) if config[0] == store]
                order += mine[round_ % len(mine):] + mine[:round_ % len(mine)]
            for i in order:
                before = servers[i].cpu_seconds()
                rps, _ = wrk(servers[i].url, connections, seconds, BODY, cpu=1)
                used = servers[i].cpu_seconds() - before
                rates[i].append(rps)
                per_cpu[i].append(rps * seconds / used if used > 0 else float("nan"))
            print(f"  round {round_ + 1} of {rounds} done", file=sys.stderr, flush=True)
        print(f"cache hits, rate limiter on, one worker (every process on CPU 0), wrk on CPU 1 with {connections} "
              f"connections: median of {rounds} rounds of {seconds} s")
        # This machine's speed drifts by tens of percent over minutes (a shared VM): each round's figure is divided
        # by the same round's tracing-off figure for the store, and the median of those ratios is the result.
        print("  store   tracing               req/s    req per CPU-s (min-max)   vs off (per-round ratios: median, "
              "quartiles)   spans dropped")
        baseline = {store: per_cpu[i] for i, (store, label, _) in enumerate(configs) if label == "off"}
        for (store, label, _), server, rps, efficiency in zip(configs, servers, rates, per_cpu):
            ratios = sorted(e / b for e, b in zip(efficiency, baseline[store]))
            low, high = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
            print(f"  {store:<7} {label:<20} {statistics.median(rps):>6.0f}   {statistics.median(efficiency):>7.0f} "
                  f"({min(efficiency):.0f}-{max(efficiency):.0f})   {statistics.median(ratios):.2f}x ({low:.2f}-"
                  f"{high:.2f})   {server.spans_dropped()}", flush=True)
    finally:
        for server in servers:
            server.stop()


def measure(*, redis_url: str | None, ratio: float | None, seconds: int, connections: int
            ) -> tuple[float, float, float]:
    """(requests/s at 1 connection, p50 ms there, requests/s at `connections`) of cache hits on a fresh server."""
    server = Server(redis_url=redis_url, ratio=ratio)
    try:
        server.prime()
        rps1, p50 = wrk(server.url, 1, seconds, BODY)
        rps, _ = wrk(server.url, connections, seconds, BODY)
        return rps1, p50, rps
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--tracing", action="store_true",
                        help="trace requests, exported over OTLP/HTTP to a sink in this script")
    parser.add_argument("--sample-ratio", type=float, default=1.0, help="with --tracing: the share of traces kept")
    parser.add_argument("--rounds", type=int, default=7, help="with --matrix: rounds, each server once a round")
    parser.add_argument("--stores", default="memory,redis", help="with --matrix: memory, redis or both")
    parser.add_argument("--matrix", action="store_true",
                        help="tracing off / none sampled / 10%% / every request, with the in-memory store and with "
                             "Redis, in interleaved rounds: median requests/s and the ratios to tracing off")
    args = parser.parse_args()

    if args.matrix and len(os.sched_getaffinity(0)) > 1:
        # This script (the trace sinks), redis-server and wrk on CPU 1; each server on CPU 0, alone.
        os.sched_setaffinity(0, {1})
    redis_port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    try:
        if args.matrix:
            matrix(redis_url, args.rounds, args.seconds, args.connections, tuple(args.stores.split(",")))
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
