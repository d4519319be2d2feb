"""The in-process store: used when REDIS_URL is not set, so a single replica works with no Redis at all."""

from __future__ import annotations

import time
from collections import OrderedDict

from .base import Decision, Policy


class MemoryStore:
    """A bounded LRU cache with expiry, and GCRA budgets with the same arithmetic as store/lua/gcra.lua."""

    state = "memory"

    def __init__(self, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._cache: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0
        self._tat: dict[str, int] = {}  # theoretical arrival time per client, monotonic microseconds

    async def cache_get(self, key: str) -> bytes | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires <= time.monotonic():
            self._drop(key)
            return None
        self._cache.move_to_end(key)
        return value

    async def cache_set(self, key: str, value: bytes, ttl: int) -> None:
        if len(value) > self.max_bytes:
            return
        if key in self._cache:
            self._drop(key)
        self._cache[key] = (time.monotonic() + ttl, value)
        self._bytes += len(value)
        while self._bytes > self.max_bytes:
            self._drop(next(iter(self._cache)))

    async def claim(self, key: str, value: bytes, ttl: int) -> bytes | None:
        existing = await self.cache_get(key)
        if existing is None:
            await self.cache_set(key, value, ttl)
        return existing

    async def delete(self, key: str) -> bool:
        if await self.cache_get(key) is None:  # expired counts as gone
            return False
        self._drop(key)
        return True

    def _drop(self, key: str) -> None:
        _, value = self._cache.pop(key)
        self._bytes -= len(value)

    async def acquire(self, key: str, policy: Policy, cost: int = 1) -> Decision:
        # Whole microseconds, as Redis's TIME gives: with an integer interval the arithmetic is exact, so the
        # remaining count never comes out one short from float rounding.
        now = time.monotonic_ns() // 1000
        interval = policy.interval_us
        tolerance = interval * policy.burst
        tat = max(self._tat.get(key, now), now)
        new_tat = tat + interval * cost
        allow_at = new_tat - tolerance
        if allow_at > now:
            remaining = max(0, int((tolerance - (tat - now)) // interval))
            return Decision(False, remaining, (allow_at - now) / 1e6, (tat - now) / 1e6)
        self._tat[key] = new_tat
        if len(self._tat) > 100_000:  # forget clients whose budget is full again
            self._tat = {k: v for k, v in self._tat.items() if v > now}
        return Decision(True, int((now - allow_at) // interval), 0.0, (new_tat - now) / 1e6)

    async def refund(self, key: str, policy: Policy, units: int) -> None:
        if key in self._tat:
            self._tat[key] -= policy.interval_us * units

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._cache.clear()
