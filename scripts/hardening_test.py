#!/usr/bin/env python3
"""The service's worst minute, on loopback, against the real default model: four bounded scenarios, each on a
`python -m inference` of its own, with a report of figures and a non-zero exit if a promise is broken.

  burst     MAX_CONCURRENT_REQUESTS=2, MAX_QUEUED_REQUESTS=4: 60 requests at once (10x what it holds). At least 6
            (every slot and queue place) are served; only 200, 429 or 503 may come back, every refusal with
            Retry-After and answered in under half the time a served request takes (p99 against p50); the
            process's memory is the same after as before; then it serves normally again.
  fairness  one API key floods 24 requests at once, another sends one a moment later, three times: the other's
            first token must not wait for the flood (its worst wait is reported, and the flood's).
  drain     8 streams in flight, then SIGTERM: /ready turns 503 at once, every stream ends with [DONE], the
            process exits (0 or the re-raised SIGTERM) well within its shutdown timeout.
  redis     closed-loop load with Redis for cache and limits, Redis killed and started again mid-load: no 5xx.
  slow      MAX_CONNECTIONS=100, HEAD_TIMEOUT_SECONDS=3: 400 connections (4x the limit) trickle request heads a
            byte a second, each reopened as soon as the server closes it, for 15 s; meanwhile a normal client
            asks for /health and a short chat on a new connection twice a second. Every normal request must be
            served (200); no trickling connection may live longer than the head timeout (so none holds a file
            descriptor for long), and they must be closed by the server (408, or displaced with a 503).

    python scripts/hardening_test.py [--only burst,drain] [--json report.json]

Needs the test dependencies (httpx) and, for the redis scenario, `redis-server`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("flood-key-0001", "other-key-0002")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _children(pid: int) -> list[int]:
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]


class Server:
    def __init__(self, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"hardening-{self.port}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inference", "--env-file", "/nonexistent"], cwd=ROOT, stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port), "RATE_LIMIT_ENABLED": "false",
                 "CACHE_MODE": "off", "LOG_LEVEL": "WARNING", **env})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)  # a child process starting: nothing to await
        raise RuntimeError("the server was not ready within 180 s")

    def rss_mb(self) -> float:
        """Resident memory of the service: its HTTP process and its children (the engine process)."""
        return sum(_rss_mb(pid) for pid in [self.proc.pid, *_children(self.proc.pid)])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def chat(max_tokens: int, prompt: str = "Tell me about the sea.", stream: bool = False) -> dict[str, Any]:
    return {"model": "default", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": stream}


async def model_id(client: httpx.AsyncClient) -> str:
    return (await client.get("/v1/models")).json()["data"][0]["id"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


# --- scenarios -------------------------------------------------------------------------------------------------------


async def burst(report: dict[str, Any], failures: list[str]) -> None:
    server = Server(MAX_CONCURRENT_REQUESTS="2", MAX_QUEUED_REQUESTS="4", RATE_LIMIT_ENABLED="true",
                    RATE_LIMIT_PER_MINUTE="600", RATE_LIMIT_BURST="40")
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     limits=httpx.Limits(max_connections=100)) as client:
            model = await model_id(client)
            body = {**chat(24), "model": model}
            await client.post("/v1/chat/completions", json=body)  # warm
            before = server.rss_mb()

            async def one() -> tuple[int, float, str | None]:
                started = time.perf_counter()
                response = await client.post("/v1/chat/completions", json=body)
                return response.status_code, time.perf_counter() - started, response.headers.get("retry-after")

            results = await asyncio.gather(*(one() for _ in range(60)))
            await asyncio.sleep(1)
            after = server.rss_mb()
            recovered = (await client.post("/v1/chat/completions", json=body)).status_code
            ready = (await client.get("/ready")).status_code
    finally:
        server.stop()
    counts: dict[str, int] = {}
    for status, _, _ in results:
        counts[str(status)] = counts.get(str(status), 0) + 1
    refusals = [(s, t, r) for s, t, r in results if s in (429, 503)]
    latencies = [t * 1000 for _, t, _ in refusals]
    served = [t * 1000 for s, t, _ in results if s == 200]
    report["burst"] = {"requests": 60, "by_status": counts, "refusal_p50_ms": round(percentile(latencies, 0.5), 1),
                       "refusal_p99_ms": round(percentile(latencies, 0.99), 1),
                       "served_p50_ms": round(percentile(served, 0.5), 1) if served else None,
                       "retry_after": sorted({r for _, _, r in refusals if r}),
                       "rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1),
                       "after_burst": recovered, "ready_after": ready}
    if set(counts) - {"200", "429", "503"}:
        failures.append(f"burst: statuses other than 200/429/503: {counts}")
    if counts.get("200", 0) < 6:  # the room: 2 free slots + 4 queue places (more if some finish mid-burst)
        failures.append(f"burst: fewer served than the 2 slots + 4 queue places hold: {counts}")
    if any(r is None for _, _, r in refusals):
        failures.append("burst: a refusal without Retry-After")
    # Quick means: a small part of what serving takes on the same machine in the same minute. A fixed limit in
    # milliseconds failed now and then on this VM for unchanged code (p99 113-257 ms across runs, limit 250).
    if not refusals or not served or percentile(latencies, 0.99) > percentile(served, 0.5) / 2:
        failures.append(f"burst: refusals were not quick (p99 {percentile(latencies, 0.99):.0f} ms, "
                        f"served p50 {percentile(served, 0.5) if served else 0:.0f} ms)")
    if after - before > 50:
        failures.append(f"burst: memory grew from {before:.0f} to {after:.0f} MB")
    if recovered != 200 or ready != 200:
        failures.append("burst: the service did not recover")


async def fairness(report: dict[str, Any], failures: list[str]) -> None:
    server = Server(MAX_CONCURRENT_REQUESTS="2", MAX_QUEUED_REQUESTS="64", API_KEYS=",".join(KEYS))
    waits: list[float] = []
    flood_waits: list[float] = []
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=300,
                                     limits=httpx.Limits(max_connections=100)) as client:
            headers = [{"Authorization": f"Bearer {key}"} for key in KEYS]
            model = (await client.get("/v1/models", headers=headers[0])).json()["data"][0]["id"]

            async def first_token(key: int, max_tokens: int) -> float:
                started = time.perf_counter()
                async with client.stream("POST", "/v1/chat/completions", headers=headers[key],
                                         json={**chat(max_tokens, stream=True), "model": model}) as response:
                    waited = None
                    async for line in response.aiter_lines():
                        if waited is None and '"content":"' in line and '"content":""' not in line:
                            waited = time.perf_counter() - started
                return waited if waited is not None else time.perf_counter() - started

            for _ in range(3):
                flood = [asyncio.ensure_future(first_token(0, 32)) for _ in range(24)]
                await asyncio.sleep(0.3)  # the flood is queued
                waits.append(await first_token(1, 8))
                flood_waits += await asyncio.gather(*flood)
    finally:
        server.stop()
    report["fairness"] = {"other_client_worst_first_token_s": round(max(waits), 2),
                          "other_client_first_token_s": [round(w, 2) for w in waits],
                          "flood_median_first_token_s": round(statistics.median(flood_waits), 2),
                          "flood_worst_first_token_s": round(max(flood_waits), 2)}
    if max(waits) >= statistics.median(flood_waits):
        failures.append(f"fairness: the other client waited {max(waits):.1f} s, as long as the flood's median")


async def drain(report: dict[str, Any], failures: list[str]) -> None:
    server = Server(DRAIN_DELAY_SECONDS="1", SHUTDOWN_TIMEOUT_SECONDS="60", MAX_CONCURRENT_REQUESTS="8")
    ends: list[str] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        model = await model_id(client)

        async def stream() -> None:
            last = ""
            async with client.stream("POST", "/v1/chat/completions",
                                     json={**chat(80, stream=True), "model": model}) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        last = line
            ends.append(last)

        tasks = [asyncio.ensure_future(stream()) for _ in range(8)]
        await asyncio.sleep(1.0)
        in_flight = 8 - len(ends)
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        ready = None
        while ready is None or ready == 200:
            ready = (await client.get("/ready")).status_code
        await asyncio.gather(*tasks)
    code = await asyncio.to_thread(server.proc.wait, 90)
    elapsed = time.monotonic() - sent
    server.stop()
    completed = sum(end == "data: [DONE]" for end in ends)
    report["drain"] = {"in_flight_at_sigterm": in_flight, "completed": completed, "ready_during_drain": ready,
                       "exit_code": code, "seconds_to_exit": round(elapsed, 1)}
    if completed != 8 or ready != 503 or code not in (0, -signal.SIGTERM) or elapsed > 60:
        failures.append(f"drain: {report['drain']}")


async def redis_restart(report: dict[str, Any], failures: list[str]) -> None:
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        report["redis"] = "skipped: no redis-server"
        return
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    redis = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Server(REDIS_URL=f"redis://127.0.0.1:{port}/0", CACHE_MODE="all", RATE_LIMIT_ENABLED="true",
                    RATE_LIMIT_PER_MINUTE="100000", MAX_CONCURRENT_REQUESTS="4")
    counts: dict[str, int] = {}
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            model = await model_id(client)
            stop = time.monotonic() + 9

            async def worker(n: int) -> None:
                i = 0
                while time.monotonic() < stop:
                    body = {**chat(4, prompt=f"Say {n}-{i % 5}."), "model": model, "temperature": 0}
                    status = (await client.post("/v1/chat/completions", json=body)).status_code
                    counts[str(status)] = counts.get(str(status), 0) + 1
                    i += 1

            load = asyncio.gather(*(worker(n) for n in range(4)))
            await asyncio.sleep(3)
            redis.kill()
            redis.wait()
            await asyncio.sleep(3)
            redis = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await load
            store = (await client.get("/ready")).json().get("store")
    finally:
        server.stop()
        redis.kill()
        redis.wait()
    report["redis"] = {"by_status": counts, "store_after": store}
    if any(status.startswith("5") for status in counts) or counts.get("200", 0) == 0:
        failures.append(f"redis: {counts}")


async def slow_clients(report: dict[str, Any], failures: list[str]) -> None:
    limit, head_timeout, attackers, seconds = 100, 3.0, 400, 15.0
    server = Server(MAX_CONNECTIONS=str(limit), HEAD_TIMEOUT_SECONDS=str(head_timeout))
    closed: dict[str, int] = {}
    lifetimes: list[float] = []
    opened = 0
    stop = asyncio.Event()

    async def trickle() -> None:
        nonlocal opened
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            except OSError:
                closed["connect_error"] = closed.get("connect_error", 0) + 1
                await asyncio.sleep(0.1)
                continue
            opened += 1
            born = time.monotonic()
            head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 1000
            answer = b""
            try:
                for byte in head:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    try:
                        answer = await asyncio.wait_for(reader.read(4096), timeout=1.0)
                    except asyncio.TimeoutError:
                        if stop.is_set():
                            break
                        continue
                    break  # the server answered (or closed): this connection is over
            except OSError:
                answer = b"reset"
            status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/1.1 ") else (
                "closed" if answer in (b"", b"reset") else "other")
            closed[status] = closed.get(status, 0) + 1
            if status != "other" and not stop.is_set():
                lifetimes.append(time.monotonic() - born)
            writer.close()

    def open_files() -> int:
        return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in [server.proc.pid, *_children(server.proc.pid)])

    try:
        baseline_files = open_files()
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as warm:
            model = await model_id(warm)
        tasks = [asyncio.create_task(trickle()) for _ in range(attackers)]
        await asyncio.sleep(head_timeout / 2)  # the flood is on
        latencies: list[float] = []
        statuses: dict[str, int] = {}
        most_files = 0
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            # A new connection each time (no keep-alive), as a client arriving during the flood would.
            async with httpx.AsyncClient(base_url=server.url, timeout=30,
                                         limits=httpx.Limits(max_keepalive_connections=0)) as client:
                for path, body in (("/health", None), ("/v1/chat/completions", {**chat(8), "model": model})):
                    begun = time.perf_counter()
                    try:
                        response = await (client.get(path) if body is None else client.post(path, json=body))
                        status = str(response.status_code)
                    except httpx.TransportError as exc:
                        status = type(exc).__name__
                    latencies.append((time.perf_counter() - begun) * 1000)
                    statuses[status] = statuses.get(status, 0) + 1
            most_files = max(most_files, open_files())
            await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)
        await asyncio.sleep(1)
        after_files = open_files()
        ready = httpx.get(f"{server.url}/ready", timeout=10).status_code
    finally:
        server.stop()
    normal = sum(statuses.values())
    report["slow"] = {"max_connections": limit, "head_timeout_s": head_timeout, "trickling_clients": attackers,
                      "trickling_connections_opened": opened, "trickling_connections_ended": closed,
                      "normal_requests": normal, "normal_by_status": statuses,
                      "normal_p50_ms": round(percentile(latencies, 0.5), 1),
                      "normal_max_ms": round(max(latencies, default=0), 1),
                      "trickler_longest_life_s": round(max(lifetimes, default=0), 2),
                      "open_files_before": baseline_files, "open_files_most": most_files,
                      "open_files_after": after_files, "ready_after": ready}
    if statuses.get("200", 0) != normal or normal == 0:
        failures.append(f"slow: a normal client was not served during the flood: {statuses}")
    if max(lifetimes, default=0) > head_timeout + 1:
        failures.append(f"slow: a trickling connection lived {max(lifetimes):.1f} s (head timeout {head_timeout} s)")
    if not closed.get("408"):
        failures.append(f"slow: tricklers were not closed by the head timeout and the limit: {closed}")
    if after_files > baseline_files + 10 or ready != 200:
        failures.append(f"slow: the server did not return to normal ({after_files} open files, /ready {ready})")


SCENARIOS = {"burst": burst, "fairness": fairness, "drain": drain, "redis": redis_restart, "slow": slow_clients}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated scenarios: " + ", ".join(SCENARIOS))
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else list(SCENARIOS)
    report: dict[str, Any] = {}
    failures: list[str] = []
    for name in chosen:
        started = time.monotonic()
        asyncio.run(SCENARIOS[name](report, failures))
        print(f"{name} ({time.monotonic() - started:.0f} s): {json.dumps(report[name])}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
