"""The request log of a real `python -m inference` process."""

import json

import httpx
import pytest
from conftest import ServerProcess


def request_lines(output):
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("logger") == "inference.access"]


@pytest.mark.parametrize("log_prompts", [False, True])
def test_one_json_line_per_request_with_prompts_only_when_asked(model_file, log_prompts):
    proc = ServerProcess({"MODEL_PATH": str(model_file[0]), "LOG_FORMAT": "json", "CACHE_MODE": "all",
                          "LOG_PROMPTS": str(log_prompts).lower()})
    try:
        proc.wait_ready()
        body = {"prompt": "What is the capital of France?", "temperature": 0, "max_tokens": 12}
        first = httpx.post(f"{proc.url}/api/v1/infer", json=body, headers={"X-Request-ID": "req-1"}, timeout=60)
        second = httpx.post(f"{proc.url}/api/v1/infer", json=body, timeout=60)
        assert (first.status_code, second.status_code) == (200, 200)
    finally:
        proc.stop()
    lines = [line for line in request_lines(proc.output()) if line["route"] == "/api/v1/infer"]
    assert len(lines) == 2
    miss, hit = lines
    assert miss["method"] == "POST" and miss["status"] == 200 and miss["duration_ms"] > 0
    assert miss["request_id"] == "req-1" and miss["client"] == "ip:127.0.0.1"
    assert (miss["cache"], hit["cache"]) == ("MISS", "HIT")
    usage = first.json()
    assert (miss["prompt_tokens"], miss["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert "prompt_tokens" not in hit  # a hit generated nothing
    text = proc.output()
    if log_prompts:
        assert miss["prompt"] == body["prompt"]
    else:
        assert "capital of France" not in text


def test_text_format_is_readable(model_file):
    proc = ServerProcess({"MODEL_PATH": str(model_file[0])})
    try:
        proc.wait_ready()
        httpx.get(f"{proc.url}/nope", headers={"X-Request-ID": "abc"})
    finally:
        proc.stop()
    line = next(line for line in proc.output().splitlines() if "inference.access" in line and "/nope" in line)
    assert "method=GET route=unmatched path=/nope status=404" in line and "request_id=abc" in line


def test_the_openai_user_field_is_in_the_request_log(model_file):
    proc = ServerProcess({"MODEL_PATH": str(model_file[0]), "LOG_FORMAT": "json"})
    try:
        proc.wait_ready()
        model = httpx.get(f"{proc.url}/v1/models", timeout=30).json()["data"][0]["id"]
        reply = httpx.post(f"{proc.url}/v1/chat/completions", timeout=60, json={
            "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "user": "end-user-7"})
        assert reply.status_code == 200
    finally:
        proc.stop()
    (line,) = [line for line in request_lines(proc.output()) if line["route"] == "/v1/chat/completions"]
    assert line["user"] == "end-user-7"
