"""Idempotent retries: `Idempotency-Key` on the inference POSTs.

A client that retries after a timeout or a dropped connection sends the same key with the same body: it gets the
first attempt's answer (waiting for it if it is still being generated) instead of a second generation. The record
lives in the store (Redis when configured, so a retry that lands on another replica finds it), scoped to the
client (its API key, else its address), for IDEMPOTENCY_TTL_SECONDS:

  b"R" + body hash   the first attempt is running (expires on its own after REQUEST_TIMEOUT_SECONDS + a minute, so
                     a replica that died mid-request cannot hold the key for ever)
  b"D" + body hash + the response entry (the cache's format: JSON body or event stream)   it answered

Only complete 200 answers are kept; a failed or cut first attempt releases the key, so the retry runs. The same
key with another body is 422 `idempotency_key_reused`. One store round trip claims the key (SET NX GET).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any, Awaitable, Callable

from ..config import Settings
from ..web.errors import HTTPError
from ..web.http import Request, Response
from ..store.base import Store, StoreUnavailable
from .cache import fingerprint, recorded, replay
from ..web.identity import client_id

HEADER = "idempotency-key"
REPLAYED = "Idempotent-Replayed"
RUNNING, DONE = b"R", b"D"
HASH_LENGTH = 64
MAX_KEY_LENGTH = 255
POLL_FIRST, POLL_MAX = 0.05, 0.5  # seconds between looks at a running attempt (another replica's)
RUNNING_GRACE = 60  # seconds a running record outlives the request timeout


class Idempotency:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.ttl = settings.idempotency_ttl_seconds
        self.prefix = f"{settings.redis_key_prefix}:idem:"
        self._local: dict[str, asyncio.Future[bytes | None]] = {}  # attempts running in this process

    async def serve(self, request: Request, material: dict[str, Any], produce: Callable[[], Awaitable[Response]]
                    ) -> Response:
        key = request.headers.get(HEADER)
        if key is None:
            return await produce()
        if not 0 < len(key) <= MAX_KEY_LENGTH or not key.isprintable() or not key.isascii():
            raise HTTPError(400, "invalid_header", f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII "
                            "characters", field="Idempotency-Key")
        digest = fingerprint(material).encode()
        client = client_id(request.scope, self.settings.trusted_proxies)
        record_key = self.prefix + hashlib.sha256(f"{client}\n{key}".encode()).hexdigest()
        deadline = time.monotonic() + self.settings.request_timeout_seconds
        while True:
            try:
                existing = await self.store.claim(record_key, RUNNING + digest,
                                                  int(self.settings.request_timeout_seconds) + RUNNING_GRACE)
            except StoreUnavailable:
                return await produce()  # no record can be kept: serve, as the cache and the limiter do
            if existing is None:
                return await self._first(record_key, digest, produce)
            if existing[1:1 + HASH_LENGTH] != digest:
                raise HTTPError(422, "idempotency_key_reused", "this Idempotency-Key was used with another request "
                                "body; use a new key for a new request", field="Idempotency-Key")
            if existing[:1] == DONE:
                response = replay(existing[1 + HASH_LENGTH:], "")
                response.headers.pop("x-cache", None)
                response.headers[REPLAYED] = "true"
                return response
            if not await self._wait(record_key, deadline):
                raise HTTPError(409, "idempotency_key_in_progress", "the first request with this Idempotency-Key is "
                                "still running; retry later", field="Idempotency-Key",
                                headers={"Retry-After": "1"})

    async def _first(self, record_key: str, digest: bytes, produce: Callable[[], Awaitable[Response]]) -> Response:
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._local[record_key] = future

        async def settle(value: bytes | None) -> None:
            self._local.pop(record_key, None)
            if not future.done():
                future.set_result(value)
            try:
                if value is None:
                    await self.store.delete(record_key)  # the retry runs
                else:
                    await self.store.cache_set(record_key, DONE + digest + value, self.ttl)
            except StoreUnavailable:
                pass

        try:
            response = await produce()
        except BaseException:
            await settle(None)
            raise
        return await recorded(response, settle)

    async def _wait(self, record_key: str, deadline: float) -> bool:
        """Wait until the running attempt ends (True) or the deadline passes (False)."""
        local = self._local.get(record_key)
        if local is not None:
            try:
                await asyncio.wait_for(asyncio.shield(local), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return False
            return True
        delay = POLL_FIRST
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)  # another replica's attempt: the store is the only way to hear of it
            delay = min(delay * 2, POLL_MAX)
            try:
                current = await self.store.cache_get(record_key)
            except StoreUnavailable:
                return True  # ask again by claiming: serves without a record if the store stays down
            if current is None or current[:1] == DONE:
                return True
        return False
