#!/usr/bin/env python3
"""The embedded engine's speed against the machine's ceiling and its peers, in interleaved rounds.

Rows (every prompt runs to --max-tokens: "Count from 1 to 1000: 1, 2, 3, 4, 5," at temperature 0, each with a
prefix of its own, "Run 3, stream 5.", so no stream reuses another's prompt; all rows greedy):
  loop     the bare low-level loop, no HTTP (the ceiling): each prompt decoded, then one llama_decode of all
           sequences per step, argmax; flash attention on; timed from the first prompt to the last token;
           in a process of its own, each round;
  api      llama-cpp-python's Llama.create_completion, streaming, one stream, flash attention on; in a process of
           its own, each round;
  service  this service (`python -m inference`, started once), 1/2/4/8 concurrent streamed /v1/completions
           requests (flash attention on);
  compare  with --compare URL, any other OpenAI-compatible server measured like the service (llama.cpp's
           `llama-server --parallel 8 -fa on`, built from the llama.cpp vendored in llama-cpp-python's sdist:
           `cmake -B build && cmake --build build --target llama-server`).
Each round measures every row once, in that order, so a noisy minute hits all of them; figures are medians over
the rounds, and ratios are medians of per-round ratios. Cells: aggregate completion tokens/s (all streams' tokens
over the wave's wall time), time to first token p50/p95. Then the resident memory (RSS, and PSS: shared pages
divided among the processes mapping them) of the service's HTTP and engine processes, and the prefix cache: TTFT of
chat requests whose system message is reused from the KV cache vs made unique.

    python scripts/bench_engine.py [--max-tokens 128] [--rounds 3] [--compare http://127.0.0.1:8080] [--json F]

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


def api_row(model: Path, threads: int, max_tokens: int, run: int) -> dict:
    """llama-cpp-python's own API, one stream, as its users call it (flash attention on, as the service)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), n_ctx=2048, n_threads=threads, n_threads_batch=threads, flash_attn=True,
                verbose=False)
    llm.create_completion("Warm up:", max_tokens=4, temperature=0)
    started = time.perf_counter()
    first, finish = None, None
    for chunk in llm.create_completion(PROMPT.format(run=run, stream=0), max_tokens=max_tokens, temperature=0,
                                       stream=True):
        if first is None:
            first = time.perf_counter() - started
        finish = chunk["choices"][0]["finish_reason"] or finish
    total = time.perf_counter() - started
    if finish != "length":
        raise SystemExit(f"the Llama API stopped early ({finish}); the benchmark needs answers of max_tokens")
    return {"1": wave_figures([(first, total, max_tokens)], total)}


def loop_row(model: Path, threads: int, max_tokens: int, run: int, levels: list[int]) -> dict:
    """The bare loop over llama.cpp's low-level API: the context the service makes (a KV stream of 2048 tokens per
    sequence, flash attention), each prompt decoded, then one batch of every sequence per step, argmax."""
    import numpy as np
    from llama_cpp import llama_cpp as C

    from inference.engine.llama.native import load_model

    model_ = load_model(model)
    slots = max(levels)
    params = C.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 2048 * slots, 512, 512, slots
    params.kv_unified = False
    params.n_threads = params.n_threads_batch = threads
    params.no_perf = True
    params.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_ENABLED
    ctx = C.llama_init_from_model(model_.model, params)
    memory = C.llama_get_memory(ctx)
    batch = C.llama_batch_init(512, 0, 1)
    n_vocab = model_.n_vocab()

    def decode(rows: list[tuple[int, int, int, bool]]) -> None:
        batch.n_tokens = len(rows)
        for i, (token, position, seq, logits) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, position, 1, logits
            batch.seq_id[i][0] = seq
        if C.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")

    def argmax(row: int) -> int:
        return int(np.ctypeslib.as_array(C.llama_get_logits_ith(ctx, row), shape=(n_vocab,)).argmax())

    decode([(t, i, 0, False) for i, t in enumerate(model_.tokenize(b"Warm up:", add_bos=True, special=False))])
    figures = {}
    for n in levels:
        C.llama_memory_clear(memory, True)
        prompts = [model_.tokenize(PROMPT.format(run=run, stream=i).encode(), add_bos=True, special=False)
                   for i in range(n)]
        started = time.perf_counter()
        firsts, pending, positions = [], [], []
        for seq, tokens in enumerate(prompts):
            decode([(t, i, seq, i == len(tokens) - 1) for i, t in enumerate(tokens)])
            pending.append(argmax(len(tokens) - 1))
            positions.append(len(tokens))
            firsts.append(time.perf_counter() - started)
        for _ in range(max_tokens - 1):
            decode([(pending[seq], positions[seq], seq, True) for seq in range(n)])
            for seq in range(n):
                pending[seq] = argmax(seq)
                positions[seq] += 1
        wall = time.perf_counter() - started
        figures[str(n)] = wave_figures([(first, wall, max_tokens) for first in firsts], wall)
    C.llama_batch_free(batch)
    C.llama_free(ctx)
    return figures


def in_child(kind: str, args: argparse.Namespace, model: Path, run: int) -> dict:
    """Run one row in a process of its own (its threads and memory never meet the service's); its figures."""
    command = [sys.executable, __file__, "--child", kind, "--model", str(model), "--threads", str(args.threads),
               "--max-tokens", str(args.max_tokens), "--streams", args.streams, "--run", str(run)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {kind} row failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def memory(pid: int) -> dict:
    """RSS and PSS in MB of a process (PSS: pages shared with other processes counted by their share)."""
    figures = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                figures[key.lower() + "_mb"] = int(rest.split()[0]) / 1024
    return figures


def engine_child(pid: int) -> int | None:
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in f.read().split():
                with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                    if b"inference.engine.llama.worker" in cmdline.read():
                        return int(child)
    return None


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


def measure_server(client: OpenAIClient, levels: list[int], max_tokens: int, run: int, label: str) -> dict:
    figures = {}
    for streams in levels:
        figures[str(streams)] = client.wave(run * 100 + streams, streams, max_tokens)
        print(f"  {label} {streams} streams: {figures[str(streams)]['aggregate_tps']:.1f} tok/s", file=sys.stderr,
              flush=True)
    return figures


def median_of(waves: list[dict]) -> dict:
    return {key: statistics.median(w[key] for w in waves) for key in waves[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="GGUF file (default: the default model)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", default="1,2,4,8", help="concurrency levels (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--compare", metavar="URL", help="another OpenAI-compatible server to measure the same way")
    parser.add_argument("--compare-label", default="llama-server --parallel 8 -fa on",
                        help="what --compare is, for the table (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--child", choices=("loop", "api"), help=argparse.SUPPRESS)
    parser.add_argument("--run", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    levels = [int(x) for x in args.streams.split(",")]

    from inference.config import Settings
    from inference.engine.llama.models import resolve_model

    model = args.model or resolve_model(None, Settings.from_env({}, env_file=None).model_cache_dir)[0]
    if args.child == "loop":
        print(json.dumps(loop_row(model, args.threads, args.max_tokens, args.run, levels)))
        return 0
    if args.child == "api":
        print(json.dumps(api_row(model, args.threads, args.max_tokens, args.run)))
        return 0

    process, url = start_service(args.threads, max(levels))
    results: dict = {"model": str(model), "max_tokens": args.max_tokens, "rounds": args.rounds,
                     "threads": args.threads, "levels": levels, "per_round": [],
                     "compare_label": args.compare_label if args.compare else None}
    try:
        client = OpenAIClient(url)
        client.wave(999, 1, 8)  # warm up
        compare = OpenAIClient(args.compare) if args.compare else None
        if compare is not None:
            compare.wave(999, 1, 8)
        for run in range(args.rounds):
            print(f"round {run + 1} of {args.rounds}", file=sys.stderr, flush=True)
            figures = {"loop": in_child("loop", args, model, run), "api": in_child("api", args, model, run)}
            loop = ", ".join(f"{k}: {v['aggregate_tps']:.1f}" for k, v in figures["loop"].items())
            print(f"  loop: {loop} tok/s; api: {figures['api']['1']['aggregate_tps']:.1f} tok/s", file=sys.stderr,
                  flush=True)
            figures["service"] = measure_server(client, levels, args.max_tokens, run, "service")
            if compare is not None:
                figures["compare"] = measure_server(compare, levels, args.max_tokens, run, "compare")
            results["per_round"].append(figures)
        engine = engine_child(process.pid)
        results["memory"] = {"http": memory(process.pid), "engine": memory(engine) if engine else None}
        client.chat_ttft(SYSTEM, "Hello")  # the default system prompt is now in a slot's cache
        reused = [client.chat_ttft(SYSTEM, q) for q in QUESTIONS]
        fresh = [client.chat_ttft(f"{SYSTEM} (#{i})", q) for i, q in enumerate(QUESTIONS)]
        results["prefix_cache"] = {"ttft_reused_p50": statistics.median(reused),
                                   "ttft_not_reused_p50": statistics.median(fresh)}
    finally:
        process.terminate()
        process.wait(timeout=60)
    summarize(results)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


def summarize(results: dict) -> None:
    """Medians over the rounds of every figure, and of the per-round ratios of the service to the other rows."""
    rounds = results["per_round"]
    rows = [row for row in ("loop", "api", "service", "compare") if row in rounds[0]]
    results["median"] = {row: {level: median_of([r[row][level] for r in rounds]) for level in rounds[0][row]}
                         for row in rows}
    ratios: dict = {}
    for row in ("loop", "api", "compare"):
        if row not in rounds[0]:
            continue
        for level in rounds[0][row]:
            ratios[f"service/{row} {level}"] = statistics.median(
                r["service"][level]["aggregate_tps"] / r[row][level]["aggregate_tps"] for r in rounds)
    results["ratios"] = ratios


def print_table(results: dict) -> None:
    median = results["median"]
    print(f"model {Path(results['model']).name}, {results['max_tokens']} tokens per answer, {results['threads']} "
          f"threads, greedy, medians of {results['rounds']} interleaved rounds")
    print(f"{'':34} {'streams':>7} {'tok/s (all)':>12} {'TTFT p50':>9} {'TTFT p95':>9}")
    names = {"loop": "bare loop (no HTTP), flash attn on", "api": "Llama API, streaming, flash attn on",
             "service": "this service, flash attn on", "compare": "compare (" + (results.get("compare_label") or "--compare") + ")"}
    for row in ("loop", "api", "service", "compare"):
        for level, f in median.get(row, {}).items():
            print(f"{names[row]:34} {level:>7} {f['aggregate_tps']:>12.1f} {f['ttft_p50'] * 1000:>7.0f}ms "
                  f"{f['ttft_p95'] * 1000:>7.0f}ms")
    print("service vs (median of per-round ratios): " + ", ".join(
        f"{key.split('/')[1]}: {value:.2f}x" for key, value in results["ratios"].items()))
    mem = results["memory"]
    engine = mem["engine"] or {}
    print(f"memory: HTTP process RSS {mem['http']['rss_mb']:.0f} MB (PSS {mem['http']['pss_mb']:.0f}); engine process "
          f"RSS {engine.get('rss_mb', 0):.0f} MB (PSS {engine.get('pss_mb', 0):.0f})")
    cache = results["prefix_cache"]
    print(f"chat TTFT p50, default system prompt reused from the KV cache: {cache['ttft_reused_p50'] * 1000:.0f} ms; "
          f"not reused: {cache['ttft_not_reused_p50'] * 1000:.0f} ms")


if __name__ == "__main__":
    sys.exit(main())
