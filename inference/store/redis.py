"""The Redis store: one connection pool, one Lua script per atomic operation, short timeouts.

When Redis fails or is slow, the store says so (StoreUnavailable) at once instead of making every request
wait for the timeout: after a failure it does not try again for RETRY_SECONDS, then lets one request probe.
The outage is logged once when it starts and once when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from importlib import resources
from typing import Awaitable, Callable, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .base import Decision, Policy, StoreUnavailable

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0
MIN_CONNECT_TIMEOUT = 1.0
MAX_CONNECTIONS = 64
T = TypeVar("T")


def _script(name: str) -> str:
    return (resources.files("inference.store") / "lua" / name).read_text()


class RedisStore:
    def __init__(self, url: str, *, password: str | None = None, timeout: float = 0.2,
                 on_state: Callable[[bool], None] | None = None) -> None:
        self.url = url
        self._client = aioredis.Redis.from_url(
            # A password in the URL wins over `password` (REDIS_PASSWORD, which keeps it out of the URL).
            url, password=password, socket_timeout=timeout, max_connections=MAX_CONNECTIONS, retry_on_timeout=False,
            # New connections come in bursts (a cold pool meeting concurrent requests) on a busy event loop:
            # give connecting more room than a command, so a burst is not mistaken for an outage.
            socket_connect_timeout=max(timeout, MIN_CONNECT_TIMEOUT),
        )
        # register_script: EVALSHA on every call, loading the script again only if Redis lost it.
        self._gcra = self._client.register_script(_script("gcra.lua"))
        self._refund = self._client.register_script(_script("refund.lua"))
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._on_state = on_state

    @property
    def state(self) -> str:
        return "down" if self._down_since is not None else "up"

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        if self._down_since is not None and time.monotonic() < self._retry_at:
            raise StoreUnavailable("redis is down")
        try:
            # redis-py bounds every connect (DNS included) and every read with the timeouts set above.
            result = await operation()
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self._retry_at = time.monotonic() + RETRY_SECONDS
            if isinstance(exc, (RedisConnectionError, OSError)):
                # The server closed this connection (restarted, failed over, dropped us): the others in the pool
                # are dead too. Close them all now, or each would fail one later call, and every such failure
                # marks the store down for RETRY_SECONDS more after the server is back.
                try:
                    await self._client.connection_pool.disconnect()
                except Exception:  # closing dead sockets may fail too; the next call reconnects either way
                    pass
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("redis at %s is unavailable (%s: %s); serving without it until it is back",
                            _safe(self.url), exc.__class__.__name__, exc)
                if self._on_state:
                    self._on_state(False)
            raise StoreUnavailable(str(exc)) from None
        if self._down_since is not None:
            log.warning("redis at %s is back after %.1f s", _safe(self.url), time.monotonic() - self._down_since)
            self._down_since = None
            if self._on_state:
                self._on_state(True)
        return result

    async def ping(self) -> bool:
        try:
            await self._call(self._client.ping)
        except StoreUnavailable:
            return False
        return True

    async def cache_get(self, key: str) -> bytes | None:
        return await self._call(lambda: self._client.get(key))

    async def cache_set(self, key: str, value: bytes, ttl: int) -> None:
        await self._call(lambda: self._client.set(key, value, px=ttl * 1000))

    async def claim(self, key: str, value: bytes, ttl: int) -> bytes | None:
        # One round trip: SET NX with GET returns the value already there (Redis >= 7.0, Valkey).
        return await self._call(lambda: self._client.set(key, value, px=ttl * 1000, nx=True, get=True))

    async def delete(self, key: str) -> bool:
        return bool(await self._call(lambda: self._client.delete(key)))

    async def acquire(self, key: str, policy: Policy, cost: int = 1) -> Decision:
        allowed, remaining, retry_us, reset_us = await self._call(
            lambda: self._gcra(keys=[key], args=[policy.interval_us, policy.burst, cost])
        )
        return Decision(bool(allowed), int(remaining), int(retry_us) / 1e6, int(reset_us) / 1e6)

    async def refund(self, key: str, policy: Policy, units: int) -> None:
        await self._call(lambda: self._refund(keys=[key], args=[policy.interval_us, units]))

    async def close(self) -> None:
        await self._client.aclose()


def _safe(url: str) -> str:
    """The URL without its password, for logs."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
