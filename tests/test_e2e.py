"""End to end: `python -m inference` in a child process, real HTTP, the real default model."""

import concurrent.futures
import threading

import httpx
import pytest
from conftest import says_four


def infer(client, **body):
    body.setdefault("temperature", 0)
    body.setdefault("max_tokens", 24)
    return client.post("/api/v1/infer", json=body)


def test_answers_what_is_two_plus_two(client):
    response = infer(client, prompt="What is 2+2?")
    assert response.status_code == 200, response.text
    body = response.json()
    assert says_four(body["output"]), body["output"]
    assert body["finish_reason"] == "stop"
    assert body["tokens_used"] == body["prompt_tokens"] + body["completion_tokens"]
    assert body["completion_tokens"] > 0
    assert "SmolLM2" in body["model_name"]
    assert len(body["model_version"]) == 12
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"]


def test_max_tokens_is_honoured(client):
    body = infer(client, prompt="Write a poem about autumn.", max_tokens=5).json()
    assert (body["completion_tokens"], body["finish_reason"]) == (5, "length")


def test_index_health_ready_model(client):
    index = client.get("/").json()
    assert index["name"] == "inference" and index["environment"] == "test"
    assert index["links"]["docs"] == "/docs"
    assert client.get("/health").json() == {"status": "healthy"}
    assert client.get("/ready").json() == {"status": "ready", "store": "memory"}
    model = client.get("/api/v1/model").json()
    assert model["status"] == "ready"
    assert model["quantization"] == "Q4_1"
    assert model["context_length"] == 1024
    assert model["backend"] == "llama.cpp"
    assert model["model_version"] == model["sha256"][:12]
    assert model["description"]


def test_docs_render_from_local_assets(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'src="/docs/swagger-ui-bundle.js"' in page.text
    assert "http" not in page.text.replace("/openapi.json", "")  # no CDN
    bundle = client.get("/docs/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and len(bundle.content) > 100_000
    assert client.get("/docs/../../etc/passwd").status_code == 404
    assert client.get("/docs/index.html").status_code == 404
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.0")
    assert spec["components"]["schemas"]["InferRequest"]["properties"]["max_tokens"]["maximum"] == 256


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/nope", 404), ("DELETE", "/api/v1/infer", 405), ("GET", "/api/v1/infer", 405),
])
def test_routing_errors_are_json(client, method, path, status):
    response = client.request(method, path)
    assert response.status_code == status
    assert response.json()["error"]["code"] in ("not_found", "method_not_allowed")
    if status == 405:
        assert response.headers["allow"] == "POST"


@pytest.mark.parametrize("content, status, code", [
    (b"{", 400, "invalid_json"),
    (b'{"prompt": ""}', 422, "validation_error"),
    (b'{"prompt": "hi", "max_tokens": 100000}', 422, "validation_error"),
    (b'{"prompt": "hi", "temperature": -1}', 422, "validation_error"),
    (b"x" * (1024 * 1024 + 1), 413, "request_too_large"),
])
def test_bad_input_gets_its_4xx(client, content, status, code):
    response = client.post("/api/v1/infer", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_prompt_longer_than_the_context_is_a_clear_400(client):
    response = infer(client, prompt="hello " * 1100, max_tokens=10)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["field"] == "prompt"
    assert "1024" in error["message"]


def test_eight_simultaneous_requests_all_succeed(server):
    prompts = [f"What is {i}+{i}?" for i in range(8)]

    def one(prompt):
        with httpx.Client(base_url=server.url, timeout=120) as c:
            return infer(c, prompt=prompt, max_tokens=16)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, prompts))
    assert [r.status_code for r in responses] == [200] * 8
    assert all(r.json()["output"] for r in responses)


def test_health_answers_promptly_during_a_long_generation(server, client):
    done = threading.Event()

    def long_generation():
        with httpx.Client(base_url=server.url, timeout=120) as c:
            infer(c, prompt="Write a long story about a lighthouse keeper.", max_tokens=200, temperature=0.8)
        done.set()

    worker = threading.Thread(target=long_generation)
    worker.start()
    answered = 0
    try:
        while not done.is_set():
            assert client.get("/health").status_code == 200
            answered += 1
    finally:
        worker.join()
    # With generation blocking the event loop, health could only answer before and after it: a handful at most.
    assert answered >= 50, answered


def test_sigterm_lets_the_request_in_flight_finish(model_file):
    import json
    import signal

    from conftest import ServerProcess

    proc = ServerProcess({"MODEL_PATH": str(model_file[0]), "DRAIN_DELAY_SECONDS": "0.2"})
    try:
        proc.wait_ready()
        body = {"prompt": "Write a story about a fox.", "max_tokens": 30, "temperature": 0.8, "stream": True}
        events = []
        with httpx.stream("POST", f"{proc.url}/api/v1/infer", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("event: "):
                    events.append(line[7:])
                    if len(events) == 1:
                        proc.proc.send_signal(signal.SIGTERM)  # mid-answer
                elif line.startswith("data: ") and events[-1] == "done":
                    done = json.loads(line[6:])
        assert events[-1] == "done" and events.count("token") > 1
        assert done["completion_tokens"] == 30 or done["finish_reason"] == "stop"
        # uvicorn finishes the graceful shutdown, then re-raises the signal so the exit status reports it.
        assert proc.proc.wait(timeout=30) in (0, -signal.SIGTERM)
        # Once draining, the server takes no new connections.
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{proc.url}/health", timeout=2)
    finally:
        proc.stop()


CITY = {"type": "object", "additionalProperties": False, "required": ["name", "country"],
        "properties": {"name": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40}}}


def test_json_schema_output_matches_the_schema(client):
    import json

    import jsonschema

    body = infer(client, prompt="Facts about Paris.", max_tokens=80, json_schema=CITY).json()
    assert body["finish_reason"] == "stop", body
    jsonschema.validate(json.loads(body["output"]), CITY)


def test_a_json_schema_that_cannot_be_enforced_is_refused(client):
    response = infer(client, prompt="x", json_schema={"type": "array", "uniqueItems": True})
    error = response.json()["error"]
    assert response.status_code == 422 and error["field"] == "json_schema" and "uniqueItems" in error["message"]
