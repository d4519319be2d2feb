"""/metrics after real requests, parsed with prometheus-client's own parser."""

import asyncio
import json

from conftest import Running, base_settings, call_asgi
from prometheus_client.parser import text_string_to_metric_families

from inference.app import build_app

JSON = [("content-type", "application/json")]
FAMILIES = {
    "inference_http_requests", "inference_http_request_duration_seconds", "inference_requests_in_flight",
    "inference_queue_depth", "inference_cache_requests", "inference_rate_limited", "inference_tokens",
    "inference_time_to_first_token_seconds", "inference_time_per_output_token_seconds",
    "inference_generation_duration_seconds", "inference_errors", "inference_redis_up", "inference_model_info",
    "inference_prompt_tokens_reused",
}


def scrape(app):
    return asyncio.run(ascrape(app))


async def ascrape(app):
    result = await call_asgi(app, "GET", "/metrics")
    assert result.status == 200 and result.headers["content-type"].startswith("text/plain")
    samples = {}
    names = set()
    for family in text_string_to_metric_families(result.body.decode()):
        names.add(family.name)
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return names, samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_with_real_requests(engine, redis_server, key_prefix):
    settings = base_settings(redis_url=redis_server.url, redis_key_prefix=key_prefix, cache_mode="all",
                             redis_timeout_ms=2000, rate_limit_enabled=True, rate_limit_per_minute=4)
    app = build_app(settings, engine=engine)
    body = json.dumps({"prompt": "What is 2+2?", "temperature": 0, "max_tokens": 16}).encode()

    async def scenario():
        async with Running(app):
            first = await call_asgi(app, "POST", "/api/v1/infer", body, JSON)   # miss: generates
            second = await call_asgi(app, "POST", "/api/v1/infer", body, JSON)  # hit
            bad = await call_asgi(app, "POST", "/api/v1/infer", b'{"prompt": ""}', JSON)  # 422, bypass
            nocache = await call_asgi(app, "POST", "/api/v1/infer", body, [*JSON, ("cache-control", "no-store")])
            limited = await call_asgi(app, "POST", "/api/v1/infer", body, JSON)  # the 5th: over 4 per minute
            missing = await call_asgi(app, "GET", "/nope")
            return first, second, bad, nocache, limited, missing

    first, second, bad, nocache, limited, missing = asyncio.run(scenario())
    assert [r.status for r in (first, second, bad, nocache, limited, missing)] == [200, 200, 422, 200, 429, 404]
    names, samples = scrape(app)
    assert FAMILIES <= names, FAMILIES - names
    route = "/api/v1/infer"
    assert value(samples, "inference_http_requests_total", method="POST", route=route, status="200") == 3
    assert value(samples, "inference_http_requests_total", method="POST", route=route, status="422") == 1
    assert value(samples, "inference_http_requests_total", method="POST", route=route, status="429") == 1
    assert value(samples, "inference_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert value(samples, "inference_http_request_duration_seconds_count", method="POST", route=route) == 5
    assert value(samples, "inference_cache_requests_total", result="hit") == 1
    assert value(samples, "inference_cache_requests_total", result="miss") == 1
    assert value(samples, "inference_cache_requests_total", result="bypass") == 1  # no-store (422 never got there)
    assert value(samples, "inference_rate_limited_total") == 1
    generated = [first.json(), nocache.json()]
    assert value(samples, "inference_tokens_total", kind="prompt") == sum(r["prompt_tokens"] for r in generated)
    assert value(samples, "inference_tokens_total", kind="completion") == sum(r["completion_tokens"] for r in generated)
    assert value(samples, "inference_time_to_first_token_seconds_count") == 2
    assert value(samples, "inference_generation_duration_seconds_count") == 2
    assert value(samples, "inference_time_per_output_token_seconds_count") == 2
    assert value(samples, "inference_errors_total", type="validation_error") == 1
    assert value(samples, "inference_errors_total", type="rate_limited") == 1
    assert value(samples, "inference_errors_total", type="not_found") == 1
    assert value(samples, "inference_redis_up") == 1
    assert value(samples, "inference_queue_depth") == 0
    info = engine.info
    assert value(samples, "inference_model_info", model=info.name, revision=info.revision, backend=info.backend) == 1
    # No raw paths as labels: /nope became "unmatched".
    assert not any(dict(labels).get("route") == "/nope" for _, labels in samples)


def test_redis_up_follows_redis(engine, key_prefix):
    from conftest import RedisServer

    redis = RedisServer()
    app = build_app(base_settings(redis_url=redis.url, redis_key_prefix=key_prefix, cache_mode="all",
                                  redis_timeout_ms=100), engine=engine)
    body = json.dumps({"prompt": "Hi", "max_tokens": 1}).encode()

    async def scenario():
        async with Running(app):
            await call_asgi(app, "POST", "/api/v1/infer", body, JSON)
            up = (await ascrape(app))[1]
            redis.stop()
            await call_asgi(app, "POST", "/api/v1/infer", body, JSON)
            down = (await ascrape(app))[1]
            return up, down

    try:
        up, down = asyncio.run(scenario())
    finally:
        redis.stop()
    assert value(up, "inference_redis_up") == 1 and value(down, "inference_redis_up") == 0


def test_no_redis_no_redis_gauge(engine):
    app = build_app(base_settings(), engine=engine)
    names, _ = scrape(app)
    assert "inference_redis_up" not in names
    assert "inference_http_requests" in names


def test_reused_prompt_tokens_are_counted(engine):
    app = build_app(base_settings(), engine=engine)

    async def scenario():
        async with Running(app):
            before = engine.prompt_tokens_reused
            for question in ("Name a river.", "Name a mountain."):  # both start with SYSTEM_PROMPT
                body = json.dumps({"prompt": question, "temperature": 0, "max_tokens": 2}).encode()
                assert (await call_asgi(app, "POST", "/api/v1/infer", body, JSON)).status == 200
            _, samples = await ascrape(app)
            return engine.prompt_tokens_reused - before, samples

    reused, samples = asyncio.run(scenario())
    assert reused > 0  # the second request at least reused the system prompt
    assert value(samples, "inference_prompt_tokens_reused_total") == reused
