#!/usr/bin/env python3
"""The embedded engine's speed, in one run on one model file: llama-cpp-python alone vs this service, 1-8 streams.

  (a) raw: llama-cpp-python's Llama.create_completion, streaming, in this process, one stream;
  (b) this service (`python -m inference`, started here) with 1 stream, then (c) 2, 4 and 8 concurrent streams,
      each a streamed /v1/completions request;
  (d) with --compare URL, the same client against any other OpenAI-compatible server (llama.cpp's llama-server
      --parallel 8, vLLM, ...): its first model, the same prompts.
Every prompt runs to --max-tokens ("Count from 1 to 1000: 1, 2, 3, 4, 5," at temperature 0), so early stops cannot flatter
tokens/s, and starts with a prefix of its own ("Run 3, stream 5."), so no stream reuses another's prompt.
Each cell is the median of --repeats waves: aggregate completion tokens/s (all streams' tokens / the wave's wall
time), time to first token p50/p95 over the wave's streams, per-stream tokens/s; ratios are to (a).

Then the prefix cache: time to first token of /api/v1/infer-style chat requests whose system message is the
default one (reused from the KV cache after the first) vs. one made unique per request (never reused).

    python scripts/bench_engine.py [--max-tokens 128] [--repeats 3] [--threads 2] [--json bench.json]

Prints a table; --json also writes every figure. Needs the `llama` extra; standard library otherwise.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = "Run {run}, stream {stream}. Count from 1 to 1000: 1, 2, 3, 4, 5,"
SYSTEM = "You are a helpful assistant. Give short, factual answers."
QUESTIONS = ["What is 2+2?", "Name a colour.", "What is the capital of Italy?", "Name a planet.",
             "What is 3 times 3?", "Name a fruit.", "What is the opposite of hot?", "Name an ocean."]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_engine(model: Path, threads: int, max_tokens: int, repeats: int) -> list[dict]:
    """llama-cpp-python's own API, one stream, as its users call it."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.create_completion("Warm up:", max_tokens=4, temperature=0)
    waves = []
    for run in range(repeats):
        started = time.perf_counter()
        first, finish, chunks = None, None, 0
        for chunk in llm.create_completion(PROMPT.format(run=run, stream=0), max_tokens=max_tokens,
                                           temperature=0, stream=True):
            chunks += 1
            if first is None:
                first = time.perf_counter() - started
            finish = chunk["choices"][0]["finish_reason"] or finish
        total = time.perf_counter() - started
        if finish != "length":
            raise SystemExit(f"the raw engine stopped early ({finish}); the benchmark needs answers of max_tokens")
        waves.append(wave_figures([(first, total, max_tokens)], total))
    del llm
    return waves


def wave_figures(streams: list[tuple[float, float, int]], wall: float) -> dict:
    tokens = sum(n for _, _, n in streams)
    return {"streams": len(streams), "aggregate_tps": tokens / wall,
            "ttft_p50": percentile([f for f, _, _ in streams], 50), "ttft_p95": percentile([f for f, _, _ in streams], 95),
            "per_stream_tps": statistics.median(n / t for _, t, n in streams)}


class OpenAIClient:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.base = parts.hostname, parts.port or 80, parts.path.rstrip("/")
        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        connection.request("GET", self.base + "/v1/models")
        self.model = json.loads(connection.getresponse().read())["data"][0]["id"]
        connection.close()

    def stream(self, path: str, body: dict) -> tuple[float, float, int]:
        """(time to first token, total time, completion tokens) of one streamed request."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=600)
        started = time.perf_counter()
        connection.request("POST", self.base + path, json.dumps({
            **body, "model": self.model, "stream": True, "stream_options": {"include_usage": True}}),
            {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise SystemExit(f"{path}: {response.status} {response.read()[:300]!r}")
        first, tokens, finish = None, 0, None
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            for choice in chunk.get("choices") or []:
                text = choice.get("text") or (choice.get("delta") or {}).get("content")
                if text and first is None:
                    first = time.perf_counter() - started
                finish = choice.get("finish_reason") or finish
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        total = time.perf_counter() - started
        connection.close()
        return first if first is not None else total, total, tokens

    def wave(self, run: int, streams: int, max_tokens: int) -> dict:
        bodies = [{"prompt": PROMPT.format(run=run, stream=i), "max_tokens": max_tokens, "temperature": 0}
                  for i in range(streams)]
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(streams) as pool:
            results = list(pool.map(lambda body: self.stream("/v1/completions", body), bodies))
        wall = time.perf_counter() - started
        short = [n for _, _, n in results if n != max_tokens]
        if short:
            raise SystemExit(f"a stream stopped before max_tokens ({short}); the benchmark needs full-length answers")
        return wave_figures(results, wall)

    def chat_ttft(self, system: str, question: str) -> float:
        body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
                "max_tokens": 1, "temperature": 0}
        return self.stream("/v1/chat/completions", body)[0]


def start_service(threads: int, slots: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "RATE_LIMIT_ENABLED": "false", "CACHE_MODE": "off",
           "N_THREADS": str(threads), "MAX_CONCURRENT_REQUESTS": str(slots), "LOG_LEVEL": "WARNING",
           "SYSTEM_PROMPT": SYSTEM}
    process = subprocess.Popen([sys.executable, "-m", "inference"], env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/ready")
            if connection.getresponse().status == 200:
                return process, url
        except OSError:
            pass
        if process.poll() is not None:
            raise SystemExit("the service exited during start-up")
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the service did not become ready")


def measure_server(client: OpenAIClient, levels: list[int], max_tokens: int, repeats: int, label: str) -> dict:
    client.wave(999, 1, 8)  # warm up
    figures = {}
    for streams in levels:
        waves = []
        for run in range(repeats):
            waves.append(client.wave(run * 100 + streams, streams, max_tokens))
            print(f"  {label} {streams} streams, run {run + 1}: {waves[-1]['aggregate_tps']:.1f} tok/s",
                  file=sys.stderr, flush=True)
        figures[streams] = median_of(waves)
    return figures


def median_of(waves: list[dict]) -> dict:
    return {key: statistics.median(w[key] for w in waves) for key in waves[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="GGUF file (default: the default model)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--streams", default="1,2,4,8", help="concurrency levels (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--compare", metavar="URL", help="another OpenAI-compatible server to measure the same way")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    levels = [int(x) for x in args.streams.split(",")]

    from inference.config import Settings
    from inference.models import resolve_model

    model = args.model or resolve_model(None, Settings.from_env({}, env_file=None).model_cache_dir)[0]
    print(f"raw llama-cpp-python, {args.threads} threads", file=sys.stderr, flush=True)
    raw = median_of(raw_engine(model, args.threads, args.max_tokens, args.repeats))
    results: dict = {"model": str(model), "max_tokens": args.max_tokens, "repeats": args.repeats,
                     "threads": args.threads, "raw": raw}

    process, url = start_service(args.threads, max(levels))
    try:
        client = OpenAIClient(url)
        results["service"] = measure_server(client, levels, args.max_tokens, args.repeats, "service")
        client.chat_ttft(SYSTEM, "Hello")  # the default system prompt is now in a slot's cache
        reused = [client.chat_ttft(SYSTEM, q) for q in QUESTIONS]
        fresh = [client.chat_ttft(f"{SYSTEM} (#{i})", q) for i, q in enumerate(QUESTIONS)]
        results["prefix_cache"] = {"ttft_reused_p50": statistics.median(reused),
                                   "ttft_not_reused_p50": statistics.median(fresh)}
    finally:
        process.terminate()
        process.wait(timeout=60)
    if args.compare:
        results["compare"] = {"url": args.compare, **{str(k): v for k, v in measure_server(
            OpenAIClient(args.compare), levels, args.max_tokens, args.repeats, "compare").items()}}

    print_table(results, levels)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


def print_table(results: dict, levels: list[int]) -> None:
    raw = results["raw"]["aggregate_tps"]
    print(f"model {Path(results['model']).name}, {results['max_tokens']} tokens per answer, {results['threads']} "
          f"threads, medians of {results['repeats']} runs")
    print(f"{'':24} {'streams':>7} {'tok/s (all)':>12} {'vs raw':>7} {'TTFT p50':>9} {'TTFT p95':>9} {'tok/s each':>11}")

    def row(name: str, f: dict) -> None:
        print(f"{name:24} {f['streams']:>7} {f['aggregate_tps']:>12.1f} {f['aggregate_tps'] / raw:>6.2f}x "
              f"{f['ttft_p50'] * 1000:>7.0f}ms {f['ttft_p95'] * 1000:>7.0f}ms {f['per_stream_tps']:>11.1f}")

    row("llama-cpp-python (raw)", results["raw"])
    for streams in levels:
        row("this service", results["service"][streams])
    for key in [k for k in results.get("compare", {}) if k != "url"]:
        row("compare", results["compare"][key])
    single = results["service"][levels[0]]["ttft_p50"]
    top = results["service"][levels[-1]]["ttft_p50"]
    print(f"TTFT p50 at {levels[-1]} streams: {top * 1000:.0f} ms = {top / single:.1f}x the single-stream TTFT")
    cache = results["prefix_cache"]
    print(f"chat TTFT p50, default system prompt reused from the KV cache: {cache['ttft_reused_p50'] * 1000:.0f} ms; "
          f"not reused: {cache['ttft_not_reused_p50'] * 1000:.0f} ms")


if __name__ == "__main__":
    sys.exit(main())
