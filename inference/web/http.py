"""Request (a lazy view over the ASGI scope) and responses: JSON, bytes, server-sent events."""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any, AsyncIterator, Awaitable, Callable, MutableMapping
from urllib.parse import parse_qsl

import orjson

from .errors import HTTPError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HEADER_CONTENT_TYPE = "content-type"
HEADER_CONTENT_LENGTH = "content-length"
HEADER_REQUEST_ID = "x-request-id"
HEADER_RETRY_AFTER = "retry-after"
JSON_TYPE = "application/json"
SSE_TYPE = "text/event-stream"
MAX_JSON_DEPTH = 32
# A \uD800-\uDFFF escape: only then can a parsed string hold a surrogate (raw UTF-8 cannot encode one).
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class Request:
    """The parts of an ASGI HTTP request the handlers need, decoded on first use."""

    __slots__ = ("scope", "receive", "_headers")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.scope = scope
        self.receive = receive
        self._headers: dict[str, str] | None = None

    @property
    def method(self) -> str:
        return self.scope["method"]

    @property
    def path(self) -> str:
        return self.scope["path"]

    @property
    def path_params(self) -> dict[str, str]:
        return self.scope.get("path_params") or {}  # set by the router, as Starlette does

    @property
    def query(self) -> dict[str, str]:
        """The query string's parameters (the last of a repeated one)."""
        return dict(parse_qsl(self.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))

    @property
    def headers(self) -> dict[str, str]:
        if self._headers is None:
            # Repeated headers are joined as RFC 9110 allows; names are lower-case bytes in ASGI.
            headers: dict[str, str] = {}
            for name, value in self.scope["headers"]:
                key, val = name.decode("latin-1"), value.decode("latin-1")
                headers[key] = f"{headers[key]},{val}" if key in headers else val
            self._headers = headers
        return self._headers

    async def body(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """The whole body, or HTTPError(413) as soon as it is known to exceed `max_bytes`; HTTPError(408) if it has
        not all arrived within `timeout` seconds (a client trickling its body cannot hold a handler)."""
        declared = self.headers.get(HEADER_CONTENT_LENGTH)
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise _too_large(max_bytes)
        # One timer for the whole body (asyncio.timeout: no task per receive, as wait_for would make).
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    message = await self.receive()
                    if message["type"] == "http.disconnect":
                        raise ClientDisconnected()
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > max_bytes:
                        raise _too_large(max_bytes)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise HTTPError(408, "request_timeout", f"the request body did not arrive within {timeout:g} s",
                            headers={"Connection": "close"}) from None

    async def json(self, max_bytes: int, timeout: float | None = None) -> Any:
        """The body parsed as JSON; HTTPError(400) when it is not JSON or is nested absurdly deep."""
        return parse_json(await self.body(max_bytes, timeout))


class ClientDisconnected(Exception):
    """The client went away before the request was complete; nothing can be sent back."""


def _too_large(max_bytes: int) -> HTTPError:
    return HTTPError(413, "request_too_large", f"request body exceeds the limit of {max_bytes} bytes")


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> Any:
    """JSON as RFC 8259 wants it interoperable: UTF-8, no duplicate keys, no lone surrogates, finite numbers;
    anything else is HTTPError(400) `invalid_json`."""
    if not raw.strip():
        raise HTTPError(400, "invalid_json", "request body is empty; expected a JSON object")
    try:
        value = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except RecursionError:
        raise HTTPError(400, "invalid_json", "JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None
    # A body with no more brackets than the depth allowed cannot nest deeper (brackets inside strings only count
    # against it): the walk is for the rest.
    if raw.count(b"{") + raw.count(b"[") > MAX_JSON_DEPTH and _depth(value) > MAX_JSON_DEPTH:
        raise HTTPError(400, "invalid_json", f"JSON is nested more than {MAX_JSON_DEPTH} levels deep")
    if SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(value):
        raise HTTPError(400, "invalid_json", "request body is not valid JSON: a string holds an unpaired UTF-16 "
                        "surrogate escape (\\ud800-\\udfff), which is no character")
    return value


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"the key {duplicate!r} appears twice in one object")
    return value


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:40]} is too large for a 64-bit float")
    return value


# One decoder for every request (json.loads builds a new one per call when given hooks).
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite, object_pairs_hook=_unique)


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def _depth(value: Any, level: int = 1) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level)
    return level


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dump_json(value: Any) -> bytes:
    """Compact UTF-8 JSON: orjson's (a tenth of the json module's time on a chat completion), the json module's for
    what orjson refuses (an integer past 64 bits, from a client's schema echoed back)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_json_default).encode()


class Response:
    """A complete response whose body is known up front."""

    def __init__(
        self,
        body: bytes = b"",
        status: int = 200,
        headers: dict[str, str] | None = None,
        media_type: str = JSON_TYPE,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = {HEADER_CONTENT_TYPE: media_type, HEADER_CONTENT_LENGTH: str(len(body))}
        if headers:
            self.headers.update({k.lower(): v for k, v in headers.items()})

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.raw_headers()})
        await send({"type": "http.response.body", "body": self.body})


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dump_json(value), status=status, headers=headers)


class StreamOutcome:
    """Set by a stream's producer just before its last event, so that a cut-short stream is never cached."""

    __slots__ = ("complete",)

    def __init__(self) -> None:
        self.complete = False


class StreamingResponse(Response):
    """A response whose body chunks come from an async iterator, each sent as soon as it is produced.

    While it streams, a watcher waits for the client to disconnect (uvicorn then silently drops what is
    sent); `on_disconnect` is called at once so the producer can stop, and streaming ends.
    """

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        status: int = 200,
        headers: dict[str, str] | None = None,
        media_type: str = SSE_TYPE,
        on_disconnect: Callable[[], None] | None = None,
        outcome: StreamOutcome | None = None,
    ) -> None:
        super().__init__(b"", status, headers, media_type)
        del self.headers[HEADER_CONTENT_LENGTH]
        self.chunks = chunks
        self.on_disconnect = on_disconnect
        self.outcome = outcome or StreamOutcome()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            if self.on_disconnect is not None:
                self.on_disconnect()

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": self.status, "headers": self.raw_headers()})
            async for chunk in self.chunks:
                if gone.is_set():
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if not gone.is_set():
                await send({"type": "http.response.body", "body": b""})
        finally:
            watcher.cancel()
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        if gone.is_set():
            raise ClientDisconnected()


SSE_DONE = b"data: [DONE]\n\n"


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event carrying `data` as compact JSON."""
    payload = b"data: " + dump_json(data) + b"\n\n"
    return b"event: " + event.encode() + b"\n" + payload if event else payload
