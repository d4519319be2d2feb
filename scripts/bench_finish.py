#!/usr/bin/env python3
"""Do structured answers finish? Real-world schemas through /v1/chat/completions, greedy, as a client asks.

For each schema of a corpus (JSON lines {"name", "schema"}: tests/data/schemas.jsonl, or a sample from
scripts/schema_corpus.py), one chat completion with `response_format: json_schema` at temperature 0, and what
became of it:

  valid     finished ("stop") and the answer validates against the schema
  cut       ran to max_tokens ("length"): honest, but a client's parse() raises
  refused   400: a keyword the grammar cannot enforce (named in the answer); 413: a schema past MAX_BODY_BYTES
  lies      finished but invalid (a 502 structured_output_invalid, or an answer that does not validate)
  errors    anything else (a 5xx, a transport error)

and completion tokens per second over the answers (the service's own generation, prompt time included). Each
--config is a server of its own (`python -m inference` with the given environment), measured in turn on the same
schemas; `--config base` is the service as configured by default:

    python scripts/bench_finish.py [--corpus FILE] [--sample 60] [--max-tokens 512] \\
        [--config base] [--config 'dry:STRUCTURED_DRY_MULTIPLIER=0.8'] [--json report.json]

Everything runs on 127.0.0.1 and stops by itself. Progress on stderr, the report on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gateway import free_port, wait_ready  # noqa: E402

PROMPT = "Write one realistic example of {what} as JSON."
SAMPLE_SEED = 29


def what(item: dict) -> str:
    """What the schema describes, for the prompt: its title, else the last part of its corpus name."""
    title = item["schema"].get("title") if isinstance(item["schema"], dict) else None
    if isinstance(title, str) and 0 < len(title) < 80:
        return f"a {title}"
    name = item["name"].split("#")[-1].split("/")[-1].replace("-", " ").replace("_", " ")
    return f"a {name}"


async def one(client: httpx.AsyncClient, model: str, item: dict, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT.format(what=what(item))}],
            "temperature": 0, "max_tokens": max_tokens,
            "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": item["schema"]}}}
    started = time.perf_counter()
    try:
        response = await client.post("/v1/chat/completions", json=body)
    except httpx.HTTPError as exc:
        return {"name": item["name"], "outcome": "errors", "why": repr(exc)[:200]}
    seconds = time.perf_counter() - started
    if response.status_code in (400, 413):  # a keyword the grammar cannot enforce; a schema past MAX_BODY_BYTES
        return {"name": item["name"], "outcome": "refused", "why": response.json()["error"]["message"][:200]}
    if response.status_code == 502 and response.json()["error"].get("code") == "structured_output_invalid":
        return {"name": item["name"], "outcome": "lies", "why": response.json()["error"]["message"][:200]}
    if response.status_code != 200:
        return {"name": item["name"], "outcome": "errors", "why": f"{response.status_code} {response.text[:200]}"}
    reply = response.json()
    choice, tokens = reply["choices"][0], reply["usage"]["completion_tokens"]
    run = {"name": item["name"], "tokens": tokens, "seconds": seconds, "finish": choice["finish_reason"]}
    if choice["finish_reason"] != "stop":
        return {**run, "outcome": "cut", "tail": (choice["message"]["content"] or "")[-300:]}
    try:
        jsonschema.validate(json.loads(choice["message"]["content"]), item["schema"])
    except Exception as exc:  # noqa: BLE001 - JSON that does not parse, or does not match
        return {**run, "outcome": "lies", "why": str(exc).splitlines()[0][:200]}
    return {**run, "outcome": "valid"}


async def measure(url: str, items: list[dict], max_tokens: int, concurrency: int, label: str) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        gate = asyncio.Semaphore(concurrency)
        done = 0

        async def guarded(item: dict) -> dict:
            nonlocal done
            async with gate:
                run = await one(client, model, item, max_tokens)
            done += 1
            print(f"{label}: {done}/{len(items)} {run['outcome']:8s} {item['name']}", file=sys.stderr)
            return run

        return list(await asyncio.gather(*(guarded(item) for item in items)))


def summary(runs: list[dict]) -> dict:
    counts = {outcome: sum(r["outcome"] == outcome for r in runs)
              for outcome in ("valid", "cut", "refused", "lies", "errors")}
    generated = [r for r in runs if "tokens" in r]
    tokens = sum(r["tokens"] for r in generated)
    seconds = sum(r["seconds"] for r in generated)
    return {**counts, "schemas": len(runs), "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
            "mean_tokens": round(tokens / len(generated), 1) if generated else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=ROOT / "tests" / "data" / "schemas.jsonl")
    parser.add_argument("--sample", type=int, help="a seeded sample of this many schemas from the corpus")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=4, help="requests at once (the engine batches them)")
    parser.add_argument("--config", action="append", default=[],
                        help="'label[:KEY=VALUE,...]': a server with this environment (repeatable; default: base)")
    parser.add_argument("--url", help="measure a running service instead of starting servers")
    parser.add_argument("--json", type=Path, help="write every answer's outcome and the summaries here")
    args = parser.parse_args()
    items = [json.loads(line) for line in args.corpus.read_text().splitlines() if line.strip()]
    if args.sample and args.sample < len(items):
        items = random.Random(SAMPLE_SEED).sample(items, args.sample)
    report: dict = {"corpus": str(args.corpus), "schemas": len(items), "max_tokens": args.max_tokens, "configs": {}}
    configs = args.config or ["base"]
    for config in configs:
        label, _, assignments = config.partition(":")
        env = dict(pair.split("=", 1) for pair in assignments.split(",") if pair)
        if args.url:
            runs = asyncio.run(measure(args.url, items, args.max_tokens, args.concurrency, label))
        else:
            port = free_port()
            server = subprocess.Popen(
                [sys.executable, "-m", "inference", "--env-file", "/nonexistent"], cwd=ROOT,
                env={**os.environ, "PORT": str(port), "LOG_LEVEL": "WARNING", "CACHE_MODE": "off",
                     "RATE_LIMIT_ENABLED": "false", "MAX_CONCURRENT_REQUESTS": str(args.concurrency), **env},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_ready(f"http://127.0.0.1:{port}/ready", timeout=300)
                runs = asyncio.run(measure(f"http://127.0.0.1:{port}", items, args.max_tokens, args.concurrency,
                                           label))
            finally:
                server.terminate()
                server.wait()
        report["configs"][label] = {"environment": env, "summary": summary(runs), "runs": runs}
    print(f"{len(items)} schemas, greedy, max_tokens {args.max_tokens}:")
    print(f"  {'config':16s} {'valid':>6s} {'cut':>5s} {'refused':>8s} {'lies':>5s} {'errors':>7s} {'tokens/s':>9s}")
    for label, found in report["configs"].items():
        s = found["summary"]
        print(f"  {label:16s} {s['valid']:6d} {s['cut']:5d} {s['refused']:8d} {s['lies']:5d} {s['errors']:7d} "
              f"{s['tokens_per_second'] or 0:9.1f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if all(found["summary"]["lies"] == 0 and found["summary"]["errors"] == 0
                    for found in report["configs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
