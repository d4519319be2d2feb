"""Rate limiting and API keys over ASGI, with the real engine and a real redis-server."""

import asyncio
import ipaddress
import json

import pytest
from conftest import Running, base_settings, call_asgi

from inference.app import build_app
from inference.web.identity import client_ip

BODY = json.dumps({"prompt": "Hi", "max_tokens": 1}).encode()
JSON = [("content-type", "application/json")]


def limited_settings(redis_server, key_prefix, **changes):
    # A generous timeout: these tests are about counting, and a slow moment on a busy machine must not fail open.
    return base_settings(rate_limit_enabled=True, redis_url=redis_server.url, redis_key_prefix=key_prefix,
                         redis_timeout_ms=2000, **changes)


def test_two_replicas_sharing_redis_let_exactly_the_limit_through(engine, redis_server, key_prefix):
    settings = limited_settings(redis_server, key_prefix, rate_limit_per_minute=10)

    async def scenario():
        async with Running(build_app(settings, engine=engine)) as one, Running(build_app(settings, engine=engine)) as two:
            calls = [call_asgi(one if i % 2 else two, "POST", "/api/v1/infer", BODY, JSON) for i in range(40)]
            return await asyncio.gather(*calls)

    results = asyncio.run(scenario())
    statuses = [r.status for r in results]
    assert statuses.count(200) == 10 and statuses.count(429) == 30
    for r in results:
        assert r.headers["ratelimit-policy"] == '"per-client";q=10;w=60'
    for r in (r for r in results if r.status == 429):
        error = r.json()["error"]
        assert error["code"] == "rate_limited"
        retry_after = int(r.headers["retry-after"])
        assert 1 <= retry_after <= 6
        assert r.headers["ratelimit"] == f'"per-client";r=0;t={retry_after}'
    remaining = sorted(int(r.headers["ratelimit"].split("r=")[1].split(";")[0]) for r in results if r.status == 200)
    assert remaining == list(range(10))


def test_health_ready_and_docs_are_never_limited(engine, redis_server, key_prefix):
    settings = limited_settings(redis_server, key_prefix, rate_limit_per_minute=1)

    async def scenario():
        async with Running(build_app(settings, engine=engine)) as app:
            return [await call_asgi(app, "GET", path) for path in ["/health", "/ready", "/openapi.json"] * 5]

    assert {r.status for r in asyncio.run(scenario())} == {200}


def test_api_keys_are_required_and_become_the_identity(engine, redis_server, key_prefix):
    settings = limited_settings(redis_server, key_prefix, rate_limit_per_minute=2, api_keys=("key-one-123", "key-two-456"))

    def bearer(key):
        return [*JSON, ("authorization", f"Bearer {key}")]

    async def scenario():
        async with Running(build_app(settings, engine=engine)) as app:
            missing = await call_asgi(app, "POST", "/api/v1/infer", BODY, JSON)
            wrong = await call_asgi(app, "POST", "/api/v1/infer", BODY, bearer("key-three-789"))
            models = await call_asgi(app, "GET", "/v1/models")
            health = await call_asgi(app, "GET", "/health")
            one = [await call_asgi(app, "POST", "/api/v1/infer", BODY, bearer("key-one-123")) for _ in range(3)]
            two = await call_asgi(app, "POST", "/api/v1/infer", BODY, bearer("key-two-456"))
            return missing, wrong, models, health, one, two

    missing, wrong, models, health, one, two = asyncio.run(scenario())
    assert (missing.status, missing.json()["error"]["code"]) == (401, "missing_api_key")
    assert (wrong.status, wrong.json()["error"]["code"]) == (401, "invalid_api_key")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert models.status == 401 and models.json()["error"]["type"] == "authentication_error"
    assert health.status == 200
    assert [r.status for r in one] == [200, 200, 429]  # the key has its own budget...
    assert two.status == 200  # ...separate from the other key's, though both come from one address


def test_openai_sdk_sees_authentication_and_rate_limit_errors(engine, redis_server, key_prefix):
    import openai
    from conftest import InProcessServer

    settings = limited_settings(redis_server, key_prefix, rate_limit_per_minute=1, api_keys=("sdk-key-123",))
    server = InProcessServer(build_app(settings, engine=engine))
    try:
        server.wait_ready()
        model = engine.info.name
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong-key", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}])
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="sdk-key-123", max_retries=0) as good:
            good.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
            with pytest.raises(openai.RateLimitError) as err:
                good.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
            assert int(err.value.response.headers["retry-after"]) > 0
    finally:
        server.stop()


PROXIES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32"))


@pytest.mark.parametrize("peer, forwarded, proxies, expected", [
    ("127.0.0.1", None, (), "127.0.0.1"),
    ("127.0.0.1", "203.0.113.9", (), "127.0.0.1"),  # never trusted by default
    ("198.51.100.7", "203.0.113.9", PROXIES, "198.51.100.7"),  # the peer is not a trusted proxy
    ("127.0.0.1", "203.0.113.9", PROXIES, "203.0.113.9"),
    ("127.0.0.1", "1.1.1.1, 203.0.113.9, 10.1.2.3", PROXIES, "203.0.113.9"),  # rightmost untrusted hop
    ("127.0.0.1", "10.0.0.5, 10.1.2.3", PROXIES, "10.0.0.5"),  # all trusted: the farthest one
    ("127.0.0.1", "garbage, 203.0.113.9", PROXIES, "203.0.113.9"),
])
def test_client_ip_honours_forwarded_for_only_from_trusted_proxies(peer, forwarded, proxies, expected):
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
    assert client_ip({"client": (peer, 1234), "headers": headers}, proxies) == expected


def test_clients_behind_a_trusted_proxy_are_limited_separately(engine, redis_server, key_prefix):
    settings = limited_settings(redis_server, key_prefix, rate_limit_per_minute=1,
                                trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),))

    async def scenario():
        async with Running(build_app(settings, engine=engine)) as app:
            out = []
            for client in ["203.0.113.1", "203.0.113.2", "203.0.113.1"]:
                out.append(await call_asgi(app, "POST", "/api/v1/infer", BODY, [*JSON, ("x-forwarded-for", client)]))
            return [r.status for r in out]

    assert asyncio.run(scenario()) == [200, 200, 429]


def test_token_budget_reserves_max_tokens_and_refunds_the_rest(engine, redis_server, key_prefix):
    settings = limited_settings(redis_server, key_prefix, rate_limit_per_minute=100, rate_limit_tokens_per_minute=60)

    def ask(max_tokens):
        return json.dumps({"prompt": "What is 2+2?", "temperature": 0, "max_tokens": max_tokens}).encode()

    async def scenario():
        async with Running(build_app(settings, engine=engine)) as app:
            first = await call_asgi(app, "POST", "/api/v1/infer", ask(50), JSON)
            await asyncio.sleep(0)  # let the refund task run
            await app.service.generator.budget.settled()
            second = await call_asgi(app, "POST", "/api/v1/infer", ask(40), JSON)
            third = await call_asgi(app, "POST", "/api/v1/infer", ask(50), JSON)
            return first, second, third

    first, second, third = asyncio.run(scenario())
    used = first.json()["completion_tokens"]
    assert first.status == 200 and used < 20
    # Without the refund of 50 - used, 40 more would not fit into 60 per minute.
    assert second.status == 200
    assert third.status == 429 and third.json()["error"]["code"] == "tokens_rate_limited"
    assert third.headers["ratelimit-policy"] == '"tokens";q=60;w=60'


def test_token_budget_counts_every_choice(engine, redis_server, key_prefix):
    settings = limited_settings(redis_server, key_prefix, rate_limit_per_minute=100, rate_limit_tokens_per_minute=60)
    # End-of-sequence tokens banned: both choices run to max_tokens, so the two use the whole budget.
    body = {"model": engine.info.name, "messages": [{"role": "user", "content": "Tell me a story."}], "n": 2,
            "max_tokens": 30, "seed": 1, "logit_bias": {str(engine.tokenize("<|im_end|>", special=True)[0]): -100}}

    async def scenario():
        async with Running(build_app(settings, engine=engine)) as app:
            first = await call_asgi(app, "POST", "/v1/chat/completions", json.dumps(body).encode(), JSON)
            await app.service.generator.budget.settled()
            second = await call_asgi(app, "POST", "/v1/chat/completions",
                                     json.dumps({**body, "n": 1, "max_tokens": 5}).encode(), JSON)
            return first, second

    first, second = asyncio.run(scenario())
    assert first.status == 200 and first.json()["usage"]["completion_tokens"] == 60
    assert second.status == 429 and second.json()["error"]["code"] == "tokens_rate_limited"
