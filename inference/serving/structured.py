"""Structured output: OpenAI's `response_format` as a grammar the sampler enforces, and a check of the result.

`{"type": "json_object"}` and `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` become a
llama.cpp GBNF grammar (llama-cpp-python's JSON-schema converter), applied while sampling, so the model can only
write text that parses and matches. Fail closed: a schema keyword the converter would silently ignore is a 400
naming it, never a quietly weaker guarantee. The converter bounds what a schema leaves open where a model could
loop (at most 16 digits for a number, one optional space between tokens); strings stay as long as the schema lets
them, up to max_tokens. After generation the text is validated against the schema (the `jsonschema` package).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

from ..web.errors import HTTPError

FIELD = "response_format"
# Keywords the grammar enforces.
ENFORCED = {
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "pattern", "format",
    "minLength", "maxLength",
}
# JSON Schema keywords that assert something the grammar cannot enforce: refused. Keywords outside the JSON Schema
# vocabulary (vendor "x-..." and the like) assert nothing, per the specification, and are ignored.
UNENFORCED = {
    "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies", "patternProperties",
    "propertyNames", "minProperties", "maxProperties", "uniqueItems", "contains", "minContains", "maxContains",
    "multipleOf", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "unevaluatedProperties",
    "unevaluatedItems", "additionalItems", "contentEncoding", "contentMediaType", "contentSchema", "$dynamicRef",
    "$recursiveRef",
}
FORMATS = {"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"}
# Nested schemas under these keywords (a schema, a list of schemas, or a name -> schema object).
SUBSCHEMAS = {"items": "one", "additionalProperties": "one", "prefixItems": "list", "anyOf": "list",
              "oneOf": "list", "allOf": "list", "properties": "map", "$defs": "map", "definitions": "map"}
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class StructuredOutput:
    """What a request's response_format asks for: the grammar to sample under and the schema to check."""

    kind: str  # "json_object" or "json_schema"
    schema: dict[str, Any]
    schema_json: str  # canonical: the validator cache's key
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
        try:
            value = json.loads(text)
        except ValueError as exc:
            return f"not JSON: {exc}"
        from jsonschema.exceptions import best_match

        error = best_match(_validator(self.schema_json).iter_errors(value))
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
    if enforce:
        check_schema(schema, "json_schema.schema")
    schema_json = json.dumps(schema, sort_keys=True)
    try:
        _validator(schema_json)
        grammar = _grammar(json.dumps(_enforced(schema), sort_keys=True)) if enforce else None
    except Exception as exc:  # the converter or the validator cannot make sense of it
        raise _refuse(f'"json_schema.schema" cannot be enforced: {exc}') from None
    return StructuredOutput(kind, schema, schema_json, grammar, value)


def check_schema(schema: Any, path: str) -> None:
    """Refuse (400) any keyword the grammar would not enforce."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise _refuse(f"{path} must be a schema object")
    for key, sub in schema.items():
        if key not in ENFORCED and key not in UNENFORCED:
            continue  # an annotation, or no JSON Schema keyword at all: asserts nothing
        if key in UNENFORCED:
            raise _refuse(f'{path} uses "{key}", which structured output cannot enforce; remove it or '
                          "express it with the supported keywords (see the README)")
        if key == "format" and sub not in FORMATS:
            raise _refuse(f'{path} uses "format": {json.dumps(sub)}, which structured output cannot enforce '
                          f"(supported: {', '.join(sorted(FORMATS))})")
        kind = SUBSCHEMAS.get(key)
        if kind == "one":
            check_schema(sub, f"{path}.{key}")
        elif kind == "list":
            if not isinstance(sub, list):
                raise _refuse(f"{path}.{key} must be a list of schemas")
            for i, item in enumerate(sub):
                check_schema(item, f"{path}.{key}[{i}]")
        elif kind == "map":
            if not isinstance(sub, dict):
                raise _refuse(f"{path}.{key} must be an object of schemas")
            for name, item in sub.items():
                check_schema(item, f"{path}.{key}.{name}")


def _enforced(schema: Any) -> Any:
    """The schema with only the keywords the grammar acts on (the converter trips over others)."""
    if not isinstance(schema, dict):
        return schema
    kept: dict[str, Any] = {}
    for key, sub in schema.items():
        if key not in ENFORCED:
            continue
        kind = SUBSCHEMAS.get(key)
        if kind == "one":
            kept[key] = _enforced(sub)
        elif kind == "list":
            kept[key] = [_enforced(item) for item in sub]
        elif kind == "map":
            kept[key] = {name: _enforced(item) for name, item in sub.items()}
        else:
            kept[key] = sub
    return kept


def _refuse(why: str) -> HTTPError:
    return HTTPError(422, "validation_error", f"{FIELD}: {why}", field=FIELD)


@functools.lru_cache(maxsize=256)
def _grammar(schema_json: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return json_schema_to_gbnf(schema_json)


@functools.lru_cache(maxsize=256)
def _validator(schema_json: str) -> Any:
    import jsonschema

    schema = json.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)
