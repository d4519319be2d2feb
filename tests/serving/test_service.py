"""The app's request path with the real engine, driven directly over ASGI (no server)."""

import asyncio
import json

from conftest import Running, base_settings

from inference.app import build_app
from inference.engine.base import GenerationRequest, SamplingParams


def test_client_that_disconnects_stops_generation_within_a_few_tokens(engine):
    app = build_app(base_settings(), engine=engine)
    body = json.dumps({"prompt": "Write a very long essay about mountains.", "max_tokens": 300}).encode()
    sent = []

    async def scenario():
        async with Running(app):
            return await hang_up_midway()

    async def hang_up_midway():
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        gone = asyncio.Event()

        async def receive():
            if messages:
                return messages.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/api/v1/infer", "headers": [], "query_string": b""}
        before = engine.tokens_generated
        request = asyncio.ensure_future(app(scope, receive, send))
        # Let generation get going: wait until the worker has produced tokens, then hang up.
        while engine.tokens_generated - before < 3:
            await asyncio.sleep(0.01)
        gone.set()
        await request
        # The worker handles jobs in order: once a tiny request finishes, the abandoned one has stopped.
        follow = await engine.generate(GenerationRequest(SamplingParams(max_tokens=2), prompt="Hello"))
        async for _ in follow:
            pass
        return engine.tokens_generated - before - follow.completion_tokens

    produced = asyncio.run(scenario())
    assert sent == []  # nobody to answer
    assert produced < 15, produced


def test_on_ready_runs_once_the_model_is_served_and_the_server_freezes_the_heap_then(engine):
    import gc

    from inference.__main__ import freeze_heap

    seen = []
    app = build_app(base_settings(), engine=engine, on_ready=lambda: seen.append(app.service.lifecycle.state))

    async def scenario():
        async with Running(app):
            while not seen:
                await asyncio.sleep(0)

    asyncio.run(scenario())
    assert seen == ["ready"]
    try:
        freeze_heap()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
