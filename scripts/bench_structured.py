#!/usr/bin/env python3
"""Structured output on the embedded engine: its speed against free text, and how often answers validate.

  1. speed: the same chat prompt at temperature 0.8 with the same seeds, once free and once under a json_schema
     grammar, alternating, --runs each; completion tokens/s from the first token to the last (prompt time apart),
     and the ratio (the grammar is checked on the sampled token only, and applied to the whole vocabulary only
     when it rejects it);
  2. validity: 20 prompts under a json_schema, temperature 0: how many answers finish with "stop" and how many
     of those validate against the schema (must be all of them), and how many were cut by max_tokens.

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
    from inference.engine.llama import LlamaEngine
    from inference.models import resolve_model
    from inference.structured import parse_response_format

    model = args.model or resolve_model(None, Settings.from_env({}, env_file=None).model_cache_dir)[0]
    engine = LlamaEngine(model, n_ctx=2048, max_concurrent=1)
    engine.load()
    listing = parse_response_format({"type": "json_schema", "json_schema": {"name": "list", "schema": LIST_SCHEMA}})
    city = parse_response_format({"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}})

    async def generate(prompt: str, grammar: str | None, seed: int, temperature: float) -> tuple[str, object, float]:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=temperature, seed=seed, grammar=grammar)
        generation = await engine.generate(GenerationRequest(params=params, messages=(ChatMessage("user", prompt),)))
        first = None
        pieces = []
        async for piece in generation:
            pieces.append(piece)
            first = first or time.perf_counter()
        return "".join(pieces), generation, time.perf_counter() - (first or time.perf_counter())

    try:
        speeds: dict[str, list[float]] = {"free": [], "json_schema": []}
        for seed in range(args.runs):
            for label, grammar in (("free", None), ("json_schema", listing.grammar)):
                _, generation, seconds = await generate("List many fruits as JSON.", grammar, seed, 0.8)
                if seconds > 0 and generation.completion_tokens > 1:
                    speeds[label].append((generation.completion_tokens - 1) / seconds)
            print(f"  run {seed + 1}: free {speeds['free'][-1]:.1f}, json_schema {speeds['json_schema'][-1]:.1f} tok/s",
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
    free, constrained = statistics.median(speeds["free"]), statistics.median(speeds["json_schema"])
    return {"model": str(model), "runs": args.runs, "free_tps": free, "json_schema_tps": constrained,
            "ratio": constrained / free, "prompts": len(PLACES), "finished": stops, "valid": valid, "cut": cut}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="GGUF file (default: the default model)")
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=120)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(f"completion tokens/s, medians of {result['runs']} runs: free {result['free_tps']:.1f}, "
          f"json_schema {result['json_schema_tps']:.1f} ({result['ratio']:.2f}x)")
    print(f"json_schema answers on {result['prompts']} prompts: {result['finished']} finished, {result['valid']} of "
          f"them valid ({100 * result['valid'] / max(1, result['finished']):.0f}%), {result['cut']} cut by max_tokens")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["valid"] == result["finished"] else 1


if __name__ == "__main__":
    sys.exit(main())
