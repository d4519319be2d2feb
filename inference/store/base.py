"""What the cache and the limiter need from a store, and what a rate-limit decision says."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class StoreUnavailable(Exception):
    """The store cannot be used right now (Redis down or slow); callers degrade instead of failing."""


@dataclass(frozen=True)
class Policy:
    """`limit` units per `window` seconds, up to `burst` of them at once."""

    name: str
    limit: int
    window: int
    burst: int

    @property
    def interval_us(self) -> int:
        """Microseconds between two units at the sustained rate (at least 1)."""
        return max(1, self.window * 1_000_000 // self.limit)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    remaining: int
    retry_after: float  # seconds until this request would be allowed (0 when allowed)
    reset_after: float  # seconds until the whole burst is available again


class Store(Protocol):
    """One store serves both concerns; its `state` is reported by /ready."""

    state: str  # "memory", "up" or "down"

    async def cache_get(self, key: str) -> bytes | None: ...

    async def cache_set(self, key: str, value: bytes, ttl: int) -> None: ...

    async def claim(self, key: str, value: bytes, ttl: int) -> bytes | None:
        """Set `key` to `value` for `ttl` seconds unless it exists; return what it held (None: claimed)."""

    async def delete(self, key: str) -> bool:
        """Remove `key`; whether it was there."""

    async def acquire(self, key: str, policy: Policy, cost: int = 1) -> Decision: ...

    async def refund(self, key: str, policy: Policy, units: int) -> None: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...
