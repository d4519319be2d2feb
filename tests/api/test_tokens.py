"""POST /tokenize and /detokenize against the real model's tokenizer, in llama.cpp's and vLLM's shapes."""

import httpx
import pytest
from conftest import InProcessServer, base_settings


def test_tokenize_content_prompt_and_chat_agree_with_generation(live, openai_client):
    url = live.url
    plain = httpx.post(f"{url}/tokenize", json={"content": "Hello world"}).json()
    assert plain["count"] == len(plain["tokens"]) > 0 and plain["max_model_len"] == 2048
    with_bos = httpx.post(f"{url}/tokenize", json={"prompt": "Hello world"}).json()  # vLLM: special tokens added
    assert with_bos["tokens"][-len(plain["tokens"]):] == plain["tokens"]
    pieces = httpx.post(f"{url}/tokenize", json={"content": "Hello world", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "Hello world"
    text = httpx.post(f"{url}/detokenize", json={"tokens": plain["tokens"]}).json()
    assert text == {"content": "Hello world", "prompt": "Hello world"}
    # A chat counts exactly what a chat completion's prompt is.
    messages = [{"role": "user", "content": "What is 2+2?"}]
    chat = httpx.post(f"{url}/tokenize", json={"messages": messages}).json()
    model = openai_client.models.list().data[0].id
    reply = openai_client.chat.completions.create(model=model, messages=messages, max_tokens=1)
    assert chat["count"] == reply.usage.prompt_tokens


def test_content_wins_over_prompt_and_nothing_is_no_tokens(live):
    both = httpx.post(f"{live.url}/tokenize", json={"content": "a", "prompt": "b c d"}).json()
    assert both["tokens"] == httpx.post(f"{live.url}/tokenize", json={"content": "a"}).json()["tokens"]
    assert httpx.post(f"{live.url}/tokenize", json={}).json()["count"] == 0


@pytest.mark.parametrize("body, field", [({"content": 5}, "content"), ({"messages": []}, "messages"),
                                         ({"with_pieces": "yes"}, "with_pieces")])
def test_tokenize_refuses_bad_bodies(live, body, field):
    response = httpx.post(f"{live.url}/tokenize", json=body)
    assert response.status_code == 422 and response.json()["error"]["field"] == field


def test_detokenize_refuses_unknown_ids(live):
    response = httpx.post(f"{live.url}/detokenize", json={"tokens": [1, 10 ** 9]})
    assert response.status_code == 422 and "does not have" in response.json()["error"]["message"]


def test_tokenizer_endpoints_are_behind_api_keys(engine):
    from inference.app import build_app

    server = InProcessServer(build_app(base_settings(api_keys=("a-key-of-the-test",)), engine=engine))
    try:
        server.wait_ready()
        assert httpx.post(f"{server.url}/tokenize", json={"content": "x"}).status_code == 401
        ok = httpx.post(f"{server.url}/tokenize", json={"content": "x"},
                        headers={"Authorization": "Bearer a-key-of-the-test"})
        assert ok.status_code == 200
    finally:
        server.stop()
