"""An API dialect: how one family of routes answers errors (status, body, the body's OpenAPI schema). The error
middleware renders a failure in the dialect of the route it happened on; `NATIVE` is the framework's own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import HTTPError
from .http import ClientDisconnected, Response, Scope, json_response
from .state import state
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


def dialect_of(scope: Scope) -> Dialect:
    """The dialect this request is answered in (set by the error middleware; the framework's own before that)."""
    return state(scope).dialect or NATIVE


def response_status(error: HTTPError, scope: Scope) -> int:
    """The status `error` is answered with on this request (the OpenAI API says 400 for 422)."""
    return dialect_of(scope).status(error)


class FinalStatus:
    """The status a request ends with, however it ends: what `http.response.start` said, else the status its
    HTTPError is answered with in the request's dialect, 499 when the client left before an answer (nginx's "client
    closed request"), 500 for anything else. The metrics and tracing middlewares both read it."""

    __slots__ = ("status", "headers", "error")

    def __init__(self) -> None:
        self.status = 500
        self.headers: Any = ()
        self.error: HTTPError | None = None

    def watch(self, send: Callable[[Any], Any]) -> Callable[[Any], Any]:
        async def watched(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
                self.headers = message.get("headers", ())
            await send(message)

        return watched

    def failed(self, exc: Exception, scope: Scope) -> bool:
        """Note how the request failed; True when it was not an answer (neither an HTTPError nor a client gone)."""
        if isinstance(exc, HTTPError):
            self.status, self.error = response_status(exc, scope), exc
        elif isinstance(exc, ClientDisconnected):
            self.status = 499
        else:
            return True
        return False
