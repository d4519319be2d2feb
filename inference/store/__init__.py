"""The shared state behind limits, the response cache and idempotency: Redis (every replica shares it; each atomic
operation one Lua script in lua/) or this process's memory. Imports nothing else of the service but config.
`create_store` is the one place that picks a store from the settings."""

from __future__ import annotations

from ..config import Settings
from .base import Store
from .memory import MemoryStore


def create_store(settings: Settings) -> Store:
    """Redis when REDIS_URL is set (shared by every replica), otherwise this process's memory."""
    if settings.redis_url:
        from .redis import RedisStore

        return RedisStore(settings.redis_url, password=settings.redis_auth, timeout=settings.redis_timeout_ms / 1000)
    return MemoryStore(settings.cache_max_bytes)
