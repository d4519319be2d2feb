#!/usr/bin/env python3
"""A corpus of real-world JSON schemas, built offline from two packages' bundled copies, for the grammar-engine
comparison (scripts/bench_structured.py --engines) and the test suite's sample (tests/data/schemas.jsonl).

  - SchemaStore: the schemas check-jsonschema vendors (CI configurations, GitHub workflows, issue forms, Compose,
    Renovate, ...), each whole and each of its definitions as a schema of its own (the file's definitions kept
    beside it, so that its $refs resolve);
  - Kubernetes: the resource schemas kubernetes-validate bundles (v1.29 strict), each with the definitions it
    reaches inlined (their "/api/_definitions.json#/$defs/..." refs rewritten to "#/$defs/...").

A deterministic sample (seeded) of --count, a third SchemaStore, two thirds Kubernetes, written as JSON lines
{"name", "source", "schema"}. Needs check-jsonschema and kubernetes-validate (the deployment checks' tools venv has
both):

    .venv-tools/bin/python scripts/schema_corpus.py --count 300 --out /tmp/schemas.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

K8S_VERSION = "v1.29.0-local-strict"
K8S_REF = re.compile(r"^(?:/api/_definitions\.json)?#/\$defs/(.+)$")  # in a resource file, or in the definitions
SEED = 20261203
ROOT_REF = '"$ref": "#"'


def schemastore() -> Iterator[tuple[str, dict[str, Any]]]:
    vendor = resources.files("check_jsonschema") / "builtin_schemas" / "vendor"
    for entry in sorted(vendor.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        whole = json.loads(entry.read_text())
        name = entry.name.removesuffix(".json")
        yield f"schemastore/{name}", whole
        for key in ("definitions", "$defs"):
            for part, schema in (whole.get(key) or {}).items():
                # A definition that refers to its file's root ("$ref": "#") is no schema on its own: as the root
                # it would refer to itself.
                if isinstance(schema, dict) and ROOT_REF not in json.dumps(schema):
                    yield f"schemastore/{name}#/{key}/{part}", {**schema, key: whole[key]}


def kubernetes() -> Iterator[tuple[str, dict[str, Any]]]:
    folder = resources.files("kubernetes_validate") / "kubernetes-json-schema" / K8S_VERSION
    definitions = json.loads((folder / "_definitions.json").read_text())["$defs"]
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.startswith("_") or entry.name == "all.json" or not entry.name.endswith(".json"):
            continue
        schema = json.loads(entry.read_text())
        reached: dict[str, Any] = {}
        schema = _inline(schema, definitions, reached)
        if reached:
            schema["$defs"] = reached
        yield f"kubernetes/{entry.name.removesuffix('.json')}", schema


def _inline(node: Any, definitions: dict[str, Any], reached: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_inline(item, definitions, reached) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "$ref" and isinstance(value, str) and (match := K8S_REF.match(value)):
            target = match[1]
            out[key] = f"#/$defs/{target}"
            if target not in reached:
                reached[target] = {}  # claimed before the walk: definitions may refer to themselves
                reached[target] = _inline(definitions[target], definitions, reached)
        else:
            out[key] = _inline(value, definitions, reached)
    return out


def corpus(count: int) -> list[dict[str, Any]]:
    rng = random.Random(SEED)
    store, k8s = list(schemastore()), list(kubernetes())
    wholes = [item for item in store if "#" not in item[0]]
    parts = [item for item in store if "#" in item[0]]
    from_store = min(len(store), count // 3)
    chosen = wholes[:from_store] + rng.sample(parts, max(0, from_store - len(wholes)))
    chosen += rng.sample(k8s, min(len(k8s), count - len(chosen)))
    return [{"name": name, "source": name.split("/")[0], "schema": schema} for name, schema in chosen]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None, help="JSON lines file (default: stdout)")
    args = parser.parse_args()
    lines = "".join(json.dumps(item, sort_keys=True) + "\n" for item in corpus(args.count))
    if args.out is None:
        sys.stdout.write(lines)
    else:
        args.out.write_text(lines)
        print(f"{lines.count(chr(10))} schemas -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
