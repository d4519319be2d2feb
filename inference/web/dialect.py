"""An API dialect: how one family of routes answers errors (status, body, the body's OpenAPI schema). The error
middleware renders a failure in the dialect of the route it happened on (state.py: dialect_of); `NATIVE` is the
framework's own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import HTTPError
from .http import Response, json_response
from .validation import spec


@dataclass(frozen=True)
class ErrorDetail:
    field: str
    message: str


@dataclass(frozen=True)
class ErrorBody:
    code: str = field(metadata=spec(description="Stable machine-readable error code."))
    message: str
    field: str | None = field(default=None, metadata=spec(description="The first offending request field."))
    details: list[ErrorDetail] | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class ErrorResponse:
    error: ErrorBody


@dataclass(frozen=True)
class Dialect:
    """`status` and `body` render an HTTPError; `error_schema` documents the body; under `mount` (a path prefix) even
    paths that match no route answer in this dialect; `binds_model`: its requests' `model` field names the served
    model (the OpenAPI document lists it as the only value)."""

    name: str
    error_schema: type
    body: Callable[[HTTPError, str | None], dict[str, Any]]  # (error, request id) -> JSON body
    status: Callable[[HTTPError], int] = lambda error: error.status
    mount: str | None = None
    binds_model: bool = False

    def response(self, error: HTTPError, request_id: str | None = None) -> Response:
        return json_response(self.body(error, request_id), status=self.status(error), headers=error.headers)


def native_body(error: HTTPError, request_id: str | None) -> dict[str, Any]:
    body = error.body()
    if request_id is not None:
        body["error"]["request_id"] = request_id
    return body


NATIVE = Dialect("native", ErrorResponse, native_body)
