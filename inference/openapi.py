"""The OpenAPI 3.0 document, built once from the routes and the dataclasses that validate them."""

from __future__ import annotations

from typing import Any

from . import SERVICE_NAME, __version__
from .router import PARAM, Route
from .openai_schemas import OpenAIError
from .schemas import ErrorResponse
from .validation import json_schema

ERROR_DESCRIPTIONS = {
    400: "Malformed JSON or a request the model cannot serve",
    401: "Missing or wrong API key",
    404: "Not found",
    405: "Method not allowed",
    413: "Request body too large",
    415: "Unsupported media type",
    422: "A field is missing or invalid; `error.details` lists every one",
    429: "Rate limited; see Retry-After",
    500: "Internal error; `error.request_id` identifies it in the logs",
    501: "Not supported by this backend",
    502: "The upstream failed",
    503: "Not ready or overloaded; see Retry-After",
    504: "The upstream timed out",
}


def openapi_document(routes: list[Route], *, title: str = SERVICE_NAME) -> dict[str, Any]:
    components: dict[str, Any] = {}
    native_error = json_schema(ErrorResponse, components)
    openai_error = json_schema(OpenAIError, components)
    paths: dict[str, Any] = {}
    for route in routes:
        if not route.include_in_schema:
            continue
        operation: dict[str, Any] = {"summary": route.summary, "operationId": _operation_id(route)}
        params = [
            {"name": m[1], "in": "path", "required": True, "schema": {"type": "string"}}
            for m in PARAM.finditer(route.template)
        ]
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
        responses: dict[str, Any] = {"200": ok}
        error_ref = openai_error if route.template.startswith("/v1/") else native_error
        for status in route.errors:
            responses[str(status)] = {
                "description": ERROR_DESCRIPTIONS[status],
                "content": {"application/json": {"schema": error_ref}},
            }
        operation["responses"] = responses
        paths.setdefault(route.template.replace(":path}", "}"), {})[route.method.lower()] = operation
    return {
        "openapi": "3.0.3",
        "info": {"title": title, "version": __version__},
        "paths": paths,
        "components": {"schemas": components},
    }


def _operation_id(route: Route) -> str:
    return route.handler.__name__
