"""Hardening through the HTTP layer, against the real model: deadlines (the service's, the client's header), a
queue that drops what waited too long, readiness that reports a stalled engine, and a SIGTERM drain that loses
nothing accepted."""

import asyncio
import json
import os
import signal
import threading
import time

import httpx
from conftest import Running, ServerProcess, base_settings, call_asgi, own_engine

from inference.app import build_app

JSON = [("content-type", "application/json")]


def chat(engine, **fields):
    # The end-of-turn token banned: the answer runs to max_tokens, seconds here, unless something stops it.
    body = {"model": engine.info.name, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 400, "logit_bias": {"2": -100}, **fields}
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
            body = {"model": engine.info.name, "prompt": "Once upon a time", "max_tokens": 400,
                    "logit_bias": {"0": -100, "2": -100}}
            return await call_asgi(app, "POST", "/v1/completions", json.dumps(body).encode(), JSON)

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


def test_readiness_reports_a_stalled_engine_and_recovers(model_file):
    with own_engine(model_file, max_concurrent=1) as small:
        async def ready(app):
            response = await call_asgi(app, "GET", "/ready")
            return response.status, response.json()["status"]

        async def scenario():
            async with Running(build_app(base_settings(watchdog_seconds=0.3), engine=small)) as app:
                generation = await app.service.generate(
                    (await _long_request(small)), client="ip:test")
                await generation.__anext__()  # generating
                os.kill(small.pid, signal.SIGSTOP)  # the engine process takes no step, as if it hung
                try:
                    seen = [await ready(app)]
                    while seen[-1][1] != "stalled":
                        await asyncio.sleep(0.05)  # the watchdog samples on its own clock: nothing to await
                        seen.append(await ready(app))
                    stalled_metric = app.service.metrics.stalled._value.get()
                finally:
                    os.kill(small.pid, signal.SIGCONT)
                while (await ready(app))[1] != "ready":
                    await asyncio.sleep(0.05)
                await generation.aclose()
                return seen, stalled_metric, app.service.metrics.stalls._value.get()

        seen, stalled_metric, stalls = asyncio.run(scenario())
    assert seen[0] == (200, "ready") and seen[-1] == (503, "stalled")
    assert stalled_metric == 1 and stalls == 1


async def _long_request(engine):
    from inference.engine.base import ChatMessage, GenerationRequest, SamplingParams

    return GenerationRequest(SamplingParams(max_tokens=400, logit_bias=((2, -100.0),)),
                             messages=(ChatMessage("user", "Tell me a long story."),))


def in_flight(proc):
    """Requests the server is handling, not counting this scrape."""
    text = httpx.get(f"{proc.url}/metrics").text
    return int(float(next(line.split()[1] for line in text.splitlines()
                          if line.startswith("inference_requests_in_flight ")))) - 1


def stream_chat(url, model, max_tokens, out):
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": max_tokens,
            "logit_bias": {"2": -100}, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        out.append([line for line in response.iter_lines() if line.startswith("data: ")])


def test_sigterm_drains_then_finishes_every_accepted_stream(model_file):
    proc = ServerProcess({"MODEL_PATH": str(model_file[0]), "DRAIN_DELAY_SECONDS": "1",
                          "SHUTDOWN_TIMEOUT_SECONDS": "60"})
    try:
        proc.wait_ready()
        model = httpx.get(f"{proc.url}/v1/models").json()["data"][0]["id"]
        streams: list = []
        workers = [threading.Thread(target=stream_chat, args=(proc.url, model, 60, streams)) for _ in range(4)]
        for worker in workers:
            worker.start()
        while in_flight(proc) < 4:
            time.sleep(0.02)  # another process: nothing to await
        started = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        # At once not ready, while the listener stays open and still serves.
        while (ready := httpx.get(f"{proc.url}/ready")).status_code == 200:
            time.sleep(0.01)
        assert ready.json()["status"] == "draining"
        late = httpx.post(f"{proc.url}/api/v1/infer", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert late.status_code == 200
        code = proc.proc.wait(timeout=90)
        elapsed = time.monotonic() - started
        for worker in workers:
            worker.join()
    finally:
        proc.stop()
    assert len(streams) == 4 and all(lines[-1] == "data: [DONE]" for lines in streams)  # none lost
    assert code in (0, -signal.SIGTERM) and elapsed < 60
    assert "Traceback" not in proc.output()


def test_what_cannot_finish_by_the_shutdown_timeout_ends_with_an_error_event(model_file):
    proc = ServerProcess({"MODEL_PATH": str(model_file[0]), "DRAIN_DELAY_SECONDS": "0",
                          "SHUTDOWN_TIMEOUT_SECONDS": "2", "N_CTX": "2048", "MAX_TOKENS_LIMIT": "2000"})
    try:
        proc.wait_ready()
        model = httpx.get(f"{proc.url}/v1/models").json()["data"][0]["id"]
        streams: list = []
        worker = threading.Thread(target=stream_chat, args=(proc.url, model, 2000, streams))
        worker.start()
        while in_flight(proc) < 1:
            time.sleep(0.02)
        proc.proc.send_signal(signal.SIGTERM)
        code = proc.proc.wait(timeout=30)
        worker.join()
    finally:
        proc.stop()
    (lines,) = streams
    assert json.loads(lines[-1][6:])["error"]["message"] == "the service is shutting down"
    assert code in (0, -signal.SIGTERM)
    # The engine process ends with the abort: that is not a death, so nothing restarts it (a restart here once
    # held the shutdown for 30 s: 15 s waiting for the new process, then another restart).
    assert "restarting it" not in proc.output() and "did not end within" not in proc.output()


# --- hostile input -------------------------------------------------------------------------------------------------


def test_oversized_heads_and_malformed_json_are_clear_4xx(engine):
    async def scenario():
        async with Running(build_app(base_settings(), engine=engine)) as app:
            prompt = json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
            many = await call_asgi(app, "POST", "/api/v1/infer", prompt, JSON + [(f"x-h{i}", "a") for i in range(150)])
            large = await call_asgi(app, "POST", "/api/v1/infer", prompt, JSON + [("x-big", "a" * 20000)])
            bodies = {
                "duplicate": b'{"prompt": "Hi", "prompt": "Bye", "max_tokens": 2}',
                "surrogate": b'{"prompt": "Hi \\ud800", "max_tokens": 2}',
                "infinite": b'{"prompt": "Hi", "max_tokens": 2, "temperature": 1e999}',
                "huge integer": b'{"prompt": "Hi", "max_tokens": ' + b"9" * 5000 + b"}",
                "not utf-8": b'{"prompt": "Hi \xff", "max_tokens": 2}',
            }
            refused = {name: await call_asgi(app, "POST", "/api/v1/infer", body, JSON) for name, body in bodies.items()}
            pair = await call_asgi(app, "POST", "/api/v1/infer",
                                   b'{"prompt": "Say \\ud83d\\ude00", "max_tokens": 2}', JSON)
            tokenize = await call_asgi(app, "POST", "/tokenize", b'{"content": "\\udc00"}', JSON)
            long_stop = await call_asgi(app, "POST", "/v1/chat/completions", json.dumps({
                "model": engine.info.name, "messages": [{"role": "user", "content": "Hi"}], "stop": ["x" * 501]}).encode(),
                JSON)
            return many, large, refused, pair, tokenize, long_stop

    many, large, refused, pair, tokenize, long_stop = asyncio.run(scenario())
    assert (many.status, many.json()["error"]["code"]) == (431, "headers_too_large")
    assert (large.status, large.json()["error"]["code"]) == (431, "headers_too_large")
    for name, response in refused.items():
        assert (response.status, response.json()["error"]["code"]) == (400, "invalid_json"), name
    assert pair.status == 200  # an escaped surrogate pair is a character like any other
    assert tokenize.status == 400
    assert long_stop.status == 400 and long_stop.json()["error"]["param"] == "stop[0]"


def test_a_body_that_trickles_in_too_slowly_is_a_408(engine):
    async def scenario():
        app = build_app(base_settings(body_timeout_seconds=0.2), engine=engine)
        async with Running(app):
            sent = []

            async def receive():
                if not sent:
                    sent.append(1)
                    return {"type": "http.request", "body": b'{"prompt": "Hi",', "more_body": True}
                await asyncio.Event().wait()  # the rest never comes

            async def send(message):
                sent.append(message)

            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "path": "/api/v1/infer", "raw_path": b"/api/v1/infer", "query_string": b"", "scheme": "http",
                     "root_path": "", "headers": [(b"content-type", b"application/json")],
                     "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
            await app(scope, receive, send)
            return sent

    sent = asyncio.run(scenario())
    start = next(m for m in sent[1:] if m["type"] == "http.response.start")
    assert start["status"] == 408
    assert json.loads(b"".join(m.get("body", b"") for m in sent[1:] if m["type"] == "http.response.body"))[
        "error"]["code"] == "request_timeout"


def test_a_long_query_string_is_a_414(client):
    response = client.get("/health", params={"q": "x" * 5000})
    assert response.status_code == 414 and response.json()["error"]["code"] == "uri_too_long"


def test_a_full_queue_answers_503_overloaded_with_retry_after_in_each_dialect(model_file):
    """The HTTP path of an overload: a busy engine with one queue place, then a burst. One request takes the
    place; the rest are refused at once (503 `overloaded`, a Retry-After in seconds, the route's error shape)."""
    with own_engine(model_file, max_concurrent=1, max_queued=1) as small:
        async def scenario():
            async with Running(build_app(base_settings(rate_limit_enabled=False), engine=small)) as app:
                hog = asyncio.ensure_future(call_asgi(app, "POST", "/v1/chat/completions", chat(small)))
                while not small.tokens_generated:
                    await asyncio.sleep(0.01)  # polling another thread's counter: no event to await
                native = json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
                paths = ["/v1/chat/completions"] * 4 + ["/api/v1/infer"] * 2
                pending = [asyncio.ensure_future(call_asgi(
                    app, "POST", path, chat(small, max_tokens=2) if path.startswith("/v1") else native, JSON))
                    for path in paths]
                # Every refusal comes while the hog still generates; the request holding the place waits for it.
                while sum(p.done() for p in pending) < len(pending) - 1:
                    await asyncio.wait([p for p in pending if not p.done()], return_when=asyncio.FIRST_COMPLETED)
                hog.cancel()
                return list(zip(paths, await asyncio.gather(*pending)))

        answers = asyncio.run(scenario())
    refused = [(path, r) for path, r in answers if r.status == 503]
    assert len(refused) == 5 and sorted(r.status for _, r in answers) == [200, 503, 503, 503, 503, 503]
    for path, response in refused:
        error = response.json()["error"]
        assert error["code"] == "overloaded" and "waiting" in error["message"]
        assert int(response.headers["retry-after"]) >= 1
        # OpenAI's shape on /v1 (its SDKs read `type`), ours on /api/v1.
        assert ("type" in error) == path.startswith("/v1/"), (path, error)


def test_a_prompt_longer_than_the_context_is_400_naming_the_limit_without_tokenizing(engine):
    async def scenario():
        async with Running(build_app(base_settings(), engine=engine)) as app:
            prompt = "x" * (engine._max_prompt_chars + 1)
            chat_body = json.dumps({"model": engine.info.name, "messages": [{"role": "user", "content": prompt}],
                                    "max_tokens": 2}).encode()
            native_body = json.dumps({"prompt": prompt, "max_tokens": 2}).encode()
            return (await call_asgi(app, "POST", "/v1/chat/completions", chat_body, JSON),
                    await call_asgi(app, "POST", "/api/v1/infer", native_body, JSON))

    for response in asyncio.run(scenario()):
        assert response.status == 400, response.body[:300]
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded"
        assert f"holds at most {engine._max_prompt_chars}" in error["message"]
