#!/usr/bin/env python3
"""The OpenAI fields that cost something on the embedded engine: structured output, logprobs and n.

  1. speed: the same chat prompt at temperature 0.8 with the same seeds, free, under a json_schema grammar, and
     free with logprobs (top 5), alternating, --runs each; completion tokens per second from the first token to
     the end of the answer (the tokens after the first over that time: prompt time apart), and the ratios to free;
     decode steps per second as a second column (an answer that stopped also counts the step that sampled its
     end, which a short answer would otherwise hide) (the grammar is checked on the sampled token only, and applied to
     the whole vocabulary only when it rejects it; logprobs are a log-softmax over the vocabulary per token);
  2. validity: 20 prompts under a json_schema, temperature 0: how many answers finish with "stop" and how many
     of those validate against the schema (must be all of them), and how many were cut by max_tokens;
  3. n: a long prompt (a ~700-token system message) answered with n=4 choices (one prompt evaluation, copied to
     the other three) against four concurrent requests for it (each evaluating it), from cold slots: time until
     every choice has its first token, and the whole time for 16 tokens each.

In process (no HTTP), on the default model unless --model names another GGUF file:

    python scripts/bench_structured.py [--runs 8] [--max-tokens 120] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LIST_SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}}},
               "required": ["items"], "additionalProperties": False}
CITY_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "country", "population"],
               "properties": {"name": {"type": "string", "maxLength": 60}, "country": {"type": "string", "maxLength": 60},
                              "population": {"type": "integer"}}}
PLACES = ["Paris", "Rome", "Tokyo", "Cairo", "Lima", "Oslo", "Nairobi", "Toronto", "Madrid", "Berlin", "Sydney",
          "Mumbai", "Seoul", "Dublin", "Vienna", "Lisbon", "Athens", "Bangkok", "Havana", "Prague"]


async def run(args: argparse.Namespace) -> dict:
    from inference.config import Settings
    from inference.engine.base import ChatMessage, GenerationRequest, SamplingParams
    from inference.engine.llama.engine import LlamaEngine
    from inference.engine.llama.models import resolve_model
    from inference.serving.structured import parse_response_format

    model = args.model or resolve_model(None, Settings.from_env({}, env_file=None).model_cache_dir)[0]
    engine = LlamaEngine(model, n_ctx=2048, max_concurrent=1)
    wide = LlamaEngine(model, n_ctx=2048, max_concurrent=4)
    engine.load()
    listing = parse_response_format({"type": "json_schema", "json_schema": {"name": "list", "schema": LIST_SCHEMA}})
    city = parse_response_format({"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}})

    async def generate(prompt: str, grammar: str | None, seed: int, temperature: float,
                       logprobs: int | None = None) -> tuple[str, object, float]:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=temperature, seed=seed, grammar=grammar,
                                logprobs=logprobs)
        generation = await engine.generate(GenerationRequest(params=params, messages=(ChatMessage("user", prompt),)))
        first = None
        pieces = []
        async for piece in generation:
            pieces.append(piece)
            first = first or time.perf_counter()
        return "".join(pieces), generation, time.perf_counter() - (first or time.perf_counter())

    try:
        speeds: dict[str, list[float]] = {"free": [], "json_schema": [], "logprobs": []}
        steps_per_second: dict[str, list[float]] = {"free": [], "json_schema": [], "logprobs": []}
        for seed in range(args.runs):
            for label, grammar, logprobs in (("free", None, None), ("json_schema", listing.grammar, None),
                                             ("logprobs", None, 5)):
                _, generation, seconds = await generate("List many fruits as JSON.", grammar, seed, 0.8, logprobs)
                # Tokens after the first, over the time from the first to the end; decode steps also count the
                # one that sampled the end of the answer when it stopped.
                tokens = generation.completion_tokens - 1
                steps = tokens + (generation.finish_reason == "stop")
                if seconds > 0 and tokens > 0:
                    speeds[label].append(tokens / seconds)
                    steps_per_second[label].append(steps / seconds)
            print(f"  run {seed + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in speeds.items()) + " tok/s",
                  file=sys.stderr, flush=True)
        stops = valid = cut = 0
        for place in PLACES:
            text, generation, _ = await generate(f"Facts about {place} as JSON.", city.grammar, 0, 0.0)
            if generation.finish_reason == "stop":
                stops += 1
                valid += city.violation(text) is None
            else:
                cut += 1
    finally:
        engine.shutdown()
    wide.load()
    try:
        choices = await _choices(wide, args.runs)
    finally:
        wide.shutdown()
    free, constrained = statistics.median(speeds["free"]), statistics.median(speeds["json_schema"])
    with_logprobs = statistics.median(speeds["logprobs"])
    steps = {f"{label}_steps_per_s": statistics.median(values) for label, values in steps_per_second.items()}
    return {"model": str(model), "runs": args.runs, "free_tps": free, "json_schema_tps": constrained,
            "ratio": constrained / free, "logprobs_tps": with_logprobs, "logprobs_ratio": with_logprobs / free,
            **steps, "steps_ratio": steps["json_schema_steps_per_s"] / steps["free_steps_per_s"],
            "prompts": len(PLACES), "finished": stops, "valid": valid, "cut": cut, **choices}


async def _choices(engine, runs: int) -> dict:
    """n=4 (one prompt evaluation) against four separate requests, medians over `runs`, each from cold slots."""
    from inference.engine.base import ChatMessage, GenerationRequest, SamplingParams

    async def timed(generation, started: float) -> float:
        first = None
        async for _ in generation:
            first = first or time.perf_counter()
        return (first or time.perf_counter()) - started

    results: dict[str, list[tuple[float, float]]] = {"n4": [], "separate": []}
    for run in range(runs):
        # A different system message each run, so no slot holds its prefix from an earlier one.
        system = f"Run {run}. " + " ".join(f"Rule {i}: answer briefly and politely, in English." for i in range(70))
        request = GenerationRequest(SamplingParams(max_tokens=16, temperature=0.8, seed=run),
                                    messages=(ChatMessage("system", system), ChatMessage("user", "Name a fruit.")))
        for label in ("n4", "separate") if run % 2 == 0 else ("separate", "n4"):
            varied = GenerationRequest(request.params, messages=(ChatMessage("system", label + system),
                                                                  request.messages[1]))
            started = time.perf_counter()
            generations = (await engine.generate_many(varied, 4) if label == "n4"
                           else [await engine.generate(varied) for _ in range(4)])
            firsts = await asyncio.gather(*(timed(g, started) for g in generations))
            results[label].append((max(firsts), time.perf_counter() - started))
    summary = {}
    for label, pairs in results.items():
        summary[f"{label}_first_tokens_s"] = statistics.median(p[0] for p in pairs)
        summary[f"{label}_total_s"] = statistics.median(p[1] for p in pairs)
    return summary


def compare_engines(args: argparse.Namespace) -> int:
    """Each engine in a process of its own (grammar_engines.worker): schemas enforced of N, invalid outputs (must be
    0), tokens/s under its grammar against free generation (same prompts, same process, temperature 0), compile
    time p50/p99, the memory compiling the corpus took."""
    import subprocess

    from inference.config import Settings
    from inference.engine.llama.models import resolve_model

    settings = Settings.from_env({}, env_file=None)
    model = args.model or resolve_model(settings.model_path, settings.model_cache_dir)[0]
    results = []
    for name in args.engines.split(","):
        site = f"sys.path.append({str(args.xgrammar_site)!r}); " if name == "xgrammar" and args.xgrammar_site else ""
        code = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'scripts')!r}); "
                f"{site}from grammar_engines import worker; "
                f"print(json.dumps(worker({name!r}, {str(args.corpus)!r}, {str(model)!r}, {args.generate}, "
                f"{args.max_tokens})))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            results.append({"engine": name, "error": done.stderr[-500:]})
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        print(f"{name:10s} enforced {result['enforced']}/{result['schemas']}, generated {result['generated']} "
              f"(finished {result['finished']}, invalid {result['invalid']}), {result['tokens_per_second']} tokens/s "
              f"vs {result['free_tokens_per_second']} free ({result['ratio']:.2f}x), compile p50 "
              f"{result['compile_ms_p50']} ms p99 {result['compile_ms_p99']} ms, +{result['compile_rss_mb']} MB",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if all(r.get("invalid", 1) == 0 for r in results if r["engine"] == "llguidance") else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="GGUF file (default: the default model)")
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=120)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--corpus", type=Path, help="compare the grammar engines on this corpus (JSON lines from "
                        "scripts/schema_corpus.py) instead of the measurements above")
    parser.add_argument("--engines", default="gbnf,llguidance,xgrammar")
    parser.add_argument("--generate", type=int, default=40, help="schemas per engine to generate under")
    parser.add_argument("--xgrammar-site", type=Path, help="a site-packages folder with xgrammar and torch")
    args = parser.parse_args()
    if args.corpus:
        return compare_engines(args)
    result = asyncio.run(run(args))
    print(f"completion tokens/s, medians of {result['runs']} runs: free {result['free_tps']:.1f}, "
          f"json_schema {result['json_schema_tps']:.1f} ({result['ratio']:.2f}x), "
          f"logprobs top 5 {result['logprobs_tps']:.1f} ({result['logprobs_ratio']:.2f}x)")
    print(f"decode steps/s: free {result['free_steps_per_s']:.1f}, json_schema {result['json_schema_steps_per_s']:.1f} "
          f"({result['steps_ratio']:.2f}x), logprobs top 5 {result['logprobs_steps_per_s']:.1f}")
    print(f"a ~700-token prompt, 4 answers of 16 tokens: n=4 every first token after "
          f"{1000 * result['n4_first_tokens_s']:.0f} ms, all done {1000 * result['n4_total_s']:.0f} ms; four requests "
          f"{1000 * result['separate_first_tokens_s']:.0f} ms / {1000 * result['separate_total_s']:.0f} ms")
    print(f"json_schema answers on {result['prompts']} prompts: {result['finished']} finished, {result['valid']} of "
          f"them valid ({100 * result['valid'] / max(1, result['finished']):.0f}%), {result['cut']} cut by max_tokens")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["valid"] == result["finished"] else 1


if __name__ == "__main__":
    sys.exit(main())
