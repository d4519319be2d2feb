"""Redis going away and coming back while the service is under load: nothing fails, both resume by themselves."""

import asyncio
import json

from conftest import RedisServer, Running, base_settings, call_asgi

from inference.app import build_app

JSON = [("content-type", "application/json")]


def ask(prompt):
    return json.dumps({"prompt": prompt, "max_tokens": 2, "temperature": 0}).encode()


def test_killing_redis_mid_load_causes_no_errors_and_restarting_restores_everything(engine, key_prefix, caplog):
    redis = RedisServer()
    settings = base_settings(redis_url=redis.url, redis_key_prefix=key_prefix, cache_mode="all",
                             rate_limit_enabled=True, rate_limit_per_minute=1000, redis_timeout_ms=100)

    async def scenario():
        async with Running(build_app(settings, engine=engine)) as app:
            before = [await call_asgi(app, "POST", "/api/v1/infer", ask("Hi"), JSON) for _ in range(2)]
            load = [asyncio.ensure_future(call_asgi(app, "POST", "/api/v1/infer", ask(f"Hi {i}"), JSON))
                    for i in range(6)]
            redis.stop()
            during = await asyncio.gather(*load)
            during += [await call_asgi(app, "POST", "/api/v1/infer", ask("Hi"), JSON) for _ in range(5)]
            ready_down = await call_asgi(app, "GET", "/ready")
            redis.start()
            app.service.store._retry_at = 0  # instead of waiting out the one-second back-off
            ready_up = await call_asgi(app, "GET", "/ready")
            after = [await call_asgi(app, "POST", "/api/v1/infer", ask("Hello"), JSON) for _ in range(2)]
            return before, during, ready_down, ready_up, after

    try:
        with caplog.at_level("WARNING"):
            before, during, ready_down, ready_up, after = asyncio.run(scenario())
    finally:
        redis.stop()
    assert [r.headers["x-cache"] for r in before] == ["MISS", "HIT"]
    assert all(r.status == 200 for r in during), [r.body for r in during if r.status != 200]
    assert "ratelimit" not in during[-1].headers  # failing open: no decision was made
    assert during[-1].headers["x-cache"] == "BYPASS"
    assert ready_down.status == 200 and ready_down.json() == {"status": "ready", "store": "down"}
    assert ready_up.json() == {"status": "ready", "store": "up"}
    assert [r.headers["x-cache"] for r in after] == ["MISS", "HIT"]
    assert all("ratelimit" in r.headers for r in after)
    warnings = [r.getMessage() for r in caplog.records if r.name == "inference.store.redis"]
    assert sum("unavailable" in m for m in warnings) == 1, warnings


def test_fail_closed_refuses_with_503_while_redis_is_down(engine, key_prefix):
    redis = RedisServer()
    settings = base_settings(redis_url=redis.url, redis_key_prefix=key_prefix, rate_limit_enabled=True,
                             rate_limit_fail_open=False, redis_timeout_ms=100)

    async def scenario():
        async with Running(build_app(settings, engine=engine)) as app:
            ok = await call_asgi(app, "POST", "/api/v1/infer", ask("Hi"), JSON)
            redis.stop()
            refused = await call_asgi(app, "POST", "/api/v1/infer", ask("Hi"), JSON)
            health = await call_asgi(app, "GET", "/health")
            return ok, refused, health

    try:
        ok, refused, health = asyncio.run(scenario())
    finally:
        redis.stop()
    assert ok.status == 200
    assert refused.status == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "rate_limiter_unavailable"
    assert health.status == 200


def test_unreachable_redis_at_start_still_serves(engine, key_prefix):
    from conftest import free_port

    settings = base_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_key_prefix=key_prefix,
                             cache_mode="all", rate_limit_enabled=True, redis_timeout_ms=100)

    async def scenario():
        async with Running(build_app(settings, engine=engine)) as app:
            return [await call_asgi(app, "POST", "/api/v1/infer", ask("Hi"), JSON) for _ in range(3)]

    results = asyncio.run(scenario())
    assert [r.status for r in results] == [200] * 3
    assert {r.headers["x-cache"] for r in results} == {"BYPASS"}


def test_a_slow_redis_counts_as_down_and_costs_at_most_its_timeout(engine, key_prefix, redis_server):
    import redis as redis_client

    settings = base_settings(redis_url=redis_server.url, redis_key_prefix=key_prefix, cache_mode="all",
                             rate_limit_enabled=True, redis_timeout_ms=100)
    admin = redis_client.Redis(port=redis_server.port)

    async def scenario():
        async with Running(build_app(settings, engine=engine)) as app:
            await call_asgi(app, "POST", "/api/v1/infer", ask("Hi"), JSON)
            admin.execute_command("CLIENT", "PAUSE", 3000, "ALL")  # Redis answers nothing for 3 s
            during = [await call_asgi(app, "POST", "/api/v1/infer", ask("Hi"), JSON) for _ in range(3)]
            state = app.service.store.state
            admin.execute_command("CLIENT", "UNPAUSE")
            return during, state

    during, state = asyncio.run(scenario())
    admin.close()
    assert [r.status for r in during] == [200, 200, 200]
    assert {r.headers["x-cache"] for r in during} == {"BYPASS"}
    # Had the timeout not fired, the first lookup would have waited out the pause and then hit the cache.
    assert state == "down"
