"""Anthropic's Messages API against the real model, with the official `anthropic` SDK (and LangChain's
ChatAnthropic) as the client: answers, the streamed event sequence, stop reasons, tool use and a tool loop, token
counting, structured output, errors in Anthropic's shape, `x-api-key`, and cached streams replayed as events."""

import asyncio
import json

import anthropic
import httpx
import jsonschema
import pytest
from conftest import InProcessServer, Running, base_settings, call_asgi

from inference.api.anthropic import dialect
from inference.app import build_app
from inference.web.errors import HTTPError

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 30}},
           "required": ["city"], "additionalProperties": False}
TOOLS = [{"name": "get_weather", "description": "The current weather in a city.", "input_schema": WEATHER}]
EVENT_ORDER = ["message_start", "ping", "content_block_start", "content_block_delta", "content_block_stop",
               "message_delta", "message_stop"]


@pytest.fixture
def client(live):
    with anthropic.Anthropic(base_url=live.url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture
def model(live):
    return live.app.service.engine.info.name


def ask(text):
    return [{"role": "user", "content": text}]


def greedy():
    return {"extra_body": {"temperature": 0}}


def events(url, body):
    """(event name, data) of a streamed answer, as sent."""
    with httpx.stream("POST", f"{url}/v1/messages", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    out = []
    for block in raw.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_every_field_and_block_is_used_or_refused_and_in_the_readme():
    import dataclasses
    import re

    from conftest import ROOT

    from inference.api.anthropic.schemas import FIELDS, CountTokensRequest, MessagesRequest

    table = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        match = re.match(r"\| `([a-z_]+)` \| (messages|count_tokens|block) \| ((?:used|refused)[^|]*) \| ([^|]+) \|",
                         line)
        if match:
            table[(match[2], match[1])] = (match[3].strip(), match[4].strip())
    for kind, schema in (("messages", MessagesRequest), ("count_tokens", CountTokensRequest)):
        assert {f.name for f in dataclasses.fields(schema)} == set(FIELDS[kind]), kind
    for kind, fates in FIELDS.items():
        for name, fate in fates.items():
            assert fate.embedded in ("used", "refused") and fate.gateway == fate.embedded, (kind, name)
            assert fate.embedded == "used" or fate.why, f"{kind}.{name}: a refusal must say why"
            embedded, gateway = table[(kind, name)]
            assert embedded.startswith(fate.embedded) and gateway.startswith(fate.gateway), (kind, name)


def test_a_message_in_anthropic_shape(client, model):
    message = client.messages.create(model=model, max_tokens=24, messages=ask("What is the capital of France?"),
                                     system="You answer briefly.", metadata={"user_id": "user-7"}, **greedy())
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == model and [b.type for b in message.content] == ["text"] and message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 24


def test_the_stream_is_anthropic_s_event_sequence(client, model, live):
    body = {"model": model, "max_tokens": 16, "messages": ask("Say hello."), "temperature": 0}
    sent = events(live.url, body)
    names = [name for name, _ in sent]
    assert [n for i, n in enumerate(names) if i == 0 or n != names[i - 1]] == EVENT_ORDER
    assert all(data["type"] == name for name, data in sent)
    streamed = "".join(d["delta"]["text"] for n, d in sent if n == "content_block_delta")
    final = sent[-2][1]
    assert final["delta"]["stop_reason"] in ("end_turn", "max_tokens") and final["usage"]["output_tokens"] > 0
    with client.messages.stream(**{k: v for k, v in body.items() if k != "temperature"}, **greedy()) as stream:
        text = "".join(stream.text_stream)
        message = stream.get_final_message()
    assert text == streamed == message.content[0].text


def test_stop_reasons(client, model):
    stopped = client.messages.create(model=model, max_tokens=40, messages=ask("Describe the sea."),
                                     stop_sequences=["e", "a", "o", "i"], **greedy())
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence in ("e", "a", "o", "i")
    assert stopped.stop_sequence not in stopped.content[0].text
    cut = client.messages.create(model=model, max_tokens=3, messages=ask("Write a long story about the sea."),
                                 **greedy())
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 3


def valid(block):
    assert block.type == "tool_use" and block.name == "get_weather" and block.id
    jsonschema.validate(block.input, WEATHER)
    return block


@pytest.mark.parametrize("stream", [False, True])
def test_tool_use_whole_and_streamed(client, model, live, stream):
    kwargs = dict(model=model, max_tokens=60, messages=ask("What is the weather in Paris?"), tools=TOOLS,
                  tool_choice={"type": "any", "disable_parallel_tool_use": True}, **greedy())
    if stream:
        with client.messages.stream(**kwargs) as events_:
            message = events_.get_final_message()
    else:
        message = client.messages.create(**kwargs)
    assert message.stop_reason == "tool_use" and [b.type for b in message.content] == ["tool_use"]
    valid(message.content[0])
    named = client.messages.create(**{**kwargs, "tool_choice": {"type": "tool", "name": "get_weather"}})
    assert valid(named.content[0]).input == message.content[0].input  # the same function, the same greedy input


def test_a_tool_loop_with_auto_runs_end_to_end(client, model):
    """Ask with tools ("auto"), run each tool the model uses, send the results back as tool_result blocks, until it
    answers in text (after three rounds the last turn says "none", as agents do at a limit)."""
    messages = ask("Use the get_weather tool for Paris.")
    for rounds in range(4):
        message = client.messages.create(
            model=model, max_tokens=80, messages=messages, tools=TOOLS, **greedy(),
            tool_choice={"type": "auto" if rounds < 3 else "none", **({"disable_parallel_tool_use": True}
                                                                      if rounds < 3 else {})})
        uses = [b for b in message.content if b.type == "tool_use"]
        if not uses:
            break
        assert message.stop_reason == "tool_use"
        messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in message.content]})
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": valid(b).id, "content": f"{b.input['city']}: sunny, 21 C"}
            for b in uses]})
    assert message.stop_reason in ("end_turn", "max_tokens") and message.content[0].type == "text"


def test_a_last_assistant_turn_is_a_prefill_the_answer_continues(client, model, openai_client):
    """Anthropic's prefill: the answer continues the assistant's text, as OpenAI's continue_final_message does."""
    history = [*ask("Count from one to ten in words."), {"role": "assistant", "content": "One, two, three,"}]
    message = client.messages.create(model=model, max_tokens=12, messages=history, **greedy())
    chat = openai_client.chat.completions.create(
        model=model, messages=history, max_tokens=12, temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert message.content[0].text == chat.choices[0].message.content
    assert message.usage.input_tokens == chat.usage.prompt_tokens


def test_count_tokens_counts_what_create_evaluates(client, model):
    kwargs = dict(model=model, messages=ask("What is the weather in Paris?"), tools=TOOLS, system="Be brief.")
    counted = client.messages.count_tokens(**kwargs).input_tokens
    assert counted == client.messages.create(**kwargs, max_tokens=2).usage.input_tokens
    assert client.messages.count_tokens(model=model, messages=ask("Hi")).input_tokens < counted


def test_output_config_format_is_enforced(client, model):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 40}}, "required": ["answer"],
              "additionalProperties": False}
    message = client.messages.create(model=model, max_tokens=60, messages=ask("What is 2+2? Reply in JSON."),
                                     output_config={"format": {"type": "json_schema", "schema": schema}}, **greedy())
    if message.stop_reason == "end_turn":
        jsonschema.validate(json.loads(message.content[0].text), schema)
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model=model, max_tokens=8, messages=ask("Hi"), output_config={"format": {
            "type": "json_schema", "schema": {"type": "array", "uniqueItems": True}}})
    assert "output_config.format" in refused.value.body["error"]["message"]


@pytest.mark.parametrize("change, status, kind, named", [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]}, 400, "invalid_request_error",
     "messages[0].content[0]"),
    ({"model": "claude-opus-9"}, 404, "not_found_error", "claude-opus-9"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, 400, "invalid_request_error", "thinking"),
    ({"some_future_field": 1}, 400, "invalid_request_error", "some_future_field"),
    ({"max_tokens": None}, 400, "invalid_request_error", "max_tokens"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 400, "invalid_request_error", "server tool"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "x", "name": "f", "input": {}}]}]}, 400,
     "invalid_request_error", "assistant"),
    ({"output_config": {"effort": "high"}}, 400, "invalid_request_error", "output_config.effort"),
])
def test_bad_requests_get_anthropic_errors_naming_the_field(live, model, change, status, kind, named):
    body = {"model": model, "max_tokens": 8, "messages": ask("Hi"), **change}
    response = httpx.post(f"{live.url}/v1/messages", json={k: v for k, v in body.items() if v is not None})
    assert response.status_code == status
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == kind and named in error["error"]["message"]
    assert error["request_id"] == response.headers["x-request-id"]


def test_overload_is_529_and_every_status_has_anthropic_s_type():
    overloaded = HTTPError(503, "overloaded", "busy", headers={"Retry-After": "1"})
    assert dialect.status(overloaded) == 529 and dialect.body(overloaded)["error"]["type"] == "overloaded_error"
    response = dialect.ANTHROPIC.response(overloaded)
    assert response.status == 529 and response.headers["retry-after"] == "1"
    kinds = {status: dialect.body(HTTPError(status, "x", "m"))["error"]["type"]
             for status in (400, 401, 404, 413, 422, 429, 500, 502, 504)}
    assert kinds == {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                     413: "request_too_large", 422: "invalid_request_error", 429: "rate_limit_error",
                     500: "api_error", 502: "api_error", 504: "api_error"}


def test_x_api_key_is_accepted_beside_authorization(engine):
    server = InProcessServer(build_app(base_settings(api_keys=("an-anthropic-key",)), engine=engine))
    try:
        server.wait_ready()
        kwargs = dict(model=engine.info.name, max_tokens=2, messages=ask("Hi"))
        with anthropic.Anthropic(base_url=server.url, api_key="an-anthropic-key", max_retries=0) as good:
            assert good.messages.create(**kwargs).content  # the SDK sends x-api-key and anthropic-version
        with anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0) as bad:
            with pytest.raises(anthropic.AuthenticationError) as refused:
                bad.messages.create(**kwargs)
        assert refused.value.body["error"]["type"] == "authentication_error"
    finally:
        server.stop()


def test_a_cached_stream_replays_as_anthropic_events(engine):
    async def scenario():
        async with Running(build_app(base_settings(cache_mode="all"), engine=engine)) as app:
            body = json.dumps({"model": engine.info.name, "max_tokens": 6, "messages": ask("Hi"), "stream": True,
                               "temperature": 0}).encode()
            headers = [("content-type", "application/json")]
            first, second = [await call_asgi(app, "POST", "/v1/messages", body, headers) for _ in range(2)]
            chat = await call_asgi(app, "POST", "/v1/chat/completions", json.dumps(
                {"model": engine.info.name, "max_tokens": 6, "messages": ask("Hi"), "stream": True,
                 "temperature": 0}).encode(), headers)
            return first, second, chat

    first, second, chat = asyncio.run(scenario())
    assert (first.headers["x-cache"], second.headers["x-cache"], chat.headers["x-cache"]) == ("MISS", "HIT", "MISS")
    assert second.body == first.body and second.body.startswith(b"event: message_start\n")


def test_langchain_chat_anthropic_against_the_service(live, model):
    from langchain_anthropic import ChatAnthropic
    from langchain_core.messages import HumanMessage, ToolMessage

    chat = ChatAnthropic(model=model, base_url=live.url, api_key="unused", max_tokens=60, max_retries=0)
    assert chat.invoke("Say hi.").content
    bound = chat.bind_tools([{"name": "get_weather", "description": "The current weather in a city.",
                              "input_schema": WEATHER}], tool_choice="get_weather")
    question = HumanMessage("What is the weather in Paris?")
    called = bound.invoke([question])
    (call,) = called.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], WEATHER)
    answer = chat.invoke([question, called, ToolMessage("Paris: sunny, 21 C", tool_call_id=call["id"])])
    assert answer.content
