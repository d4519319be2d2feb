"""OpenAI's Responses API against the real model, with the official `openai` SDK as the client: responses whole and
streamed (the typed events `responses.stream()` accumulates), `responses.parse`, function calls whole and streamed,
function-call history through previous_response_id, stored responses (GET, DELETE, input_items) shared by two
replicas over a real Redis and scoped to the API key, errors in OpenAI's shape, cached answers, and Redis down."""

import json

import httpx
import jsonschema
import openai
import pydantic
import pytest
from conftest import InProcessServer, base_settings, free_port

from inference.app import build_app

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 30}},
           "required": ["city"], "additionalProperties": False}
TOOLS = [{"type": "function", "name": "get_weather", "description": "The current weather in a city.",
          "parameters": WEATHER}]


@pytest.fixture
def model(live):
    return live.app.service.engine.info.name


def greedy():
    return {"temperature": 0}


def sdk(url, key="unused"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def events(url, body):
    """The data of each event of a streamed response, as sent (event name == data type checked)."""
    with httpx.stream("POST", f"{url}/v1/responses", json={**body, "stream": True}, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    out = []
    for block in raw.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        data = json.loads(lines["data"])
        assert data["type"] == lines["event"]
        out.append(data)
    return out


def test_every_field_item_and_tool_is_used_or_refused_and_in_the_readme():
    import dataclasses
    import re

    from conftest import ROOT

    from inference.api.responses.schemas import FIELDS, ResponsesRequest

    table = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        match = re.match(r"\| `([a-z_]+)` \| (responses|item|part|tool) \| ((?:used|refused)[^|]*) \|", line)
        if match:
            table[(match[2], match[1])] = match[3].strip()
    assert {f.name for f in dataclasses.fields(ResponsesRequest)} == set(FIELDS["responses"])
    for kind, fates in FIELDS.items():
        for name, fate in fates.items():
            assert fate.embedded in ("used", "refused") and fate.gateway == fate.embedded, (kind, name)
            assert fate.embedded == "used" or fate.why, f"{kind}.{name}: a refusal must say why"
            assert table[(kind, name)].startswith(fate.embedded), (kind, name)
    assert set(table) == {(kind, name) for kind, fates in FIELDS.items() for name in fates}


def test_a_response_stored_and_read_back(openai_client, model):
    response = openai_client.responses.create(model=model, input="What is the capital of France?",
                                              instructions="You answer briefly.", max_output_tokens=24,
                                              metadata={"ticket": "T-1"}, **greedy())
    assert response.id.startswith("resp_") and response.object == "response" and response.model == model
    assert response.status in ("completed", "incomplete") and response.store is True
    assert [item.type for item in response.output] == ["message"] and response.output_text
    assert response.usage.input_tokens > 0 and 0 < response.usage.output_tokens <= 24
    assert response.instructions == "You answer briefly." and response.metadata == {"ticket": "T-1"}
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"
    again = openai_client.responses.retrieve(response.id)
    assert again.output_text == response.output_text and again.usage == response.usage
    items = openai_client.responses.input_items.list(response.id)
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [
        ("message", "user", "What is the capital of France?")]
    deleted = openai_client.responses.delete(response.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        openai_client.responses.retrieve(response.id)


def test_the_stream_is_the_typed_event_sequence(openai_client, model, live):
    body = {"model": model, "input": "Say hello.", "max_output_tokens": 16, **greedy()}
    sent = events(live.url, body)
    kinds = [e["type"] for e in sent]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed" if sent[-1]["response"]["status"] == "completed"
                          else "response.incomplete"]
    assert [e["sequence_number"] for e in sent] == list(range(len(sent)))
    streamed = "".join(e["delta"] for e in sent if e["type"] == "response.output_text.delta")
    assert streamed and sent[-4]["text"] == streamed == sent[-1]["response"]["output"][0]["content"][0]["text"]
    with openai_client.responses.stream(**body) as stream:
        sdk_events = list(stream)
    assert "".join(e.delta for e in sdk_events if e.type == "response.output_text.delta") == streamed  # greedy
    assert sdk_events[-1].type == sent[-1]["type"]
    assert openai_client.responses.retrieve(sdk_events[-1].response.id).output_text == streamed  # stored first


class City(pydantic.BaseModel):
    city: str = pydantic.Field(min_length=1, max_length=30)


def test_parse_gives_the_model_an_answer_matching_the_class(openai_client, model):
    # The schema bounds the answer within max_output_tokens: it completes, whole and streamed.
    parsed = openai_client.responses.parse(model=model, input="Name a city in France.", text_format=City,
                                           max_output_tokens=40, **greedy())
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, City) and parsed.output_parsed.city
    with openai_client.responses.stream(model=model, input="Name a city in France.", text_format=City,
                                        max_output_tokens=40, **greedy()) as stream:
        final = stream.get_final_response()
    assert final.output_parsed == parsed.output_parsed


def test_a_function_call_and_its_output_through_previous_response_id(openai_client, model):
    first = openai_client.responses.create(model=model, input="What is the weather in Paris?", tools=TOOLS,
                                           tool_choice="required", parallel_tool_calls=False, max_output_tokens=60,
                                           **greedy())
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id and calls[0].id.startswith("fc_")
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    # The follow-up sends only the output: the call it answers comes from the stored conversation.
    second = openai_client.responses.create(
        model=model, previous_response_id=first.id, tools=TOOLS, max_output_tokens=24, **greedy(),
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"sky": "clear"}'}])
    assert second.previous_response_id == first.id and second.usage.input_tokens > first.usage.input_tokens
    items = openai_client.responses.input_items.list(second.id)
    assert [i.type for i in items.data] == ["function_call_output"]
    # Without the stored call the same output answers nothing: a 400 naming it.
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client.responses.create(model=model, input=[{"type": "function_call_output", "call_id": "call_x",
                                                            "output": "{}"}], max_output_tokens=8)
    assert refused.value.body["param"] == "input[0].call_id"


def test_function_calls_stream_as_their_events(openai_client, model, live):
    body = {"model": model, "input": "What is the weather in Rome?", "tools": TOOLS, "max_output_tokens": 60,
            "tool_choice": {"type": "function", "name": "get_weather"}, **greedy()}
    sent = events(live.url, body)
    kinds = [e["type"] for e in sent]
    assert kinds[2] == "response.output_item.added" and sent[2]["item"]["type"] == "function_call"
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    done = next(e for e in sent if e["type"] == "response.function_call_arguments.done")
    assert done["arguments"] == "".join(e["delta"] for e in sent
                                        if e["type"] == "response.function_call_arguments.delta")
    jsonschema.validate(json.loads(done["arguments"]), WEATHER)
    with openai_client.responses.stream(**body) as stream:
        final = stream.get_final_response()
    assert [i.type for i in final.output] == ["function_call"] and final.output[0].arguments == done["arguments"]


def test_bad_requests_answer_in_openai_s_shape(live, model):
    cases = [
        ({"tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]}, 400,
         "input[0].content[0].type"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, 400, "input[0].type"),
        ({"reasoning": {"effort": "high"}}, 400, "reasoning"),
        ({"frobnicate": 1}, 400, "frobnicate"),
        ({"max_output_tokens": 0}, 400, "max_output_tokens"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object", "not": {}}}}}, 400,
         "text.format"),
        ({"model": "gpt-9"}, 404, "model"),
        ({"previous_response_id": "resp_nothing"}, 404, "previous_response_id"),
    ]
    for change, status, param in cases:
        response = httpx.post(f"{live.url}/v1/responses", timeout=30,
                              json={"model": model, "input": "Hi", "max_output_tokens": 4, **change})
        assert response.status_code == status, (change, response.text)
        error = response.json()["error"]
        assert error["param"] == param and error["message"] and error["type"], (change, error)


def test_two_replicas_share_stored_responses_scoped_to_the_api_key(engine, redis_server, key_prefix, model):
    settings = base_settings(redis_url=redis_server.url, redis_key_prefix=key_prefix, redis_timeout_ms=2000,
                             api_keys=("key-alice-123", "key-bob-4567"))
    one, two = (InProcessServer(build_app(settings, engine=engine)) for _ in range(2))
    try:
        one.wait_ready()
        two.wait_ready()
        alice_one, alice_two, bob = sdk(one.url, "key-alice-123"), sdk(two.url, "key-alice-123"), \
            sdk(two.url, "key-bob-4567")
        first = alice_one.responses.create(model=model, input="My name is Zed. Remember it.", max_output_tokens=16,
                                           **greedy())
        second = alice_two.responses.create(model=model, input="What is my name?", previous_response_id=first.id,
                                            max_output_tokens=16, **greedy())
        # The second replica continued the first's conversation: its prompt holds the first turn.
        assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
        assert alice_one.responses.retrieve(second.id).output_text == second.output_text
        for call in (lambda: bob.responses.retrieve(first.id), lambda: bob.responses.delete(first.id),
                     lambda: bob.responses.create(model=model, input="Hi", previous_response_id=first.id,
                                                  max_output_tokens=4)):
            with pytest.raises(openai.NotFoundError):
                call()
        alice_two.responses.delete(first.id)
        with pytest.raises(openai.NotFoundError) as gone:
            alice_one.responses.create(model=model, input="Hi", previous_response_id=first.id, max_output_tokens=4)
        assert gone.value.body["code"] == "previous_response_not_found"
        unstored = alice_one.responses.create(model=model, input="Hi", store=False, max_output_tokens=4)
        assert unstored.store is False
        with pytest.raises(openai.NotFoundError):
            alice_two.responses.retrieve(unstored.id)
    finally:
        one.stop()
        two.stop()


def test_input_items_pages(openai_client, model):
    items = [{"role": "user", "content": f"Message {i}."} for i in range(5)]
    response = openai_client.responses.create(model=model, input=items, max_output_tokens=4)
    newest = openai_client.responses.input_items.list(response.id, limit=2)
    assert [i.content[0].text for i in newest.data] == ["Message 4.", "Message 3."] and newest.has_more
    rest = openai_client.responses.input_items.list(response.id, after=newest.last_id, limit=10)
    assert [i.content[0].text for i in rest.data] == ["Message 2.", "Message 1.", "Message 0."] and not rest.has_more
    oldest = openai_client.responses.input_items.list(response.id, order="asc", limit=1)
    assert oldest.data[0].content[0].text == "Message 0."


def test_a_cached_response_replays_with_its_id_for_the_same_key_only(engine, model):
    server = InProcessServer(build_app(base_settings(cache_mode="all", api_keys=("key-one-1234", "key-two-5678")),
                                       engine=engine))
    try:
        server.wait_ready()
        body = {"model": model, "input": "Say yes.", "max_output_tokens": 8, **greedy()}
        headers = {"Authorization": "Bearer key-one-1234"}
        first = httpx.post(f"{server.url}/v1/responses", json=body, headers=headers, timeout=60)
        again = httpx.post(f"{server.url}/v1/responses", json=body, headers=headers, timeout=60)
        other = httpx.post(f"{server.url}/v1/responses", json=body, timeout=60,
                           headers={"Authorization": "Bearer key-two-5678"})
        assert (first.headers["x-cache"], again.headers["x-cache"], other.headers["x-cache"]) == ("MISS", "HIT",
                                                                                                  "MISS")
        assert again.json()["id"] == first.json()["id"] != other.json()["id"]
        streamed = [httpx.post(f"{server.url}/v1/responses", json={**body, "stream": True}, headers=headers,
                               timeout=60) for _ in range(2)]
        assert [s.headers["x-cache"] for s in streamed] == ["MISS", "HIT"] and streamed[0].text == streamed[1].text
        assert "event: response.completed" in streamed[1].text
    finally:
        server.stop()


def test_with_redis_down_responses_are_served_unstored_and_continuations_wait(engine, model):
    settings = base_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout_ms=200)
    server = InProcessServer(build_app(settings, engine=engine))
    try:
        server.wait_ready()
        client = sdk(server.url)
        response = client.responses.create(model=model, input="Hi", max_output_tokens=4)
        assert response.output and response.store is False
        answer = httpx.post(f"{server.url}/v1/responses", timeout=30, json={
            "model": model, "input": "Hi", "max_output_tokens": 4, "previous_response_id": response.id})
        assert answer.status_code == 503 and answer.headers["retry-after"]
        assert answer.json()["error"]["param"] == "previous_response_id"
    finally:
        server.stop()
