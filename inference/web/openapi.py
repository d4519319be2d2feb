"""The OpenAPI 3.0 document, built once from the routes and the dataclasses that validate them."""

from __future__ import annotations

from typing import Any

from .. import SERVICE_NAME, __version__
from .router import PARAM, Route
from .dialect import NATIVE
from .validation import json_schema

ERROR_DESCRIPTIONS = {
    400: "Malformed JSON or a request the model cannot serve",
    401: "Missing or wrong API key",
    404: "Not found",
    405: "Method not allowed",
    409: "The first request with this Idempotency-Key is still running; see Retry-After",
    413: "Request body too large",
    415: "Unsupported media type",
    422: "A field is missing or invalid; `error.details` lists every one",
    429: "Rate limited; see Retry-After",
    500: "Internal error; `error.request_id` identifies it in the logs",
    501: "Not supported by this backend",
    502: "The upstream failed",
    503: "Not ready or overloaded; see Retry-After",
    504: "The upstream timed out",
    529: "Overloaded (Anthropic's status for it); see Retry-After",
}


def openapi_document(
    routes: list[Route], *, title: str = SERVICE_NAME, model: str | None = None, vocab_size: int | None = None,
) -> dict[str, Any]:
    """Once the model is loaded, the document also states what depends on it: `model`, its id on /v1, documented as
    the only value of the OpenAI requests' `model` field (another one is a 404 `model_not_found`, as OpenAI
    answers); `vocab_size`, which bounds token ids (in `logit_bias` and /detokenize)."""
    components: dict[str, Any] = {}
    error_refs = {dialect: json_schema(dialect.error_schema, components)
                  for dialect in dict.fromkeys([NATIVE, *(route.dialect for route in routes)])}
    paths: dict[str, Any] = {}
    operations = {f"{r.method} {r.template}": _operation_id(r) for r in routes if r.include_in_schema}
    for route in routes:
        if not route.include_in_schema:
            continue
        operation: dict[str, Any] = {"summary": route.summary, "operationId": _operation_id(route)}
        params = [
            {"name": m[1], "in": "path", "required": True, "schema": {"type": "string"}}
            for m in PARAM.finditer(route.template)
        ] + [{"name": name, "in": "query", "required": False, "schema": dict(schema)}
             for name, schema in route.query.items()]
        if params:
            operation["parameters"] = params
        if route.request_schema is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": json_schema(
                    route.request_schema, components, route.overrides, closed=not route.allow_unknown_fields
                )}},
            }
        ok: dict[str, Any] = {"description": "OK"}
        if route.response_schema is not None:
            ok["content"] = {route.media_type: {"schema": json_schema(route.response_schema, components)}}
        elif route.media_type != "application/json":
            ok["content"] = {route.media_type: {"schema": {"type": "string"}}}
        if route.streams:
            ok.setdefault("content", {})["text/event-stream"] = {
                "schema": {
                    "type": "object",
                    "description": "One server-sent event (when the request sets stream): its data is JSON, "
                                   "or [DONE] last on /v1",
                    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
                    "required": ["data"],
                }
            }
        if route.links:  # what a stateful client (schemathesis's stateful phase) may call next with this answer
            ok["links"] = {name: {"operationId": operations[target], **how}
                           for name, (target, how) in route.links.items() if target in operations}
        responses: dict[str, Any] = {"200": ok}
        error_ref = error_refs[route.dialect]
        for status in route.errors:
            responses[str(status)] = {
                "description": ERROR_DESCRIPTIONS[status],
                "content": {"application/json": {"schema": error_ref}},
            }
        operation["responses"] = responses
        if route.request_schema is not None:
            _bind_model(components[route.request_schema.__name__]["properties"],
                        model if route.dialect.binds_model else None, vocab_size)
        paths.setdefault(route.template.replace(":path}", "}"), {})[route.method.lower()] = operation
    return {
        "openapi": "3.0.3",
        "info": {"title": title, "version": __version__},
        "paths": paths,
        "components": {"schemas": components},
    }


def _bind_model(properties: dict[str, Any], model: str | None, vocab_size: int | None) -> None:
    if model is not None and "model" in properties:
        properties["model"] = {**properties["model"], "enum": [model]}
    if vocab_size is None:
        return
    if "logit_bias" in properties:
        properties["logit_bias"] = {**properties["logit_bias"], "propertyNames": {"pattern": below(vocab_size)}}
    tokens = properties.get("tokens")
    if tokens is not None and tokens.get("items", {}).get("type") == "integer":
        properties["tokens"] = {**tokens, "items": {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}}


def below(n: int) -> str:
    """A regular expression matching the decimal numbers 0 .. n - 1 (no leading zeros)."""
    top = str(n - 1)
    options = ["[0-9]" if d == 1 else f"[1-9][0-9]{{{d - 1}}}" for d in range(1, len(top))]
    for i, digit in enumerate(top):  # numbers as long as `top`: its first i digits, then a smaller one, then any
        low = 1 if i == 0 and len(top) > 1 else 0
        if int(digit) > low:
            high = int(digit) - 1
            span = str(low) if high == low else f"[{low}-{high}]"
            rest = len(top) - i - 1
            options.append(top[:i] + span + (f"[0-9]{{{rest}}}" if rest else ""))
    options.append(top)
    return "^(?:" + "|".join(options) + ")$"


def _operation_id(route: Route) -> str:
    return route.handler.__name__
