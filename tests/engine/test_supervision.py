"""The engine in a process of its own, supervised: real crashes (signals, a NULL dereference) of the real engine
process, what running and waiting requests see, readiness, the restart metric, the crash loop."""

import asyncio
import json
import logging
import os
import signal
import threading
import time

import httpx
import pytest
from conftest import Running, ServerProcess, base_settings, call_asgi, own_engine, says_four

from inference.app import build_app
from inference.engine.base import (
    ChatMessage,
    EngineNotReady,
    EngineRestarted,
    GenerationRequest,
    SamplingParams,
)
from inference.engine.llama.supervisor import EngineStartFailed


def request(prompt, max_tokens=8, **params):
    return GenerationRequest(SamplingParams(max_tokens=max_tokens, temperature=0, **params),
                             messages=(ChatMessage("user", prompt),))


def long_request():
    # Token 2 (end of turn) banned: it runs for max_tokens, seconds here.
    return request("Tell me a long story.", max_tokens=400, logit_bias=((2, -100.0),))


def has_text(line):
    """An SSE line of a chat stream carrying generated text (not the opening role chunk, not an error)."""
    if not line.startswith("data: {"):
        return False
    choices = json.loads(line[6:]).get("choices") or [{}]
    return bool(choices[0].get("delta", {}).get("content"))


def children(pid):
    """The pids of `pid`'s child processes, with their command lines."""
    found = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in f.read().split():
                with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                    found[int(child)] = cmdline.read().replace(b"\0", b" ").decode()
    return found


def engine_pid(server_pid):
    (pid,) = [p for p, cmd in children(server_pid).items() if "inference.engine.llama.worker" in cmd]
    return pid


def metric(url, name):
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL])
def test_a_crash_ends_running_streams_with_an_error_and_runs_the_waiting_requests_on_a_new_engine(model_file, sig):
    proc = ServerProcess({"MODEL_PATH": str(model_file[0]), "MAX_CONCURRENT_REQUESTS": "4", "N_CTX": "1024",
                          "MAX_TOKENS_LIMIT": "512"})
    try:
        proc.wait_ready()
        model = httpx.get(f"{proc.url}/v1/models").json()["data"][0]["id"]
        streams, started = [], threading.Barrier(5)

        def stream():
            body = {"model": model, "messages": [{"role": "user", "content": "Tell me a long story."}],
                    "max_tokens": 500, "logit_bias": {"2": -100}, "stream": True}
            lines = []
            with httpx.stream("POST", f"{proc.url}/v1/chat/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    lines.append(line)
                    if has_text(line) and sum(map(has_text, lines)) == 1:
                        started.wait()  # generating: its first token is here
            streams.append(lines)

        answers = []

        def ask():
            body = {"model": model, "messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 16,
                    "temperature": 0}
            answers.append(httpx.post(f"{proc.url}/v1/chat/completions", json=body, timeout=60))

        running = [threading.Thread(target=stream) for _ in range(4)]
        for thread in running:
            thread.start()
        started.wait(timeout=60)  # the 4 slots are generating
        waiting = [threading.Thread(target=ask) for _ in range(4)]
        for thread in waiting:
            thread.start()
        deadline = time.monotonic() + 30
        while metric(proc.url, "inference_queue_depth") < 4:  # the gauge is the only sign from outside
            assert time.monotonic() < deadline, "the 4 requests never reached the queue"

        readiness = []
        watching = threading.Event()

        def watch():
            with httpx.Client(base_url=proc.url, timeout=5) as client:
                while not watching.is_set():
                    response = client.get("/ready")
                    readiness.append((response.status_code, response.json()["status"]))
                    # A probe's pace, not a flood: back to back, these calls took a core from the 2 the engine
                    # process needs and made the new engine's answers take up to a minute.
                    time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        os.kill(engine_pid(proc.proc.pid), sig)
        for thread in running + waiting:
            thread.join(timeout=60)
        watching.set()
        watcher.join()

        # Every stream got content, then an error event naming the restart, then the end: never a cut connection.
        assert len(streams) == 4
        for lines in streams:
            data = [line for line in lines if line.startswith("data: ")]
            assert any(map(has_text, data[:-1]))
            assert "engine_restarted" in data[-1] and sig.name in data[-1]
        # The waiting ones ran on the new engine.
        assert [a.status_code for a in answers] == [200] * 4
        assert all(says_four(a.json()["choices"][0]["message"]["content"]) for a in answers)
        assert (503, "restarting") in readiness and readiness[-1] == (200, "ready")
        assert metric(proc.url, f'inference_engine_restarts_total{{cause="{sig.name}"}}') == 1
        assert proc.proc.poll() is None  # the HTTP process never stopped
        log = proc.output()
        assert f"died of {sig.name}" in log and "4 running requests ended with an error, 4 waiting ones are kept" in log
        assert httpx.get(f"{proc.url}/ready").status_code == 200
    finally:
        proc.stop()


def test_a_crash_while_warming_up_with_extra_buffers_restarts_without_them(model_file, caplog):
    # The test-only setting makes the engine process dereference NULL whenever it runs with extra buffer types.
    with caplog.at_level(logging.WARNING, logger="inference.engine"):
        with own_engine(model_file, max_concurrent=1, crash_test=True) as engine:
            async def ask():
                generation = await engine.generate(request("What is 2+2?", max_tokens=16))
                return "".join([piece async for piece in generation])

            assert says_four(asyncio.run(ask()))
            assert engine.restarts == {"SIGSEGV": 1}
    warnings = [r.getMessage() for r in caplog.records if "warming up with llama.cpp's extra buffer types" in r.getMessage()]
    assert len(warnings) == 1 and "SIGSEGV" in warnings[0]


def test_extra_buffers_forced_on_that_crash_every_start_end_in_failed(model_file):
    with pytest.raises(EngineStartFailed, match="died 2 times"):
        with own_engine(model_file, max_concurrent=1, crash_test=True, extra_buffers="on", crash_loop_deaths=2):
            pass


def test_a_crash_loop_stops_restarting_and_readiness_says_failed(model_file):
    with own_engine(model_file, max_concurrent=1, crash_loop_deaths=2) as engine:
        async def scenario():
            async with Running(build_app(base_settings(), engine=engine)) as app:
                running = await engine.generate(long_request())
                await running.__anext__()
                first = engine.pid
                os.kill(first, signal.SIGKILL)
                with pytest.raises(EngineRestarted):
                    async for _ in running:
                        pass
                while engine.health is not None:  # restarting: the supervisor's thread loads a new process
                    await asyncio.sleep(0.01)
                assert engine.pid != first
                running = await engine.generate(long_request())
                await running.__anext__()
                waiting = await engine.generate(request("Hi"))
                os.kill(engine.pid, signal.SIGKILL)  # the second death within the window: failed for good
                with pytest.raises(EngineRestarted):
                    async for _ in running:
                        pass
                with pytest.raises(EngineNotReady, match="died 2 times"):
                    async for _ in waiting:
                        pass
                ready = await call_asgi(app, "GET", "/ready")
                refused = await call_asgi(app, "POST", "/api/v1/infer", b'{"prompt": "Hi", "max_tokens": 2}',
                                          headers=[("content-type", "application/json")])
                return ready, refused

        ready, refused = asyncio.run(scenario())
    assert ready.status == 503 and ready.json()["status"] == "failed" and "died 2 times" in ready.json()["reason"]
    assert refused.status == 503 and refused.json()["error"]["code"] == "model_not_ready"
    assert engine.restarts == {"SIGKILL": 2}


def test_the_engine_process_does_not_outlive_a_killed_http_process(model_file):
    proc = ServerProcess({"MODEL_PATH": str(model_file[0])})
    try:
        proc.wait_ready()
        engine = engine_pid(proc.proc.pid)
        os.kill(proc.proc.pid, signal.SIGKILL)  # no clean-up of any kind: the pipe closes with the process
        proc.proc.wait()
        deadline = time.monotonic() + 10
        while not gone(engine):
            assert time.monotonic() < deadline, "the engine process outlived the HTTP process"
            time.sleep(0.05)  # another process ending: nothing to await
    finally:
        proc.stop()


def gone(pid):
    """True once `pid` has exited (a zombie waiting for whoever adopted it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_an_engine_stuck_past_the_stall_limit_is_replaced(model_file):
    with own_engine(model_file, max_concurrent=1) as engine:
        async def scenario():
            settings = base_settings(watchdog_seconds=0.3, engine_stall_restart_seconds=3.0)
            async with Running(build_app(settings, engine=engine)) as app:
                running = await engine.generate(long_request())
                await running.__anext__()
                waiting = await engine.generate(request("What is 2+2?", max_tokens=16))
                stuck = engine.pid
                os.kill(stuck, signal.SIGSTOP)  # alive, but no step: as a native deadlock would be
                with pytest.raises(EngineRestarted, match="no progress"):
                    async for _ in running:
                        pass
                answer = "".join([piece async for piece in waiting])  # kept, and run by the new process
                ready = await call_asgi(app, "GET", "/ready")
                return stuck, answer, ready, app.service.metrics.stalls._value.get()

        stuck, answer, ready, stalls = asyncio.run(scenario())
        assert engine.pid != stuck and engine.restarts == {"stalled": 1}
    assert says_four(answer)
    assert ready.status == 200 and stalls >= 1
