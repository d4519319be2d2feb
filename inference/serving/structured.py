"""Structured output: OpenAI's `response_format` as a grammar the sampler enforces, and a check of the result.

`{"type": "json_object"}` and `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` become an
llguidance grammar (the grammar engine llama.cpp, vLLM and SGLang use; chosen by measurement, see the README's
structured-output benchmark), applied while sampling (engine/llama/sampling.py), so the model can only write text
that parses and matches. Fail closed: llguidance refuses what it cannot enforce exactly (a keyword it does not
implement, a `oneOf` whose branches can overlap, an unsatisfiable schema), and that is a 400 naming the keyword and
where it is, never a quietly weaker guarantee (`_prepared` says what is rewritten first, admitting the same answers). The list of keywords is llguidance's own,
not one kept here. JSON is written compactly (`", "` and `": "` between items, no other whitespace): a small
model cannot pad an answer with whitespace until max_tokens. After generation the text is validated against the
schema (the `jsonschema` package): a second net, which should never catch anything.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

from ..web.errors import HTTPError

FIELD = "response_format"
ANY_OBJECT: dict[str, Any] = {"type": "object"}
# llguidance's JSON options, as overrides: a schema's own "x-guidance" options cannot loosen them (lenient would
# ignore keywords it does not implement; coerce_one_of would read oneOf as anyOf).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False,
                "coerce_one_of": False}
GRAMMAR_CACHE = 512  # compiled grammars kept, by canonical schema (LRU)
# Keywords that assert nothing (JSON Schema's annotations, and editors' extensions SchemaStore's schemas carry).
ANNOTATIONS = {"title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly",
               "markdownDescription", "enumDescriptions", "markdownEnumDescriptions", "deprecationMessage",
               "errorMessage", "patternErrorMessage", "doNotSuggest", "defaultSnippets"}
# A format llguidance does not know is an annotation, as JSON Schema (2019-09 on) says formats are by default: not
# enforced here, and not checked after generation either (the validator asserts no format by default).
UNKNOWN_FORMAT = "Unknown format: "
MAX_UNKNOWN_FORMATS = 8
# A number a schema leaves unbounded gets at most 16 digits before its point (as llama.cpp's own converter did): a
# small model otherwise writes "1111..." until max_tokens. The answer still matches the schema.
NUMBER_BOUND = 10 ** 16 - 1
# Every keyword of JSON Schema's drafts (4 to 2020-12); any other key asserts nothing (the specification has it ignored)
# and is left out before compiling.
KEYWORDS = {"$schema", "$id", "id", "$ref", "$defs", "definitions", "$anchor", "$dynamicRef", "$dynamicAnchor",
            "$recursiveRef", "$recursiveAnchor", "$vocabulary", "type", "enum", "const", "multipleOf", "maximum",
            "exclusiveMaximum", "minimum", "exclusiveMinimum", "maxLength", "minLength", "pattern", "format",
            "maxItems", "minItems", "uniqueItems", "maxContains", "minContains", "maxProperties", "minProperties",
            "required", "dependentRequired", "dependencies", "items", "prefixItems", "additionalItems", "contains",
            "properties", "patternProperties", "additionalProperties", "propertyNames", "unevaluatedItems",
            "unevaluatedProperties", "dependentSchemas", "allOf", "anyOf", "oneOf", "not", "if", "then", "else",
            "contentEncoding", "contentMediaType", "contentSchema"}
UPPER_BOUNDS, LOWER_BOUNDS = ("maximum", "exclusiveMaximum"), ("minimum", "exclusiveMinimum")
# Where subschemas sit: keyword -> a schema, a list of schemas, or a name -> schema object (to prepare a schema and
# to say where a refused keyword is); values under other keywords (enum, const, default, examples) are data.
SUBSCHEMAS = {"items": "one", "additionalProperties": "one", "not": "one", "if": "one", "then": "one",
              "else": "one", "contains": "one", "propertyNames": "one", "additionalItems": "one",
              "unevaluatedProperties": "one", "unevaluatedItems": "one", "contentSchema": "one",
              "prefixItems": "list", "anyOf": "list", "oneOf": "list", "allOf": "list",
              "properties": "map", "patternProperties": "map", "$defs": "map", "definitions": "map",
              "dependentSchemas": "map"}


@dataclass(frozen=True)
class StructuredOutput:
    """What a request's response_format asks for: the grammar to sample under and the schema to check."""

    kind: str  # "json_object" or "json_schema"
    schema: dict[str, Any]
    schema_json: str  # canonical (sorted keys): the validator cache's key
    grammar: str | None  # None when an upstream enforces the schema instead
    asked: Any = field(default=None, compare=False)  # the response_format as the request gave it

    def sampling(self) -> dict[str, str | None]:
        """The SamplingParams fields that carry it: the grammar the embedded engine samples under, else the
        response_format (as asked) an upstream enforces itself."""
        if self.grammar is not None:
            return {"grammar": self.grammar, "response_format": None}
        return {"grammar": None, "response_format": json.dumps(self.asked)}

    def check(self, text: str, finish_reason: str | None) -> None:
        """A finished answer must match the schema (one cut by max_tokens cannot): 502 when it does not."""
        if finish_reason != "stop":
            return
        violation = self.violation(text)
        if violation is not None:
            raise HTTPError(502, "structured_output_invalid",
                            f"the model's answer does not match the requested schema ({violation})")

    def violation(self, text: str) -> str | None:
        """Why `text` is not a valid answer, or None when it is."""
        return violation_of(self.schema_json, text)


def violation_of(schema_json: str, text: str) -> str | None:
    """Why `text` is not JSON matching the schema, or None when it is."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        return f"not JSON: {exc}"
    from jsonschema.exceptions import best_match

    error = best_match(_validator(schema_json).iter_errors(value))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "the top level"
    return f"at {where}: {error.message}"


def parse_response_format(value: Any, *, enforce: bool = True) -> StructuredOutput | None:
    """The request's response_format (None for absent or {"type": "text"}); a 400 naming what is wrong.

    `enforce`: this service samples under the grammar (embedded engine), so every keyword must be one it
    enforces. An upstream enforces the schema itself: only the shape is checked here, and the answer after."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise _refuse('must be an object whose "type" is "text", "json_object" or "json_schema"')
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        schema_json = json.dumps(ANY_OBJECT)
        return StructuredOutput(kind, ANY_OBJECT, schema_json, _grammar(schema_json) if enforce else None, value)
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise _refuse('"json_schema" must be an object with a "name" and a "schema"')
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise _refuse('"json_schema.schema" must be a JSON schema object')
    if not isinstance(spec.get("strict", False), (bool, type(None))):
        raise _refuse('"json_schema.strict" must be true or false')
    if not isinstance(spec.get("description", ""), str):
        raise _refuse('"json_schema.description" must be a string')
    schema_json = json.dumps(schema, sort_keys=True)
    try:
        _validator(schema_json)
    except Exception as exc:  # not a JSON schema the validator can make sense of
        raise _refuse(f'"json_schema.schema" is not a valid JSON schema: {exc}') from None
    # The grammar writes properties in the schema's order (as OpenAI's do): compiled from the schema as written.
    grammar = _grammar(json.dumps(schema)) if enforce else None
    return StructuredOutput(kind, schema, schema_json, grammar, value)


def _refuse(why: str) -> HTTPError:
    return HTTPError(422, "validation_error", f"{FIELD}: {why}", field=FIELD)


def _grammar(schema_json: str) -> str:
    """The llguidance grammar that enforces the schema exactly, or a 400 naming what it cannot enforce."""
    return _compiled(schema_json)[1]


def json_term(schema: dict[str, Any]) -> str:
    """The schema as a `%json` term of an llguidance lark grammar (a tool call inside a template's own syntax),
    enforced as exactly as a response_format's: a 400 naming what cannot be."""
    prepared = json.loads(_compiled(json.dumps(schema))[0])
    return "%json " + json.dumps({**prepared, "x-guidance": JSON_OPTIONS})


@functools.lru_cache(maxsize=GRAMMAR_CACHE)
def _compiled(schema_json: str) -> tuple[str, str]:
    """(the schema as compiled, its grammar)."""
    from llguidance import LLMatcher

    schema, unknown = json.loads(schema_json), frozenset[str]()
    while True:
        prepared = _prepared(schema, unknown)
        try:
            grammar = LLMatcher.grammar_from_json_schema(prepared, overrides=JSON_OPTIONS)  # type: ignore
        except ValueError as exc:  # a value llguidance cannot read (an integer beyond 64 bits, ...)
            raise _refuse(f'"json_schema.schema" cannot be enforced: {exc}') from None
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
        if not failed:
            return json.dumps(prepared), grammar
        if messages[0].startswith(UNKNOWN_FORMAT) and len(unknown) < MAX_UNKNOWN_FORMATS:
            unknown |= {messages[0].removeprefix(UNKNOWN_FORMAT).strip()}  # an annotation, as JSON Schema says
            continue
        raise _refuse(f'"json_schema.schema" cannot be enforced: {_located(messages[0], schema)}')


def _prepared(schema: Any, dropped_formats: frozenset[str] = frozenset()) -> Any:
    """What llguidance compiles for `schema`: the same set of valid answers, said in a way it enforces.

    - annotations (description, title, examples, ...) are left out: they assert nothing, and beside a `$ref` in a
      recursive schema llguidance would refuse them as sibling keys;
    - a `oneOf` whose branches only name types is the types named by exactly one branch (the Kubernetes
      int-or-string `oneOf: [{"type": ["string", "null"]}, {"type": ["number", "null"]}]` is string or number);
    - a number the schema leaves unbounded gets at most 16 digits before its point (NUMBER_BOUND), and a bound
      beyond that is brought to it (a bound past 64 bits is one the grammar engine cannot read);
    - keys that are no keyword of any draft are left out: they assert nothing;
    - `dropped_formats`: formats llguidance does not know, which JSON Schema makes annotations by default."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for name, sub in schema.items():
        if (name in ANNOTATIONS or name not in KEYWORDS or (name == "format" and sub in dropped_formats)):
            continue
        kind = SUBSCHEMAS.get(name)
        if kind == "one":
            out[name] = _prepared(sub, dropped_formats)
        elif kind == "list" and isinstance(sub, list):
            out[name] = [_prepared(item, dropped_formats) for item in sub]
        elif kind == "map" and isinstance(sub, dict):
            out[name] = {key: _prepared(item, dropped_formats) for key, item in sub.items()}
        elif name in UPPER_BOUNDS and _number(sub) and sub > NUMBER_BOUND:
            out[name] = NUMBER_BOUND
        elif name in LOWER_BOUNDS and _number(sub) and sub < -NUMBER_BOUND:
            out[name] = -NUMBER_BOUND
        else:
            out[name] = sub
    exclusive = _exclusive_types(schema.get("oneOf"))  # judged on the branches as written
    if exclusive is not None:
        del out["oneOf"]
        out["allOf"] = [*out.get("allOf", []), _prepared({"type": exclusive})]
    types = out.get("type")
    if types in ("integer", "number") or (isinstance(types, list) and {"integer", "number"} & set(types)):
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -NUMBER_BOUND
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = NUMBER_BOUND
    return out


def shown(schema: Any) -> str:
    """A schema as the model is shown it in a prompt: its keywords and annotations (descriptions help the model),
    without keys no draft knows, compact, characters as they are."""
    def keep(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        out: dict[str, Any] = {}
        for name, sub in node.items():
            if name not in KEYWORDS and name not in ANNOTATIONS:
                continue
            kind = SUBSCHEMAS.get(name)
            if kind == "one":
                out[name] = keep(sub)
            elif kind == "list" and isinstance(sub, list):
                out[name] = [keep(item) for item in sub]
            elif kind == "map" and isinstance(sub, dict):
                out[name] = {key: keep(item) for key, item in sub.items()}
            else:
                out[name] = sub
        return out

    return json.dumps(keep(schema), ensure_ascii=False)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _exclusive_types(branches: Any) -> list[str] | None:
    """For a oneOf whose every branch only names types: the types exactly one branch names (None otherwise, or
    when an integer could also match a "number" branch)."""
    if not isinstance(branches, list) or not branches:
        return None
    counts: dict[str, int] = {}
    for branch in branches:
        if not isinstance(branch, dict) or set(branch) != {"type"}:
            return None
        named = branch["type"] if isinstance(branch["type"], list) else [branch["type"]]
        for kind in set(named):
            counts[kind] = counts.get(kind, 0) + 1
    if "integer" in counts and "number" in counts:
        return None
    return sorted(kind for kind, count in counts.items() if count == 1)


def _located(message: str, schema: Any) -> str:
    """llguidance's message, with where the keyword it names first appears (llguidance says which, not where)."""
    if not message.startswith("Unimplemented keys: "):
        return message
    try:
        keys = json.loads(message.removeprefix("Unimplemented keys: "))
    except ValueError:
        return message
    for key in keys:
        path = _find(schema, key, "json_schema.schema")
        if path is not None:
            return (f'uses "{key}" at {path}, which the grammar engine cannot enforce; remove it or express it '
                    "with the keywords it supports (see the README)")
    return message


def _find(schema: Any, key: str, path: str) -> str | None:
    """Where `key` is a keyword of `schema` or of a schema inside it, first found depth-first."""
    if not isinstance(schema, dict):
        return None
    if key in schema:
        return path
    for name, sub in schema.items():
        kind = SUBSCHEMAS.get(name)
        if kind == "one":
            found = _find(sub, key, f"{path}.{name}")
        elif kind == "list" and isinstance(sub, list):
            found = next((p for i, item in enumerate(sub) if (p := _find(item, key, f"{path}.{name}[{i}]"))), None)
        elif kind == "map" and isinstance(sub, dict):
            found = next((p for n, item in sub.items() if (p := _find(item, key, f"{path}.{name}.{n}"))), None)
        else:
            found = None
        if found is not None:
            return found
    return None


@functools.lru_cache(maxsize=256)
def _validator(schema_json: str) -> Any:
    import jsonschema

    schema = json.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)
