"""Response caching for the inference routes, applied by their handlers once the request is validated.

The key is a hash of the whole normalized request: the endpoint, the model and its revision, every field of
the validated body with its defaults filled in, and any other field the client sent; a schema version
prefix means a change of format never serves stale shapes. Cached values are the exact response bytes:
b"J" + a JSON body, or b"S" + a server-sent event stream, replayed chunk by chunk. Only complete answers
are stored. Concurrent identical misses in one process run the model once (single flight).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from typing import Any, AsyncIterator, Awaitable, Callable

from opentelemetry import trace

from ..config import Settings
from ..web.errors import HTTPError
from ..web.http import JSON_TYPE, Request, Response, StreamingResponse, StreamOutcome
from ..store.base import Store, StoreUnavailable
from ..telemetry.tracing import Metrics, Tracing, span


def fingerprint(material: dict[str, Any]) -> str:
    """The sha256 of a request's normalized material as canonical JSON (sorted keys, no spaces): the response
    cache's key and an idempotency record's check that a retry is the same request."""
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()

log = logging.getLogger(__name__)

KEY_VERSION = "v1"
UNAVAILABLE = object()  # marker: the store could not be asked
HEADER = "x-cache"
JSON_ENTRY = b"J"
STREAM_ENTRY = b"S"
EVENT_END = b"\n\n"


def _directives(request: Request) -> set[str]:
    value = request.headers.get("cache-control", "")
    return {part.strip().lower() for part in value.split(",") if part.strip()}


class ResponseCache:
    def __init__(
        self, store: Store, settings: Settings, *, metrics: Metrics | None = None, tracing: Tracing | None = None
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.tracing = tracing or Tracing(trace.NoOpTracer())
        self.ttl = settings.cache_ttl_seconds
        self.mode = settings.cache_mode
        self.prefix = f"{settings.redis_key_prefix}:cache:{KEY_VERSION}:"
        self._inflight: dict[str, asyncio.Future[bytes | None]] = {}
        self._counted: dict[str, Any] = {}  # the cache metric's children by label (labels() locks and builds a key)

    def key(self, material: dict[str, Any]) -> str:
        return self.prefix + fingerprint(material)

    async def serve(
        self,
        request: Request,
        material: dict[str, Any],
        deterministic: bool,
        produce: Callable[[], Awaitable[Response]],
    ) -> Response:
        """The cached response for `material`, or `produce()`'s, stored when complete. Sets X-Cache."""
        directives = _directives(request)
        if self.mode == "off" or "no-store" in directives or (self.mode == "deterministic" and not deterministic):
            return await self._labelled(produce, "BYPASS")
        key = self.key(material)
        if "no-cache" not in directives:
            with span(request.scope, self.tracing, "cache lookup") as lookup:
                try:
                    cached = await self.store.cache_get(key)
                except StoreUnavailable:
                    lookup.set_attribute("inference.cache.result", "bypass")
                    cached = UNAVAILABLE
                else:
                    lookup.set_attribute("inference.cache.result", "hit" if cached is not None else "miss")
            if cached is UNAVAILABLE:
                return await self._labelled(produce, "BYPASS")
            if cached is not None:
                return self._replay(cached)
            leader = self._inflight.get(key)
            if leader is not None:
                shared = await asyncio.shield(leader)
                if shared is not None:
                    return self._replay(shared)
                # The leader's answer was cut short: produce our own, as a plain miss.
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        if key not in self._inflight:
            self._inflight[key] = future
        try:
            response = await self._labelled(produce, "MISS")
        except BaseException:
            self._settle(key, future, None)
            raise

        async def done(value: bytes | None) -> None:
            self._settle(key, future, value)
            if value is not None:
                await self._store(request, key, value)

        return await recorded(response, done)

    def _settle(self, key: str, future: asyncio.Future[bytes | None], value: bytes | None) -> None:
        if self._inflight.get(key) is future:
            del self._inflight[key]
        if not future.done():
            future.set_result(value)

    async def _store(self, request: Request, key: str, value: bytes) -> None:
        with span(request.scope, self.tracing, "cache store", **{"inference.cache.bytes": len(value)}):
            try:
                await self.store.cache_set(key, value, self.ttl)
            except StoreUnavailable:
                pass  # the store logs the outage once; the answer was served anyway

    def _count(self, label: str) -> None:
        if self.metrics is not None:
            child = self._counted.get(label)
            if child is None:
                child = self._counted[label] = self.metrics.cache.labels(label.lower())
            child.inc()

    def _replay(self, value: bytes) -> Response:
        self._count("HIT")
        return replay(value, "HIT")

    async def _labelled(self, produce: Callable[[], Awaitable[Response]], label: str) -> Response:
        self._count(label)
        try:
            response = await produce()
        except HTTPError as exc:
            exc.headers[HEADER] = label
            raise
        response.headers[HEADER] = label
        return response


def labelled_errors(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """An inference handler whose refusals before the cache is consulted (bad JSON, validation) say BYPASS."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except HTTPError as exc:
            exc.headers.setdefault(HEADER, "BYPASS")
            raise

    wrapped.__name__ = handler.__name__
    return wrapped


async def recorded(response: Response, done: Callable[[bytes | None], Awaitable[None]]) -> Response:
    """`response`, with `done` called once with its entry (b"J" + the JSON body, or b"S" + the whole event stream)
    when it is a complete 200 answer, or with None when it is not (an error, a stream cut short)."""
    if isinstance(response, StreamingResponse):
        response.chunks = _recording(response.chunks, response.outcome, done)
        return response
    await done(JSON_ENTRY + response.body if response.status == 200 else None)
    return response


async def _recording(inner: AsyncIterator[bytes], outcome: StreamOutcome,
                     done: Callable[[bytes | None], Awaitable[None]]) -> AsyncIterator[bytes]:
    chunks: list[bytes] = []
    value: bytes | None = None
    try:
        async for chunk in inner:
            chunks.append(chunk)
            yield chunk
        if outcome.complete:
            value = STREAM_ENTRY + b"".join(chunks)
    finally:
        await done(value)


def replay(value: bytes, label: str) -> Response:
    """A response from a cached entry: the same JSON body, or the same stream of events."""
    kind, body = value[:1], value[1:]
    if kind == JSON_ENTRY:
        return Response(body, media_type=JSON_TYPE, headers={HEADER: label})
    return StreamingResponse(_events(body), headers={HEADER: label})


async def _events(body: bytes) -> AsyncIterator[bytes]:
    start = 0
    while start < len(body):
        end = body.find(EVENT_END, start)
        end = len(body) if end < 0 else end + len(EVENT_END)
        yield body[start:end]
        start = end
