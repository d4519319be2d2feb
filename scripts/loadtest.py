#!/usr/bin/env python3
"""Drive load at the inference service and report what it did: throughput, refusals, latency, tokens/s.

Closed loop (--concurrency N: N clients, each sending its next request when the last one is answered) or open
loop (--rate R: R requests a second whatever the answers, as real traffic arrives; latency then counts from when a
request was due, so a saturated server cannot hide its queue). --stages ramps the load up and down, linearly
within each stage, to watch an autoscaler react (`kubectl get hpa -w`):

  loadtest.py --url http://127.0.0.1:8000 --duration 10 --concurrency 8
  loadtest.py --url https://inference.example.com --api-key $KEY --stages 1m:4,3m:32,2m:32,1m:0 --stream
  loadtest.py --url ... --endpoint chat --rate 5 --duration 60 --json > report.json
  loadtest.py --url ... --rate --stages 1m:2,5m:10,1m:0

Every request skips the response cache (`Cache-Control: no-store`) unless --cache is given, so the model does the
work. The service's own rate limit (RATE_LIMIT_PER_MINUTE, 10 by default) refuses most of a load test from one
client: raise it or turn it off on the target, or count the 429s. Bounded: the run ends after its duration (or
--max-requests), waits up to --timeout for the requests in flight, and prints the report; Ctrl-C prints the
report so far. Progress goes to stderr, the report to stdout (a table, or one JSON object with --json).
Standard library only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import random
import re
import signal
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

ENDPOINTS = {"infer": "/api/v1/infer", "chat": "/v1/chat/completions"}
PROMPTS = [
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about the sea.",
    "Give three tips for writing clear code.",
    "What is 17 times 23?",
    "Name five animals that live in the Arctic.",
    "Summarise the plot of Romeo and Juliet in one sentence.",
    "What does a load balancer do?",
]
STAGE = re.compile(r"^\s*(\d+(?:\.\d+)?)(ms|s|m|h)?\s*:\s*(\d+(?:\.\d+)?)\s*$")
UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}


def parse_stages(text: str) -> list[tuple[float, float]]:
    """'30s:4,1m:16,30s:0' -> [(30, 4), (60, 16), (30, 0)]: (seconds, load at the end of the stage)."""
    stages = []
    for part in text.split(","):
        match = STAGE.match(part)
        if not match:
            raise argparse.ArgumentTypeError(f"stage {part!r} is not DURATION:LOAD, e.g. 30s:8 or 2m:16")
        seconds = float(match[1]) * UNITS[match[2]]
        if seconds <= 0:
            raise argparse.ArgumentTypeError(f"stage {part!r} must last longer than 0 s")
        stages.append((seconds, float(match[3])))
    return stages


class Plan:
    """The target load (clients, or requests a second) at each moment of the run."""

    def __init__(self, stages: list[tuple[float, float]], start_load: float) -> None:
        self.stages = stages
        self.start_load = start_load
        self.duration = sum(seconds for seconds, _ in stages)

    def load_at(self, elapsed: float) -> float:
        before, begin = self.start_load, 0.0
        for seconds, target in self.stages:
            if elapsed < begin + seconds:
                return before + (target - before) * (elapsed - begin) / seconds
            before, begin = target, begin + seconds
        return before

    def arrivals_by(self, elapsed: float) -> float:
        """Open loop: the requests due by `elapsed`, the integral of the (piecewise linear) rate."""
        total, before, begin = 0.0, self.start_load, 0.0
        for seconds, target in self.stages:
            span = min(seconds, max(0.0, elapsed - begin))
            total += span * (before + (before + (target - before) * span / seconds)) / 2
            before, begin = target, begin + seconds
        return total


@dataclass
class Result:
    status: int  # 0: no HTTP answer (connection error, timeout)
    latency: float
    ttft: float | None = None
    completion_tokens: int = 0
    cache: str | None = None
    error: str | None = None


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    results: list[Result] = field(default_factory=list)
    in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, result: Result) -> None:
        with self.lock:
            self.results.append(result)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


class Client:
    """One keep-alive connection, one request at a time."""

    def __init__(self, args: argparse.Namespace) -> None:
        parts = urlsplit(args.url)
        self.args = args
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.https else 80)
        self.path = parts.path.rstrip("/") + ENDPOINTS[args.endpoint]
        self.context = ssl.create_default_context() if self.https else None
        if self.context is not None and args.insecure:
            self.context.check_hostname = False
            self.context.verify_mode = ssl.CERT_NONE
        self.connection: http.client.HTTPConnection | None = None
        self.headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream",
                        "User-Agent": "inference-loadtest"}
        if not args.cache:
            self.headers["Cache-Control"] = "no-store"
        if args.api_key:
            self.headers["Authorization"] = f"Bearer {args.api_key}"

    def connect(self) -> http.client.HTTPConnection:
        if self.connection is None:
            if self.https:
                self.connection = http.client.HTTPSConnection(self.host, self.port, timeout=self.args.timeout,
                                                              context=self.context)
            else:
                self.connection = http.client.HTTPConnection(self.host, self.port, timeout=self.args.timeout)
        return self.connection

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def body(self, prompt: str) -> bytes:
        args = self.args
        if args.endpoint == "infer":
            payload = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": args.temperature,
                       "stream": args.stream}
        else:
            payload = {"model": args.model, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": args.max_tokens, "temperature": args.temperature, "stream": args.stream}
            if args.stream:
                payload["stream_options"] = {"include_usage": True}
        return json.dumps(payload).encode()

    def request(self, prompt: str, due: float) -> Result:
        """Send one request; latency counts from `due` (when it should have started)."""
        try:
            connection = self.connect()
            connection.request("POST", self.path, body=self.body(prompt), headers=self.headers)
            response = connection.getresponse()
            cache = response.getheader("X-Cache")
            if response.status != 200:
                detail = response.read()[:300].decode(errors="replace")
                return Result(response.status, time.monotonic() - due, cache=cache, error=detail)
            if self.args.stream:
                ttft, tokens, error = self.read_stream(response, due)
                response.read()  # the end of the chunked body, so the connection can carry the next request
            else:
                ttft, tokens, error = None, self.completion_tokens(json.loads(response.read())), None
            if response.will_close:
                self.close()
            return Result(200, time.monotonic() - due, ttft, tokens, cache, error)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self.close()
            return Result(0, time.monotonic() - due, error=f"{type(exc).__name__}: {exc}")

    def completion_tokens(self, answer: dict) -> int:
        if self.args.endpoint == "infer":
            return int(answer.get("completion_tokens", 0))
        return int((answer.get("usage") or {}).get("completion_tokens", 0))

    def read_stream(self, response: http.client.HTTPResponse, due: float) -> tuple[float | None, int, str | None]:
        """Server-sent events: the first text is the time to first token; usage comes with the last event. A stream
        that ends without its end (`[DONE]`, or the native API's `done` event) was cut short: an error."""
        ttft, tokens, event, error, ended = None, 0, "message", None, False
        for raw in response:
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if line.startswith("event:"):
                event = line[6:].strip()
                continue
            if not line.startswith("data:"):
                if not line:
                    event = "message"
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                ended = True
                break
            message = json.loads(data)
            if event == "error" or "error" in message:
                error = json.dumps(message.get("error", message))[:300]
            elif self.args.endpoint == "infer":
                if event == "token" and ttft is None and message.get("text"):
                    ttft = time.monotonic() - due
                elif event == "done":
                    tokens = int(message.get("completion_tokens", 0))
                    ended = True
            else:
                choices = message.get("choices") or []
                if ttft is None and any((c.get("delta") or {}).get("content") for c in choices):
                    ttft = time.monotonic() - due
                if message.get("usage"):
                    tokens = int(message["usage"].get("completion_tokens", 0))
        if not ended and error is None:
            error = "the stream ended without " + ("its done event" if self.args.endpoint == "infer" else "[DONE]")
        return ttft, tokens, error


class LoadTest:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.open_loop = args.rate is not None
        if args.stages:
            self.plan = Plan(args.stages, start_load=0.0)
        else:
            steady = args.rate if self.open_loop else args.concurrency
            self.plan = Plan([(args.duration, steady)], start_load=steady)
        self.stats = Stats()
        self.stop = threading.Event()
        self.issued = 0
        self.issue_lock = threading.Lock()
        self.random = random.Random(args.seed)
        peak = max([self.plan.start_load] + [load for _, load in self.plan.stages])
        self.workers = args.max_workers if self.open_loop else max(1, math.ceil(peak))
        self.tickets: list[float] = []  # open loop: due times waiting for a free worker
        self.tickets_ready = threading.Condition()

    def take_ticket(self) -> bool:
        """Count a request against --max-requests; False when the budget is spent."""
        with self.issue_lock:
            if self.args.max_requests and self.issued >= self.args.max_requests:
                return False
            self.issued += 1
            return True

    def prompt(self) -> str:
        with self.issue_lock:
            return self.random.choice(self.args.prompt_list)

    def elapsed(self) -> float:
        return time.monotonic() - self.stats.started

    def closed_loop_worker(self, index: int) -> None:
        client = Client(self.args)
        while not self.stop.is_set() and self.elapsed() < self.plan.duration:
            # Worker i works while the plan asks for more than i clients.
            if index >= round(self.plan.load_at(self.elapsed())):
                self.stop.wait(0.05)
                continue
            if not self.take_ticket():
                break
            self.run_one(client, time.monotonic())
        client.close()

    def open_loop_worker(self) -> None:
        client = Client(self.args)
        while True:
            with self.tickets_ready:
                while not self.tickets and not self.stop.is_set():
                    self.tickets_ready.wait(0.1)
                if not self.tickets:
                    break
                due = self.tickets.pop(0)
            self.run_one(client, due)
        client.close()

    def open_loop_arrivals(self) -> None:
        """Requests fall due at the planned rate, whether or not a worker is free to send them."""
        due_count = 0
        while not self.stop.is_set() and self.elapsed() < self.plan.duration:
            while due_count < int(self.plan.arrivals_by(self.elapsed())) and self.take_ticket():
                due_count += 1
                with self.tickets_ready:
                    self.tickets.append(time.monotonic())
                    self.tickets_ready.notify()
            if self.args.max_requests and self.issued >= self.args.max_requests:
                break
            self.stop.wait(0.005)
        self.stop.set()  # no more arrivals: workers finish what is due, then leave

    def run_one(self, client: Client, due: float) -> None:
        with self.stats.lock:
            self.stats.in_flight += 1
        result = client.request(self.prompt(), due)
        with self.stats.lock:
            self.stats.in_flight -= 1
        self.stats.add(result)

    def progress(self) -> None:
        while not self.stop.wait(1.0):
            self.print_progress()

    def print_progress(self) -> None:
        with self.stats.lock:
            results = list(self.stats.results)
            in_flight = self.stats.in_flight
        ok = sum(r.status == 200 and not r.error for r in results)
        recent = [r.latency for r in results[-200:] if r.status == 200]
        p50 = percentile(recent, 50)
        unit = "req/s" if self.open_loop else "clients"
        print(f"\r{self.elapsed():6.1f}s  target {self.plan.load_at(self.elapsed()):5.1f} {unit}  "
              f"in flight {in_flight:3d}  done {len(results):5d}  ok {ok:5d}  "
              f"429 {sum(r.status == 429 for r in results):4d}  503 {sum(r.status == 503 for r in results):4d}  "
              f"p50 {p50 * 1000 if p50 is not None else 0:7.0f} ms ",
              end="", file=sys.stderr, flush=True)

    def run(self) -> dict:
        threads = []
        if self.open_loop:
            threads.append(threading.Thread(target=self.open_loop_arrivals, daemon=True))
            threads += [threading.Thread(target=self.open_loop_worker, daemon=True) for _ in range(self.workers)]
        else:
            threads += [threading.Thread(target=self.closed_loop_worker, args=(i,), daemon=True)
                        for i in range(self.workers)]
        reporter = threading.Thread(target=self.progress, daemon=True)
        for thread in threads:
            thread.start()
        reporter.start()
        interrupted = False
        try:
            # Wait for the plan to run out (or --max-requests), then for the requests in flight, up to --timeout.
            deadline = self.plan.duration
            while self.elapsed() < deadline and any(t.is_alive() for t in threads):
                time.sleep(0.1)
            self.stop.set()
            grace = time.monotonic() + self.args.timeout
            for thread in threads:
                thread.join(max(0.0, grace - time.monotonic()))
        except KeyboardInterrupt:
            interrupted = True
            self.stop.set()
        self.print_progress()
        print(file=sys.stderr)
        return self.report(interrupted)

    def report(self, interrupted: bool) -> dict:
        duration = self.elapsed()
        with self.stats.lock:
            results = list(self.stats.results)
            in_flight = self.stats.in_flight
        ok = [r for r in results if r.status == 200 and not r.error]
        errors: dict[str, int] = {}  # neither a success nor a 429/503 refusal, by status ("connection": none)
        for r in results:
            if r.status == 200 and r.error:
                kind = "stream_cut" if r.error.startswith("the stream ended without") else "stream_error"
            elif r.status in (200, 429, 503):
                continue
            else:
                kind = str(r.status) if r.status else "connection"
            errors[kind] = errors.get(kind, 0) + 1
        latencies = [r.latency for r in ok]
        ttfts = [r.ttft for r in ok if r.ttft is not None]
        tokens = sum(r.completion_tokens for r in ok)
        cache: dict[str, int] = {}
        for r in results:
            if r.cache:
                cache[r.cache] = cache.get(r.cache, 0) + 1

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000, 1)

        return {
            "url": self.args.url,
            "endpoint": ENDPOINTS[self.args.endpoint],
            "stream": self.args.stream,
            "mode": "rate" if self.open_loop else "concurrency",
            "stages": [{"seconds": s, "load": l} for s, l in self.plan.stages],
            "duration_seconds": round(duration, 2),
            "interrupted": interrupted,
            "requests": len(results),
            "unfinished": in_flight,
            "successes": len(ok),
            "rate_limited_429": sum(r.status == 429 for r in results),
            "overloaded_503": sum(r.status == 503 for r in results),
            "other_errors": sum(errors.values()),
            "errors_by_kind": errors,
            "first_error": next((r.error for r in results if r.error and r.status not in (429, 503)), None),
            "requests_per_second": round(len(results) / duration, 2) if duration else 0.0,
            "latency_ms": {f"p{q}": ms(percentile(latencies, q)) for q in (50, 95, 99)},
            "ttft_ms": {f"p{q}": ms(percentile(ttfts, q)) for q in (50, 95)},
            "completion_tokens": tokens,
            "tokens_per_second": round(tokens / duration, 1) if duration else 0.0,
            "cache": cache,
        }


def print_table(report: dict) -> None:
    def fmt(value: float | None, unit: str = "") -> str:
        return "n/a" if value is None else f"{value:,.1f}{unit}" if isinstance(value, float) else f"{value:,}{unit}"

    latency, ttft = report["latency_ms"], report["ttft_ms"]
    rows = [
        ("target", f"{report['url']}{report['endpoint']}{' (stream)' if report['stream'] else ''}"),
        ("duration", f"{report['duration_seconds']:.1f} s" + (" (interrupted)" if report["interrupted"] else "")),
        ("requests", fmt(report["requests"]) + (f" ({report['unfinished']} unfinished)" if report["unfinished"] else "")),
        ("successes", fmt(report["successes"])),
        ("429 rate limited", fmt(report["rate_limited_429"])),
        ("503 overloaded", fmt(report["overloaded_503"])),
        ("other errors", fmt(report["other_errors"]) + (f" {report['errors_by_kind']}" if report["other_errors"] else "")),
        ("requests/s", fmt(report["requests_per_second"])),
        ("latency p50 / p95 / p99", " / ".join(fmt(latency[k], " ms") for k in ("p50", "p95", "p99"))),
        ("time to first token p50 / p95", " / ".join(fmt(ttft[k], " ms") for k in ("p50", "p95"))
         + ("" if report["stream"] else " (--stream measures it)")),
        ("completion tokens/s", f"{fmt(report['tokens_per_second'])} ({report['completion_tokens']:,} tokens)"),
    ]
    if report["cache"]:
        rows.append(("X-Cache", ", ".join(f"{k} {v}" for k, v in sorted(report["cache"].items()))))
    if report["first_error"]:
        rows.append(("first error", report["first_error"][:200]))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def positive(kind: type) -> callable:
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the service's base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--endpoint", choices=sorted(ENDPOINTS), default="infer",
                        help="infer = /api/v1/infer, chat = /v1/chat/completions (default: %(default)s)")
    parser.add_argument("--stream", action="store_true", help="stream the answers (measures time to first token)")
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=positive(int), help="closed loop: this many clients (default 4)")
    load.add_argument("--rate", type=positive(float), nargs="?", const=0.0,
                      help="open loop: this many requests a second; with --stages, just --rate (the stages give it)")
    parser.add_argument("--duration", type=positive(float), default=30.0,
                        help="seconds to run, without --stages (default: %(default)s)")
    parser.add_argument("--stages", type=parse_stages,
                        help="ramp: DURATION:LOAD,... (e.g. 30s:4,2m:32,30s:0); LOAD is clients, or requests/s "
                             "with --rate; linear from the previous stage's load (0 at the start)")
    parser.add_argument("--max-requests", type=positive(int), help="stop after sending this many requests")
    parser.add_argument("--max-workers", type=positive(int), default=64,
                        help="open loop: most requests in flight at once (default: %(default)s)")
    parser.add_argument("--prompts", help="a file of prompts, one a line (default: a built-in set of 8)")
    parser.add_argument("--max-tokens", type=positive(int), default=64, help="default: %(default)s")
    parser.add_argument("--temperature", type=float, default=0.7, help="default: %(default)s")
    parser.add_argument("--model", default="default",
                        help="chat: the model id (the service's id from /v1/models; default: asked from the service)")
    parser.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    parser.add_argument("--cache", action="store_true", help="let the service answer from its cache")
    parser.add_argument("--timeout", type=positive(float), default=120.0,
                        help="seconds a request may take; also the wait for requests in flight at the end")
    parser.add_argument("--insecure", action="store_true", help="https: do not verify the certificate")
    parser.add_argument("--seed", type=int, default=0, help="prompt order (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)

    if args.stages and args.concurrency is not None:
        parser.error("--stages gives the number of clients (or the rate, with --rate); drop --concurrency")
    if args.rate == 0.0 and not args.stages:
        parser.error("--rate needs a value (requests a second), unless --stages gives it")
    if args.rate is None and args.concurrency is None and not args.stages:
        args.concurrency = 4
    if args.prompts:
        with open(args.prompts, encoding="utf-8") as file:
            args.prompt_list = [line.strip() for line in file if line.strip()]
        if not args.prompt_list:
            parser.error(f"--prompts {args.prompts}: no prompts in the file")
    else:
        args.prompt_list = PROMPTS
    if args.endpoint == "chat" and args.model == "default":
        args.model = discover_model(args)

    test = LoadTest(args)
    # Ctrl-C (or SIGTERM) ends the run early and still prints the report so far.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    report = test.run()
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 130 if report["interrupted"] else 0


def discover_model(args: argparse.Namespace) -> str:
    client = Client(args)
    try:
        connection = client.connect()
        headers = {k: v for k, v in client.headers.items() if k == "Authorization"}
        connection.request("GET", urlsplit(args.url).path.rstrip("/") + "/v1/models", headers=headers)
        response = connection.getresponse()
        return json.loads(response.read())["data"][0]["id"]
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError) as exc:
        raise SystemExit(f"could not ask {args.url}/v1/models for the model id ({exc}); pass --model") from None
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
