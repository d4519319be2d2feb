"""Hardening through the HTTP layer, against the real model: deadlines (the service's, the client's header), a
queue that drops what waited too long, refusals that say when to come back."""

import asyncio
import json

from conftest import Running, base_settings, call_asgi, own_engine

from inference.app import build_app

JSON = [("content-type", "application/json")]


def chat(engine, **fields):
    body = {"model": engine.info.name, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 400, **fields}
    return json.dumps(body).encode()


def test_a_client_deadline_header_ends_the_request_with_504(engine):
    async def scenario():
        async with Running(build_app(base_settings(), engine=engine)) as app:
            whole = await call_asgi(app, "POST", "/v1/chat/completions", chat(engine),
                                    JSON + [("x-request-timeout", "0.3")])
            streamed = await call_asgi(app, "POST", "/v1/chat/completions", chat(engine, stream=True),
                                       JSON + [("x-request-timeout", "0.3")])
            # The OpenAI SDKs' read timeout bounds a whole answer (not a stream, where it is per chunk).
            sdk = await call_asgi(app, "POST", "/v1/chat/completions", chat(engine),
                                  JSON + [("x-stainless-read-timeout", "0.3")])
            bad = await call_asgi(app, "POST", "/v1/chat/completions", chat(engine),
                                  JSON + [("x-request-timeout", "soon")])
            return whole, streamed, sdk, bad

    whole, streamed, sdk, bad = asyncio.run(scenario())
    assert whole.status == 504 and whole.json()["error"]["code"] == "timeout"
    assert sdk.status == 504
    # A stream has sent its 200 already: it ends with an error event, never silently.
    assert streamed.status == 200
    events = [line for line in streamed.body.decode().split("\n\n") if line.startswith("data: ")]
    assert json.loads(events[-1][6:])["error"]["code"] == "timeout" and "[DONE]" not in streamed.body.decode()
    assert bad.status == 400 and bad.json()["error"]["param"] == "X-Request-Timeout"


def test_the_service_deadline_applies_to_every_request(engine):
    async def scenario():
        async with Running(build_app(base_settings(request_timeout_seconds=0.3), engine=engine)) as app:
            return await call_asgi(app, "POST", "/api/v1/infer",
                                   json.dumps({"prompt": "Tell me a long story.", "max_tokens": 400}).encode(), JSON)

    response = asyncio.run(scenario())
    assert response.status == 504 and response.json()["error"]["code"] == "timeout"


def test_a_request_that_waited_too_long_is_a_503_with_retry_after(model_file):
    with own_engine(model_file, max_concurrent=1, queue_timeout=0.2) as small:
        async def scenario():
            async with Running(build_app(base_settings(), engine=small)) as app:
                hog = asyncio.ensure_future(call_asgi(app, "POST", "/v1/chat/completions", chat(small)))
                while not small.tokens_generated:
                    await asyncio.sleep(0.01)  # polling another thread's counter: no event to await
                waiting = await call_asgi(app, "POST", "/v1/chat/completions", chat(small, max_tokens=4))
                hog.cancel()
                return waiting

        waiting = asyncio.run(scenario())
    assert waiting.status == 503 and waiting.json()["error"]["code"] == "queue_timeout"
    assert int(waiting.headers["retry-after"]) >= 1
