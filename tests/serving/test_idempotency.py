"""Idempotency-Key: a retry gets the first answer instead of a second generation, in this process's store and
across replicas sharing Redis; another body is refused; a failed first attempt does not stick."""

import asyncio
import ipaddress
import json

import pytest
from conftest import Running, base_settings, call_asgi

from inference.app import build_app

JSON = [("content-type", "application/json")]


def story(engine, **fields):
    return json.dumps({"model": engine.info.name, "messages": [{"role": "user", "content": "Tell me a story."}],
                       "max_tokens": 12, "temperature": 1.0, **fields}).encode()


def keyed(key, *more):
    return JSON + [("idempotency-key", key), *more]


@pytest.fixture(params=["memory", "redis"])
def settings(request, redis_server, key_prefix):
    if request.param == "memory":
        return base_settings()
    return base_settings(redis_url=redis_server.url, redis_key_prefix=key_prefix, redis_timeout_ms=2000)


def test_a_retry_gets_the_first_answer_and_generates_nothing(engine, settings):
    async def scenario():
        async with Running(build_app(settings, engine=engine)) as app:
            first = await call_asgi(app, "POST", "/v1/chat/completions", story(engine), keyed("order-1"))
            generated = engine.tokens_generated
            retry = await call_asgi(app, "POST", "/v1/chat/completions", story(engine), keyed("order-1"))
            assert engine.tokens_generated == generated
            other_key = await call_asgi(app, "POST", "/v1/chat/completions", story(engine), keyed("order-2"))
            reused = await call_asgi(app, "POST", "/v1/chat/completions", story(engine, max_tokens=5),
                                     keyed("order-1"))
            return first, retry, other_key, reused

    first, retry, other_key, reused = asyncio.run(scenario())
    assert first.status == retry.status == 200 and retry.body == first.body  # temperature 1: only a replay matches
    assert retry.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert other_key.json()["id"] != first.json()["id"]
    assert reused.status == 400 and reused.json()["error"]["code"] == "idempotency_key_reused"


def test_concurrent_retries_wait_for_the_first_and_streams_replay(engine, settings):
    async def scenario():
        async with Running(build_app(settings, engine=engine)) as app:
            before = engine.tokens_generated
            both = await asyncio.gather(*(call_asgi(app, "POST", "/v1/chat/completions", story(engine, stream=True),
                                                    keyed("stream-1")) for _ in range(2)))
            return both, engine.tokens_generated - before

    (first, second), generated = asyncio.run(scenario())
    assert first.body == second.body and first.body.endswith(b"data: [DONE]\n\n")
    assert generated <= 12  # one generation for the two


def test_keys_belong_to_their_client(engine):
    settings = base_settings(trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),))

    async def scenario():
        async with Running(build_app(settings, engine=engine)) as app:
            body = json.dumps({"prompt": "Name a colour.", "max_tokens": 6, "temperature": 1.0}).encode()
            a = await call_asgi(app, "POST", "/api/v1/infer", body, keyed("k1", ("x-forwarded-for", "203.0.113.1")))
            b = await call_asgi(app, "POST", "/api/v1/infer", body, keyed("k1", ("x-forwarded-for", "203.0.113.2")))
            a_again = await call_asgi(app, "POST", "/api/v1/infer", body,
                                      keyed("k1", ("x-forwarded-for", "203.0.113.1")))
            other_body = await call_asgi(app, "POST", "/api/v1/infer", body.replace(b"colour", b"fruit"),
                                         keyed("k1", ("x-forwarded-for", "203.0.113.1")))
            return a, b, a_again, other_body

    a, b, a_again, other_body = asyncio.run(scenario())
    assert "idempotent-replayed" not in b.headers  # another client's key of the same name is its own
    assert a_again.headers["idempotent-replayed"] == "true" and a_again.body == a.body
    assert other_body.status == 422 and other_body.json()["error"]["code"] == "idempotency_key_reused"


def test_a_failed_first_attempt_lets_the_retry_run(engine):
    async def scenario():
        async with Running(build_app(base_settings(), engine=engine)) as app:
            long = story(engine, max_tokens=300, logit_bias={"2": -100})
            failed = await call_asgi(app, "POST", "/v1/chat/completions", long,
                                     keyed("job-9", ("x-request-timeout", "0.2")))
            retried = await call_asgi(app, "POST", "/v1/chat/completions", long, keyed("job-9"))
            bad = await call_asgi(app, "POST", "/v1/chat/completions", long, keyed("x" * 300))
            return failed, retried, bad

    failed, retried, bad = asyncio.run(scenario())
    assert failed.status == 504
    assert retried.status == 200 and "idempotent-replayed" not in retried.headers
    assert retried.json()["usage"]["completion_tokens"] == 300
    assert bad.status == 400 and bad.json()["error"]["param"] == "Idempotency-Key"


def test_replicas_sharing_redis_share_the_keys(engine, redis_server, key_prefix):
    settings = base_settings(redis_url=redis_server.url, redis_key_prefix=key_prefix, redis_timeout_ms=2000)

    async def scenario():
        async with Running(build_app(settings, engine=engine)) as one, Running(build_app(settings, engine=engine)) as two:
            first = await call_asgi(one, "POST", "/v1/chat/completions", story(engine), keyed("shared"))
            retry = await call_asgi(two, "POST", "/v1/chat/completions", story(engine), keyed("shared"))
            return first, retry

    first, retry = asyncio.run(scenario())
    assert retry.headers["idempotent-replayed"] == "true" and retry.body == first.body
