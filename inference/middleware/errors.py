"""Outermost middleware: gives every request an id and turns every failure into a JSON error body."""

from __future__ import annotations

import logging
import re
import secrets
from typing import Callable

from ..web.dialect import NATIVE, Dialect
from ..web.errors import HTTPError
from ..web.http import HEADER_REQUEST_ID, ASGIApp, ClientDisconnected, Message, Receive, Scope, Send
from ..web.state import state

log = logging.getLogger("inference.errors")

REQUEST_ID_BYTES = HEADER_REQUEST_ID.encode()
# Limits on what arrives before the body (uvicorn itself bounds none of them): more is refused before any handler.
MAX_HEADERS = 100
MAX_HEADER_BYTES = 16 * 1024  # names and values together
MAX_QUERY_BYTES = 4096
# An incoming id is echoed only if it cannot smuggle anything into logs or headers.
SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")


def request_id_of(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == REQUEST_ID_BYTES and SANE_REQUEST_ID.fullmatch(value):
            return value.decode()
    return secrets.token_hex(16)


def _oversized(scope: Scope) -> HTTPError | None:
    headers = scope["headers"]
    if len(headers) > MAX_HEADERS:
        return HTTPError(431, "headers_too_large", f"{len(headers)} header fields; at most {MAX_HEADERS} are accepted")
    size = sum(len(name) + len(value) for name, value in headers)
    if size > MAX_HEADER_BYTES:
        return HTTPError(431, "headers_too_large", f"{size} bytes of header fields; at most {MAX_HEADER_BYTES}")
    if len(scope.get("query_string", b"")) > MAX_QUERY_BYTES:
        return HTTPError(414, "uri_too_long", f"the query string is over {MAX_QUERY_BYTES} bytes")
    return None


def errors(
    app: ASGIApp,
    *,
    dialect_of: Callable[[str], Dialect] = lambda path: NATIVE,
    on_error: Callable[[str], None] | None = None,
) -> ASGIApp:
    """Render HTTPError as its JSON body, any other exception as a logged 500, both in the dialect of the request's
    route (`dialect_of(path)`, the router's); add X-Request-ID everywhere."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        request = state(scope)
        dialect = dialect_of(scope["path"])
        request.request_id, request.dialect = request_id, dialect
        header = (REQUEST_ID_BYTES, request_id.encode())
        started = False
        oversized = _oversized(scope)

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            if oversized is not None:
                raise oversized
            await app(scope, receive, send_with_id)
        except ClientDisconnected:
            return
        except HTTPError as exc:
            if on_error is not None:
                on_error(exc.code)
            if started:
                log.warning("error after the response started (request %s): %s", request_id, exc)
                return
            await dialect.response(exc, request_id)(scope, receive, send_with_id)
        except Exception:
            if on_error is not None:
                on_error("internal_error")
            log.exception("unhandled error (request %s, %s %s)", request_id, scope["method"], scope["path"])
            if not started:
                error = HTTPError(
                    500, "internal_error", f"the server failed to handle the request; logged as request {request_id}"
                )
                await dialect.response(error, request_id)(scope, receive, send_with_id)

    return asgi
