"""The three JSON-schema grammar engines compared by scripts/bench_structured.py --corpus, behind one interface.

  gbnf        llama-cpp-python's JSON-schema-to-GBNF converter and llama.cpp's grammar sampler: what the service
              used before. The converter silently drops keywords it has no rule for; the service refused those
              (a hand-kept list, kept here as FORMER_ENFORCED), so "enforced" means: every assertion is on that
              list and llama.cpp parses the grammar.
  llguidance  what the service uses now (serving/structured.py: its options, its refusals).
  xgrammar    vLLM's and SGLang's default. Its Python package needs torch, transformers and triton at import
              (several GB); pass --xgrammar-site with a site-packages folder that has them (the service never
              imports it). Compiled faithfully: strict_mode off (its default forbids properties a schema allows).

Each engine compiles a schema (or refuses it, saying why) and gives a matcher that masks a logits vector (numpy,
the mask computed by the engine's native code) and accepts the sampled token.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np

from inference.serving.structured import SUBSCHEMAS  # where subschemas sit

# The keywords the former GBNF path enforced (serving/structured.py before llguidance).
FORMER_ENFORCED = {
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "pattern", "format",
    "minLength", "maxLength",
}
FORMER_FORMATS = {"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"}
ASSERTIONS = FORMER_ENFORCED | {
    "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies", "patternProperties",
    "propertyNames", "minProperties", "maxProperties", "uniqueItems", "contains", "minContains", "maxContains",
    "multipleOf", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "unevaluatedProperties",
    "unevaluatedItems", "additionalItems", "contentEncoding", "contentMediaType", "contentSchema", "$dynamicRef",
    "$recursiveRef",
}



class Refused(Exception):
    """The engine will not (or cannot) enforce this schema exactly; the message says why."""


def _first_unenforced(schema: Any) -> str | None:
    if not isinstance(schema, dict):
        return None
    for key, sub in schema.items():
        if key in ASSERTIONS and key not in FORMER_ENFORCED:
            return key
        if key == "format" and sub not in FORMER_FORMATS:
            return f"format: {sub}"
        kind = SUBSCHEMAS.get(key)
        subs = [sub] if kind == "one" else sub if kind == "list" and isinstance(sub, list) else \
            list(sub.values()) if kind == "map" and isinstance(sub, dict) else []
        for item in subs:
            found = _first_unenforced(item)
            if found:
                return found
    return None


def _vocab_pieces(vocab: Any, n_vocab: int) -> list[bytes]:
    import ctypes

    from llama_cpp import llama_cpp as C

    buffer = ctypes.create_string_buffer(16 * 1024)
    pieces = []
    for token in range(n_vocab):
        n = C.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, True)
        pieces.append(bytes(buffer[:max(n, 0)]))
    return pieces


class Gbnf:
    name = "gbnf"

    def __init__(self, vocab: Any, n_vocab: int, eos: int) -> None:
        self.vocab = vocab

    def compile(self, schema: dict[str, Any]) -> Any:
        from llama_cpp import llama_cpp as C
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        missing = _first_unenforced(schema)
        if missing is not None:
            raise Refused(f"not enforced: {missing}")
        try:
            grammar = json_schema_to_gbnf(json.dumps(schema))
        except Exception as exc:  # the converter's own failures (unsupported refs and the like)
            raise Refused(f"converter: {str(exc)[:120]}") from None
        sampler = C.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        if not sampler:
            raise Refused("llama.cpp could not parse the converted grammar")
        C.llama_sampler_free(sampler)
        return grammar

    def matcher(self, compiled: Any) -> "GbnfMatcher":
        return GbnfMatcher(self.vocab, compiled)


class GbnfMatcher:
    """llama.cpp's grammar sampler over the whole candidate array (what llama-cpp-python's `grammar=` does)."""

    def __init__(self, vocab: Any, grammar: str) -> None:
        from llama_cpp import llama_cpp as C

        self.C = C
        self.sampler = C.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        self.candidates: np.ndarray | None = None

    def mask(self, logits: np.ndarray) -> None:
        C = self.C
        n = len(logits)
        if self.candidates is None:
            self.candidates = np.zeros(n, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        candidates = self.candidates
        candidates["id"] = np.arange(n, dtype=np.int32)
        candidates["logit"] = logits
        array = C.llama_token_data_array(data=candidates.ctypes.data_as(C.llama_token_data_p), size=n,
                                         selected=-1, sorted=False)
        C.llama_sampler_apply(self.sampler, array)
        logits[:] = candidates["logit"]

    def accept(self, token: int) -> None:
        self.C.llama_sampler_accept(self.sampler, token)

    def close(self) -> None:
        self.C.llama_sampler_free(self.sampler)


class Llguidance:
    name = "llguidance"

    def __init__(self, vocab: Any, n_vocab: int, eos: int) -> None:
        from llguidance.llamacpp import lltokenizer_from_vocab

        self.tokenizer = lltokenizer_from_vocab(vocab, n_vocab=n_vocab)
        self.n_vocab = n_vocab

    def compile(self, schema: dict[str, Any]) -> Any:
        from llguidance import LLMatcher

        from inference.serving.structured import _grammar
        from inference.web.errors import HTTPError

        try:
            grammar = _grammar(json.dumps(schema, sort_keys=True))
        except HTTPError as exc:
            raise Refused(exc.message.removeprefix('response_format: "json_schema.schema" cannot be enforced: ')[:160])
        matcher = LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise Refused(matcher.get_error()[:160])
        return matcher

    def matcher(self, compiled: Any) -> "LlgMatcher":
        return LlgMatcher(compiled.deep_copy(), self.n_vocab)


class LlgMatcher:
    def __init__(self, matcher: Any, n_vocab: int) -> None:
        self.matcher = matcher
        self.bits = np.zeros((n_vocab + 31) // 32, dtype=np.int32)
        self.ids = np.arange(n_vocab, dtype=np.int32)

    def mask(self, logits: np.ndarray) -> None:
        self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        allowed = (self.bits[self.ids >> 5] >> (self.ids & 31)) & 1
        logits[allowed == 0] = -np.inf

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)

    def close(self) -> None:
        pass


class Xgrammar:
    name = "xgrammar"

    def __init__(self, vocab: Any, n_vocab: int, eos: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo(_vocab_pieces(vocab, n_vocab), xgr.VocabType.RAW, vocab_size=n_vocab,
                                 stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.n_vocab = n_vocab

    def compile(self, schema: dict[str, Any]) -> Any:
        try:
            return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                     separators=(", ", ": "), strict_mode=False)
        except Exception as exc:
            raise Refused(str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__) from None

    def matcher(self, compiled: Any) -> "XgrMatcher":
        return XgrMatcher(self.xgr, compiled, self.n_vocab)


class XgrMatcher:
    def __init__(self, xgr: Any, compiled: Any, n_vocab: int) -> None:
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bits = np.zeros((1, (n_vocab + 31) // 32), dtype=np.int32)
        self.ids = np.arange(n_vocab, dtype=np.int32)

    def mask(self, logits: np.ndarray) -> None:
        self.matcher.fill_next_token_bitmask(self.bits)
        row = self.bits[0]
        allowed = (row[self.ids >> 5] >> (self.ids & 31)) & 1
        logits[allowed == 0] = -np.inf

    def accept(self, token: int) -> None:
        self.matcher.accept_token(token)

    def close(self) -> None:
        pass


ENGINES = {"gbnf": Gbnf, "llguidance": Llguidance, "xgrammar": Xgrammar}


def timed(call: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    return call(), time.perf_counter() - started


# --- the comparison: one engine per process (so that its memory is its own) -------------------------------------

PROMPT = "Write one example of {name} as JSON."


def worker(name: str, corpus_path: str, model_path: str, generate: int, max_tokens: int) -> dict[str, Any]:
    """Compile every schema of the corpus with engine `name`, then generate under the first `generate` it enforces
    (temperature 0) and without a grammar (the same prompts, interleaved): the figures, as a dict."""
    import resource
    import statistics

    import jsonschema
    from llama_cpp import Llama, LogitsProcessorList
    from llama_cpp import llama_cpp as C

    from inference.engine.llama.native import compute_threads

    llm = Llama(model_path, n_ctx=4096, n_threads=compute_threads()[0], verbose=False)
    vocab = C.llama_model_get_vocab(llm.model)
    n_vocab = llm.n_vocab()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    engine, tokenizer_seconds = timed(lambda: ENGINES[name](vocab, n_vocab, llm.token_eos()))
    items = [json.loads(line) for line in open(corpus_path)]
    compiled, refusals, seconds = [], {}, []
    for item in items:
        try:
            handle, took = timed(lambda: engine.compile(item["schema"]))
        except Refused as exc:
            refusals[item["name"]] = str(exc)
            continue
        seconds.append(took)
        compiled.append((item, handle))
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    runs = []
    for item, handle in compiled[:generate]:
        messages = [{"role": "user", "content": PROMPT.format(name=item["name"].split("/")[-1].split("#")[0])}]
        for constrained in (False, True):
            matcher = engine.matcher(handle) if constrained else None
            seen = [0]

            def process(input_ids: Any, scores: np.ndarray, matcher: Any = matcher, seen: list = seen) -> np.ndarray:
                if seen[0]:
                    matcher.accept(int(input_ids[-1]))
                seen[0] += 1
                matcher.mask(scores)
                return scores

            started = time.perf_counter()
            reply = llm.create_chat_completion(
                messages, max_tokens=max_tokens, temperature=0,
                logits_processor=LogitsProcessorList([process]) if constrained else None)
            took = time.perf_counter() - started
            if matcher is not None:
                matcher.close()
            choice = reply["choices"][0]
            run = {"name": item["name"], "constrained": constrained, "seconds": took,
                   "tokens": reply["usage"]["completion_tokens"], "finish": choice["finish_reason"]}
            if constrained and choice["finish_reason"] == "stop":
                try:
                    jsonschema.validate(json.loads(choice["message"]["content"]), item["schema"])
                    run["valid"] = True
                except Exception as exc:  # JSON that does not parse, or does not match
                    run["valid"], run["why"] = False, str(exc).splitlines()[0][:160]
            runs.append(run)
    constrained = [r for r in runs if r["constrained"]]
    free = [r for r in runs if not r["constrained"]]

    def rate(rs: list[dict]) -> float:
        return sum(r["tokens"] for r in rs) / max(sum(r["seconds"] for r in rs), 1e-9)

    ms = sorted(s * 1000 for s in seconds) or [0.0]
    return {
        "engine": name, "schemas": len(items), "enforced": len(compiled), "refused": len(refusals),
        "refusals": refusals, "tokenizer_seconds": round(tokenizer_seconds, 3),
        "compile_ms_p50": round(statistics.median(ms), 2), "compile_ms_p99": round(ms[max(0, math.ceil(0.99 * len(ms)) - 1)], 2),
        "compile_rss_mb": round(rss, 1), "generated": len(constrained),
        "finished": sum(r["finish"] == "stop" for r in constrained),
        "invalid": sum(r.get("valid") is False for r in constrained),
        "invalid_examples": [r for r in constrained if r.get("valid") is False][:5],
        "tokens_per_second": round(rate(constrained), 1), "free_tokens_per_second": round(rate(free), 1),
        "ratio": round(rate(constrained) / max(rate(free), 1e-9), 2),
    }
