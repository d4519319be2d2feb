"""Response caching over ASGI with the real engine: Redis-backed and in-memory."""

import asyncio
import json

import pytest
from conftest import Running, base_settings, call_asgi

from inference.app import build_app

JSON = [("content-type", "application/json")]


@pytest.fixture(params=["redis", "memory"])
def cache_settings(request, redis_server, key_prefix):
    redis_url = redis_server.url if request.param == "redis" else None
    return lambda **changes: base_settings(**{"cache_mode": "all", "redis_url": redis_url, "redis_timeout_ms": 2000,
                                              "redis_key_prefix": key_prefix, **changes})


def post(app, path, body, headers=()):
    return call_asgi(app, "POST", path, json.dumps(body).encode(), [*JSON, *headers])


def test_repeat_is_a_hit_with_the_identical_body(engine, cache_settings):
    async def scenario():
        async with Running(build_app(cache_settings(), engine=engine)) as app:
            body = {"prompt": "Name a fruit.", "max_tokens": 8, "temperature": 0.9}
            first = await post(app, "/api/v1/infer", body)
            before = engine.tokens_generated
            second = await post(app, "/api/v1/infer", body)
            return first, second, engine.tokens_generated - before

    first, second, generated = asyncio.run(scenario())
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert second.body == first.body
    assert generated == 0


def test_openai_responses_are_cached_whole(engine, cache_settings):
    async def scenario():
        async with Running(build_app(cache_settings(), engine=engine)) as app:
            body = {"model": engine.info.name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
            return [await post(app, "/v1/chat/completions", body) for _ in range(2)]

    first, second = asyncio.run(scenario())
    assert [first.headers["x-cache"], second.headers["x-cache"]] == ["MISS", "HIT"]
    assert first.body == second.body  # the same id and created too: it is the same response


@pytest.mark.parametrize("path, base, variations", [
    ("/api/v1/infer", {"prompt": "Hi", "max_tokens": 3, "temperature": 0},
     [{"prompt": "Hi!"}, {"max_tokens": 4}, {"temperature": 0.1}, {"top_p": 0.9}, {"stop": ["x"]}, {"seed": 1},
      {"stream": True}]),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 3, "temperature": 0},
     [{"prompt": "Hi!"}, {"max_tokens": 4}, {"seed": 2}, {"stop": "x"}, {"user": "someone"}, {"frequency_penalty": 0.5},
      {"repetition_penalty": 1.1}, {"n": 2}, {"logprobs": 1},
      {"stream": True}, {"stream": True, "stream_options": {"include_usage": True}}]),
])
def test_every_parameter_is_part_of_the_key(engine, cache_settings, path, base, variations):
    async def scenario():
        async with Running(build_app(cache_settings(), engine=engine)) as app:
            if path.startswith("/v1"):
                base["model"] = engine.info.name
            assert (await post(app, path, base)).headers["x-cache"] == "MISS"
            assert (await post(app, path, base)).headers["x-cache"] == "HIT"
            labels = [(await post(app, path, {**base, **v})).headers["x-cache"] for v in variations]
            # Defaults spelled out are the same request: the key is the normalized body.
            spelled = await post(app, path, {**base, "top_p": 1.0, "seed": None})
            return labels, spelled.headers["x-cache"]

    labels, spelled = asyncio.run(scenario())
    assert labels == ["MISS"] * len(variations)
    assert spelled == "HIT"


def test_a_new_model_revision_never_serves_old_entries(engine, cache_settings):
    from inference.serving.cache import ResponseCache
    from inference.store.memory import MemoryStore

    cache = ResponseCache(MemoryStore(), cache_settings())
    one = cache.key({"endpoint": "/api/v1/infer", "model": "m", "revision": "aaa", "body": {"prompt": "x"}})
    two = cache.key({"endpoint": "/api/v1/infer", "model": "m", "revision": "bbb", "body": {"prompt": "x"}})
    assert one != two and one.split(":")[-2] == "v1"


def test_cache_control_and_modes(engine, cache_settings):
    body = {"prompt": "Hi", "max_tokens": 3, "temperature": 0.8}

    async def scenario():
        async with Running(build_app(cache_settings(), engine=engine)) as app:
            labels = [(await post(app, "/api/v1/infer", body, [("cache-control", "no-store")])).headers["x-cache"]]
            labels.append((await post(app, "/api/v1/infer", body)).headers["x-cache"])  # no-store stored nothing
            labels.append((await post(app, "/api/v1/infer", body, [("cache-control", "no-cache")])).headers["x-cache"])
            labels.append((await post(app, "/api/v1/infer", body)).headers["x-cache"])
        async with Running(build_app(cache_settings(cache_mode="deterministic"), engine=engine)) as app:
            labels.append((await post(app, "/api/v1/infer", {**body, "prompt": "Yo"})).headers["x-cache"])
            labels.append((await post(app, "/api/v1/infer", {**body, "prompt": "Yo", "temperature": 0})).headers["x-cache"])
            labels.append((await post(app, "/api/v1/infer", {**body, "prompt": "Yo", "seed": 5})).headers["x-cache"])
        async with Running(build_app(cache_settings(cache_mode="off"), engine=engine)) as app:
            labels.append((await post(app, "/api/v1/infer", body)).headers["x-cache"])
        return labels

    assert asyncio.run(scenario()) == ["BYPASS", "MISS", "MISS", "HIT", "BYPASS", "MISS", "MISS", "BYPASS"]


def test_errors_on_inference_routes_carry_x_cache(engine, cache_settings):
    async def scenario():
        async with Running(build_app(cache_settings(), engine=engine)) as app:
            return await post(app, "/api/v1/infer", {"prompt": "word " * 2100, "max_tokens": 10})

    result = asyncio.run(scenario())
    assert result.status == 400 and result.headers["x-cache"] == "MISS"


def sse_chunks(result):
    return [c + b"\n\n" for c in result.body.split(b"\n\n") if c]


@pytest.mark.parametrize("path, body", [
    ("/api/v1/infer", {"prompt": "Tell me about cats.", "max_tokens": 12, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me about cats."}], "max_tokens": 12,
                              "stream": True, "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Tell me about cats."}], "max_tokens": 12,
                              "stream": True, "n": 2, "logprobs": True, "top_logprobs": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Weather in Rome?"}], "max_tokens": 30,
                              "stream": True, "tool_choice": "required", "tools": [{"type": "function", "function": {
                                  "name": "weather", "parameters": {"type": "object", "properties": {
                                      "city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}]}),
])
def test_a_cached_stream_is_replayed_as_the_same_chunks(engine, cache_settings, path, body):
    async def scenario():
        async with Running(build_app(cache_settings(), engine=engine)) as app:
            if path.startswith("/v1"):
                body["model"] = engine.info.name
            first = await post(app, path, body)
            second = await post(app, path, body)
            return first, second

    first, second = asyncio.run(scenario())
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert second.headers["content-type"] == "text/event-stream"
    assert len(sse_chunks(first)) > 5
    assert sse_chunks(second) == sse_chunks(first)


def test_a_stream_cut_short_is_not_stored(engine, cache_settings):
    from inference.web.http import ClientDisconnected  # noqa: F401 (the app raises it internally)

    body = json.dumps({"prompt": "Write a long story about the moon.", "max_tokens": 200, "stream": True}).encode()

    async def scenario():
        async with Running(build_app(cache_settings(), engine=engine)) as app:
            gone = asyncio.Event()
            messages = [{"type": "http.request", "body": body, "more_body": False}]
            chunks = []

            async def receive():
                if messages:
                    return messages.pop(0)
                await gone.wait()
                return {"type": "http.disconnect"}

            async def send(message):
                if message["type"] == "http.response.body" and message.get("body"):
                    chunks.append(message["body"])
                    if len(chunks) == 3:
                        gone.set()

            scope = {"type": "http", "method": "POST", "path": "/api/v1/infer", "headers": [], "query_string": b"",
                     "client": ("127.0.0.1", 1)}
            await app(scope, receive, send)
            again = await call_asgi(app, "POST", "/api/v1/infer", body, JSON)
            return chunks, again

    chunks, again = asyncio.run(scenario())
    assert len(chunks) < 10
    assert again.headers["x-cache"] == "MISS"
    assert sse_chunks(again)[-1].startswith(b"event: done")


def test_concurrent_identical_misses_run_the_model_once(engine, cache_settings):
    body = {"prompt": "Name a river.", "max_tokens": 10, "temperature": 0.9}

    async def scenario():
        async with Running(build_app(cache_settings(), engine=engine)) as app:
            before = engine.tokens_generated
            results = await asyncio.gather(*[post(app, "/api/v1/infer", body) for _ in range(5)])
            return results, engine.tokens_generated - before

    results, generated = asyncio.run(scenario())
    assert sorted(r.headers["x-cache"] for r in results) == ["HIT"] * 4 + ["MISS"]
    assert len({r.body for r in results}) == 1
    assert generated == results[0].json()["completion_tokens"]
