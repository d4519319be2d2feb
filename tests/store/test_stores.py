"""Both stores against the same expectations; the Redis one against a real redis-server."""

import asyncio

import pytest

from inference.store.base import Policy
from inference.store.memory import MemoryStore
from inference.store.redis import RedisStore

PER_MINUTE = Policy("test", limit=10, window=60, burst=10)


@pytest.fixture(params=["memory", "redis"])
def make_store(request, redis_server):
    # These tests are about the arithmetic: a generous timeout, so that 40 connections opened at once on a busy
    # machine are not mistaken for an outage (the outage tests below use short ones).
    def make():
        return MemoryStore() if request.param == "memory" else RedisStore(redis_server.url, timeout=5)

    return make


def run(coro):
    return asyncio.run(coro)


def test_exactly_the_burst_passes_when_many_arrive_at_once(make_store, key_prefix):
    async def scenario():
        store = make_store()
        try:
            return await asyncio.gather(*[store.acquire(f"{key_prefix}:rl:c", PER_MINUTE) for _ in range(40)])
        finally:
            await store.close()

    decisions = run(scenario())
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == 10
    assert sorted(d.remaining for d in allowed) == list(range(10))
    for refused in (d for d in decisions if not d.allowed):
        assert refused.remaining == 0
        assert 5.5 < refused.retry_after <= 6.0  # one request's worth of a 10-per-minute budget
        assert refused.reset_after == pytest.approx(60, abs=1)


def test_clients_have_separate_budgets(make_store, key_prefix):
    async def scenario():
        store = make_store()
        a = [await store.acquire(f"{key_prefix}:rl:a", PER_MINUTE) for _ in range(11)]
        b = await store.acquire(f"{key_prefix}:rl:b", PER_MINUTE)
        await store.close()
        return a, b

    a, b = run(scenario())
    assert [d.allowed for d in a] == [True] * 10 + [False]
    assert b.allowed and b.remaining == 9


def test_costs_and_refunds(make_store, key_prefix):
    tokens = Policy("tokens", limit=100, window=60, burst=100)

    async def scenario():
        store = make_store()
        key = f"{key_prefix}:tpm:c"
        first = await store.acquire(key, tokens, 80)
        refused = await store.acquire(key, tokens, 30)
        await store.refund(key, tokens, 50)  # 80 reserved, 30 used
        again = await store.acquire(key, tokens, 30)
        await store.close()
        return first, refused, again

    first, refused, again = run(scenario())
    assert first.allowed and first.remaining == 20
    assert not refused.allowed and refused.remaining == 20
    assert again.allowed and again.remaining == 40


def test_cache_round_trip_and_ttl(make_store, key_prefix, redis_server):
    async def scenario():
        store = make_store()
        await store.cache_set(f"{key_prefix}:cache:v1:a", b"J{}", 30)
        value = await store.cache_get(f"{key_prefix}:cache:v1:a")
        missing = await store.cache_get(f"{key_prefix}:cache:v1:b")
        await store.close()
        return value, missing

    assert run(scenario()) == (b"J{}", None)


def test_redis_writes_carry_their_ttl(redis_server, key_prefix):
    import redis

    async def scenario():
        store = RedisStore(redis_server.url, timeout=5)
        await store.acquire(f"{key_prefix}:rl:c", PER_MINUTE)
        await store.cache_set(f"{key_prefix}:cache:v1:x", b"J1", 60)
        await store.close()

    run(scenario())
    client = redis.Redis(port=redis_server.port)
    assert 5_000 < client.pttl(f"{key_prefix}:rl:c") <= 6_000  # one request of 10/minute: gone after 6 s
    assert 59_000 < client.pttl(f"{key_prefix}:cache:v1:x") <= 60_000
    client.close()


def test_memory_cache_expires_and_stays_within_its_byte_budget():
    import time

    store = MemoryStore(max_bytes=100)

    async def scenario():
        await store.cache_set("a", b"x" * 60, 1)
        await store.cache_set("b", b"y" * 60, 60)  # over budget: the least recently used entry goes
        evicted = await store.cache_get("a")
        await store.cache_set("c", b"z" * 10, 1)
        time.sleep(1.05)  # expiry is a matter of time, not of any event
        return evicted, await store.cache_get("b"), await store.cache_get("c")

    assert run(scenario()) == (None, b"y" * 60, None)


def test_redis_down_is_reported_fast_and_recovery_is_noticed(redis_server, key_prefix, caplog):
    from conftest import RedisServer

    from inference.store.base import StoreUnavailable

    own = RedisServer()

    async def scenario():
        store = RedisStore(own.url, timeout=0.2)
        assert await store.acquire(f"{key_prefix}:rl:c", PER_MINUTE)
        own.stop()
        failures = 0
        for _ in range(20):
            try:
                await store.cache_get("k")
            except StoreUnavailable:
                failures += 1
        assert failures == 20 and store.state == "down"
        own.start()
        store._retry_at = 0  # skip the back-off instead of sleeping through it
        assert await store.cache_get("k") is None
        assert store.state == "up"
        await store.close()

    try:
        with caplog.at_level("WARNING", logger="inference.store.redis"):
            run(scenario())
    finally:
        own.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unavailable" in m for m in messages) == 1, messages  # once per outage, not per request
    assert sum("is back after" in m for m in messages) == 1


def test_a_pool_of_connections_from_before_a_redis_restart_does_not_delay_recovery(key_prefix):
    """Connections opened before Redis went away are dead once it is back: the first call after the back-off must
    reach the new server, and no later call may fail on another stale pooled connection (each such failure marked
    the store down for a second more: the hardening script's Redis restart saw it flap for seconds)."""
    from conftest import RedisServer

    from inference.store.base import StoreUnavailable

    own = RedisServer()

    async def scenario():
        store = RedisStore(own.url, timeout=0.2)
        await asyncio.gather(*(store.cache_get(f"{key_prefix}:{i}") for i in range(8)))  # 8 pooled connections
        own.stop()
        with pytest.raises(StoreUnavailable):
            await store.cache_get("k")
        own.start()
        for attempt in range(3):
            store._retry_at = 0  # skip the back-off instead of sleeping through it
            try:
                await store.cache_get("k")
                break
            except StoreUnavailable:
                pass
        assert (attempt, store.state) == (0, "up")
        # The other pooled connections died with the old server too: none of them may fail a call now.
        await asyncio.gather(*(store.cache_get(f"{key_prefix}:{i}") for i in range(8)))
        assert store.state == "up"
        await store.close()

    try:
        run(scenario())
    finally:
        own.stop()


def test_redis_password_comes_from_its_own_setting(key_prefix, tmp_path):
    """REDIS_PASSWORD, or REDIS_PASSWORD_FILE (a Secret mounted as a file in Kubernetes), authenticates a REDIS_URL
    that carries none; without it the store reports Redis unavailable instead of failing requests."""
    from conftest import RedisServer

    from inference.store import create_store
    from inference.config import Settings
    from inference.store.base import StoreUnavailable

    own = RedisServer(password="s3cret-from-a-secret")

    async def scenario():
        settings = Settings.from_env({"REDIS_URL": own.url, "REDIS_PASSWORD": own.password}, env_file=None)
        store = create_store(settings)
        await store.cache_set(f"{key_prefix}:k", b"v", 60)
        assert await store.cache_get(f"{key_prefix}:k") == b"v"
        await store.close()
        secret = tmp_path / "password"
        secret.write_text(own.password + "\n")
        from_file = create_store(Settings.from_env({"REDIS_URL": own.url, "REDIS_PASSWORD_FILE": str(secret)},
                                                   env_file=None))
        assert await from_file.cache_get(f"{key_prefix}:k") == b"v"
        await from_file.close()
        anonymous = create_store(Settings.from_env({"REDIS_URL": own.url}, env_file=None))
        with pytest.raises(StoreUnavailable):
            await anonymous.cache_get(f"{key_prefix}:k")
        await anonymous.close()

    try:
        run(scenario())
    finally:
        own.stop()
