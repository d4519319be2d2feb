"""The OpenAI-compatible API, driven by the official openai SDK against a real server and the real model."""

import json
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import engine_quiet, says_four, says_paris, tokens_for_a_client_leaving_after


@pytest.fixture(scope="module")
def model_id(live):
    return live.app.service.engine.info.name


def ask(prompt):
    return [{"role": "user", "content": prompt}]


def test_models_list_and_retrieve(openai_client, model_id):
    models = openai_client.models.list()
    assert [m.id for m in models.data] == [model_id]
    assert openai_client.models.retrieve(model_id).id == model_id
    with pytest.raises(openai.NotFoundError):
        openai_client.models.retrieve("gpt-4")


def test_chat_completion(openai_client, model_id):
    reply = openai_client.chat.completions.create(
        model=model_id, messages=[{"role": "system", "content": "You are a helpful assistant. Give short, factual answers."},
                                  *ask("What is 2+2?")],
        temperature=0, max_tokens=24,
    )
    assert reply.object == "chat.completion"
    assert reply.model == model_id
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert says_four(choice.message.content), choice.message.content
    assert choice.finish_reason == "stop"
    usage = reply.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens > 0


def test_chat_max_completion_tokens_and_length(openai_client, model_id):
    reply = openai_client.chat.completions.create(
        model=model_id, messages=ask("Write a story about a dragon."), max_completion_tokens=4, temperature=0.8,
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 4


def test_chat_stop_sequence(openai_client, model_id):
    messages = ask("Count from 1 to 10, separated by commas.")
    full = openai_client.chat.completions.create(model=model_id, messages=messages, temperature=0, max_tokens=30)
    assert "5" in full.choices[0].message.content
    cut = openai_client.chat.completions.create(model=model_id, messages=messages, temperature=0, max_tokens=30,
                                                stop=["5"])
    assert cut.choices[0].finish_reason == "stop"
    assert "5" not in cut.choices[0].message.content
    assert full.choices[0].message.content.startswith(cut.choices[0].message.content)


def test_chat_streaming_matches_the_whole_answer_and_reports_usage(openai_client, model_id):
    kwargs = dict(model=model_id, messages=ask("What is the capital of France?"), temperature=0, max_tokens=24)
    whole = openai_client.chat.completions.create(**kwargs)
    stream = openai_client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # token by token, not one blob
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_stream_without_usage_has_none(openai_client, model_id):
    chunks = list(openai_client.chat.completions.create(model=model_id, messages=ask("Hi"), max_tokens=3, stream=True))
    assert all(c.usage is None for c in chunks)


def test_completions_plain_and_streamed(openai_client, model_id):
    reply = openai_client.completions.create(model=model_id, prompt="The capital of France is", temperature=0,
                                             max_tokens=4)
    assert reply.object == "text_completion"
    assert says_paris(reply.choices[0].text)
    assert reply.usage.completion_tokens <= 4
    stream = openai_client.completions.create(model=model_id, prompt="The capital of France is", temperature=0,
                                              max_tokens=4, stream=True)
    assert "".join(c.choices[0].text for c in stream) == reply.choices[0].text


def test_fields_used_here_are_accepted_with_the_values_they_can_have(openai_client, model_id):
    reply = openai_client.chat.completions.create(
        model=model_id, max_tokens=2, presence_penalty=0.5, logit_bias={"1": 1},
        messages=[{"role": "user", "content": "Hi", "name": "ann"},
                  {"role": "assistant", "content": None, "refusal": "I cannot.", "annotations": [], "audio": None},
                  {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "again"}]}],
        response_format={"type": "text"}, user="tester", metadata={"team": "a"}, store=False,
        service_tier="auto", tool_choice="none", modalities=["text"], parallel_tool_calls=True,
        safety_identifier="user-1", prompt_cache_key="conversation-7", reasoning_effort="none",
    )
    assert reply.choices[0].message.content


def test_every_request_field_is_used_forwarded_or_refused():
    """Walk the request schemas: every field they accept has a fate in FIELDS for both backends, and the README's
    field table lists each with that fate."""
    import dataclasses
    import re

    from conftest import ROOT

    from inference.api.openai.schemas import (
        FIELDS,
        ChatCompletionMessage,
        ChatCompletionRequest,
        CompletionRequest,
        Fate,
    )

    readme = (ROOT / "README.md").read_text()
    table = {}
    for line in readme.splitlines():
        match = re.match(r"\| `([a-z_]+)` \| (chat|completion|message) \| ((?:used|refused)[^|]*) \| ([^|]+) \|", line)
        if match:
            table[(match[2], match[1])] = (match[3].strip(), match[4].strip())
    for kind, schema in (("chat", ChatCompletionRequest), ("completion", CompletionRequest),
                         ("message", ChatCompletionMessage)):
        for f in dataclasses.fields(schema):
            assert f.name in FIELDS[kind], f"{kind}.{f.name} has no fate (openai_schemas.FIELDS)"
        for name, fate in FIELDS[kind].items():
            assert isinstance(fate, Fate) and fate.embedded in ("used", "refused")
            assert fate.gateway in ("used", "forwarded", "refused")
            assert fate.embedded == "used" or fate.why, f"{kind}.{name}: a refusal must say why"
            assert (kind, name) in table, f"README's OpenAI field table lacks {kind}.{name}"
            embedded, gateway = table[(kind, name)]
            assert embedded.startswith(fate.embedded) and gateway.startswith(fate.gateway), (kind, name)


@pytest.mark.parametrize("field, value", [
    ("some_future_field", {"x": 1}), ("store", True), ("service_tier", "flex"), ("reasoning_effort", "high"),
    ("verbosity", "low"),
])
def test_fields_the_embedded_engine_cannot_honour_are_refused_by_name(openai_client, model_id, field, value):
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.chat.completions.create(model=model_id, messages=ask("Hi"), max_tokens=2,
                                              extra_body={field: value})
    assert err.value.body["param"] == field and err.value.body["code"] == "unsupported_parameter"


@pytest.mark.parametrize("message, param", [
    ({"role": "user", "content": "Hi", "audio": {"id": "a"}}, "messages[0].audio"),
    ({"role": "assistant", "content": "Hi", "reasoning_content": "hm"}, "messages[0].reasoning_content"),
    ({"role": "user", "content": "Hi", "cache_control": {"type": "ephemeral"}}, "messages[0].cache_control"),
])
def test_message_fields_that_cannot_be_honoured_are_refused_by_name(openai_client, model_id, message, param):
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.chat.completions.create(model=model_id, messages=[message], max_tokens=2)
    assert err.value.body["param"] == param and err.value.body["code"] == "unsupported_parameter"


def test_a_participant_name_and_a_tool_result_in_parts_reach_the_prompt(live, model_id):
    from inference.api.openai.translate import chat_messages, message_fates
    from inference.api.openai.schemas import ChatCompletionRequest
    from inference.web.validation import from_json

    raw = {"model": model_id, "messages": [
        {"role": "user", "content": "What is the weather?", "name": "ann"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "Sunny, "},
                                                           {"type": "text", "text": "21 C"}]}]}
    body = from_json(ChatCompletionRequest, raw, allow_unknown=True)
    messages, _ = chat_messages(body.messages, message_fates(raw, True), live.app.service.settings)
    contents = [m.content for m in messages if m.role != "system"]
    assert contents[0] == "ann: What is the weather?"
    assert contents[2].endswith("Sunny, 21 C")


@pytest.mark.parametrize("field, value", [
    ("functions", [{"name": "f"}]), ("function_call", "auto"),
    ("audio", {"voice": "alloy", "format": "wav"}), ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}), ("web_search_options", {}),
])
def test_fields_this_service_does_not_implement_are_refused_by_name(openai_client, model_id, field, value):
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.chat.completions.create(model=model_id, messages=ask("Hi"), max_tokens=2,
                                              extra_body={field: value})
    assert err.value.body["param"] == field and err.value.body["code"] == "unsupported_parameter"


@pytest.mark.parametrize("field, value", [("best_of", 3), ("some_future_field", 1)])
def test_completion_fields_not_implemented_are_refused(openai_client, model_id, field, value):
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.completions.create(model=model_id, prompt="x", max_tokens=2, extra_body={field: value})
    assert err.value.body["param"] == field


@pytest.mark.parametrize("kwargs, param", [
    ({"n": 5}, "n"),  # MAX_CHOICES is 4
    ({"n": 0}, "n"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ({"temperature": 5}, "temperature"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"max_tokens": 100000}, "max_tokens"),
])
def test_bad_parameters_raise_bad_request(openai_client, model_id, kwargs, param):
    request = {"model": model_id, "messages": ask("Hi"), **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.chat.completions.create(**request)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param
    assert err.value.body["type"] == "invalid_request_error"


def test_unknown_model_is_not_found(openai_client):
    with pytest.raises(openai.NotFoundError) as err:
        openai_client.chat.completions.create(model="gpt-4", messages=ask("Hi"))
    assert err.value.body["code"] == "model_not_found"


def test_prompt_too_long_is_bad_request(openai_client, model_id):
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.chat.completions.create(model=model_id, messages=ask("word " * 2100), max_tokens=10)
    assert err.value.body["code"] == "context_length_exceeded"


def test_without_max_tokens_the_answer_fits_the_context(openai_client, model_id):
    reply = openai_client.completions.create(model=model_id, prompt="word " * 2030, temperature=0,
                                             max_tokens=None, extra_body={"max_tokens": None})
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens <= 2048


def test_completions_rejects_echo(openai_client, model_id):
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.completions.create(model=model_id, prompt="x", echo=True)
    assert err.value.body["param"] == "echo"


def test_v1_routing_errors_use_openai_shape(live):
    response = httpx.get(f"{live.url}/v1/nothing")
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_first_token_arrives_long_before_the_last(live, model_id):
    body = {"model": model_id, "messages": ask("Write a long story about a lighthouse."), "max_tokens": 150,
            "temperature": 0.8, "seed": 3, "stream": True}
    engine = live.app.service.engine
    before, generated_at_arrival = engine.tokens_generated, []
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                generated_at_arrival.append(engine.tokens_generated - before)
    total = engine.tokens_generated - before
    assert total >= 60 and len(generated_at_arrival) > 10
    # Chunks arrive as the tokens are generated, not in one burst at the end (counted in tokens, not seconds,
    # so a loaded machine cannot make it fail).
    assert generated_at_arrival[0] < total // 4 and generated_at_arrival[len(generated_at_arrival) // 2] < 3 * total // 4


def test_client_gone_mid_stream_frees_the_engine_within_a_few_tokens(live, model_id, engine):
    body = {"model": model_id, "messages": ask("Write a very long essay about mountains."), "max_tokens": 800,
            "temperature": 0.8, "stream": True}
    produced = tokens_for_a_client_leaving_after(5, engine, f"{live.url}/v1/chat/completions", body)
    assert produced < 30, f"{produced} tokens were generated for a client that left after 5"


def test_client_gone_while_waiting_for_a_whole_answer_frees_the_engine(live, model_id, engine):
    import socket

    body = json.dumps({"model": model_id, "messages": ask("Write a very long essay about mountains."),
                       "max_tokens": 800, "temperature": 0.8}).encode()
    before = engine_quiet(engine)
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        while engine.tokens_generated - before < 5:
            time.sleep(0.01)  # the model's progress lives in another thread
    produced = engine_quiet(engine) - before
    assert produced < 30, f"{produced} tokens were generated for a client that left after 5"


def test_an_empty_completion_prompt_starts_from_the_beginning_of_sequence(openai_client, model_id):
    reply = openai_client.completions.create(model=model_id, prompt="", max_tokens=3, temperature=0)
    assert reply.usage.prompt_tokens == 1 and reply.usage.completion_tokens >= 1


def test_completions_rejects_a_suffix(openai_client, model_id):
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.completions.create(model=model_id, prompt="x", suffix="y")
    assert err.value.body["param"] == "suffix"


def test_served_model_name_is_the_model_id(engine):
    import asyncio

    from conftest import Running, base_settings, call_asgi

    from inference.app import build_app

    app = build_app(base_settings(served_model_name="team/small-chat"), engine=engine)

    def chat(model):
        body = {"model": model, "messages": ask("Hi"), "max_tokens": 1}
        return call_asgi(app, "POST", "/v1/chat/completions", json.dumps(body).encode())

    async def scenario():
        async with Running(app):
            return (await call_asgi(app, "GET", "/v1/models"), await chat("team/small-chat"),
                    await chat(engine.info.name))

    models, named, file_name = asyncio.run(scenario())
    assert [m["id"] for m in models.json()["data"]] == ["team/small-chat"]
    assert named.status == 200 and named.json()["model"] == "team/small-chat"
    assert file_name.status == 404 and file_name.json()["error"]["code"] == "model_not_found"


def max_repeats(text):
    words = [w.strip(".,!?;:'\"").lower() for w in text.split()]
    return max((words.count(w) for w in set(words) if w), default=0)


def test_frequency_and_presence_penalties_change_the_output(openai_client, model_id):
    kwargs = dict(model=model_id, messages=ask("Write the word cat twenty times."), temperature=0, max_tokens=40)
    plain = openai_client.chat.completions.create(**kwargs).choices[0].message.content
    frequency = openai_client.chat.completions.create(**kwargs, frequency_penalty=2).choices[0].message.content
    presence = openai_client.chat.completions.create(**kwargs, presence_penalty=2).choices[0].message.content
    assert frequency != plain and presence != plain
    assert max_repeats(frequency) < max_repeats(plain), (plain, frequency)
    # Penalised answers stay repeatable (the cache relies on it).
    assert openai_client.chat.completions.create(**kwargs, frequency_penalty=2).choices[0].message.content == frequency


def test_repetition_penalty_extension_is_accepted_and_acts(openai_client, model_id):
    kwargs = dict(model=model_id, messages=ask("Write the word cat twenty times."), temperature=0, max_tokens=40)
    plain = openai_client.chat.completions.create(**kwargs).choices[0].message.content
    penalised = openai_client.chat.completions.create(**kwargs, extra_body={"repetition_penalty": 1.8})
    assert penalised.choices[0].message.content != plain


@pytest.mark.parametrize("field, value", [("frequency_penalty", 2.5), ("presence_penalty", -3),
                                          ("repetition_penalty", 0)])
def test_penalties_out_of_range_are_refused(openai_client, model_id, field, value):
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.chat.completions.create(model=model_id, messages=ask("Hi"), max_tokens=2,
                                              extra_body={field: value})
    assert err.value.body["param"] == field


def test_chats_without_a_system_message_get_the_system_prompt(openai_client, model_id, live):
    from inference.config import DEFAULT_SYSTEM_PROMPT

    question = ask("What is the capital of France?")
    implicit = openai_client.chat.completions.create(model=model_id, messages=question, temperature=0, max_tokens=24)
    explicit = openai_client.chat.completions.create(
        model=model_id, messages=[{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *question],
        temperature=0, max_tokens=24)
    assert implicit.choices[0].message.content == explicit.choices[0].message.content
    assert implicit.usage.prompt_tokens == explicit.usage.prompt_tokens
    assert says_paris(implicit.choices[0].message.content)


def test_chat_system_prompt_off_passes_messages_through(engine, model_id):
    from conftest import InProcessServer, base_settings

    from inference.app import build_app
    from inference.config import DEFAULT_SYSTEM_PROMPT

    server = InProcessServer(build_app(base_settings(chat_system_prompt=False), engine=engine))
    try:
        server.wait_ready()
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
            question = ask("What is the capital of France?")
            bare = client.chat.completions.create(model=model_id, messages=question, temperature=0, max_tokens=4)
            explicit = client.chat.completions.create(
                model=model_id, messages=[{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *question],
                temperature=0, max_tokens=4)
    finally:
        server.stop()
    # The chat template's own default system line, not ours: a prompt of another length.
    assert bare.usage.prompt_tokens != explicit.usage.prompt_tokens


def test_logit_bias_bans_and_forces_tokens(openai_client, model_id, live):
    engine = live.app.service.engine
    kwargs = dict(model=model_id, prompt="The capital of France is", temperature=0, max_tokens=3)
    plain = openai_client.completions.create(**kwargs).choices[0].text
    first = engine.tokenize(plain)[0]
    banned = openai_client.completions.create(**kwargs, logit_bias={str(first): -100}).choices[0].text
    assert engine.tokenize(banned)[0] != first, (plain, banned)
    (banana,) = engine.tokenize(" banana")
    forced = openai_client.completions.create(**kwargs, logit_bias={str(banana): 100}).choices[0].text
    assert forced == " banana" * 3


@pytest.mark.parametrize("bias, message", [
    ({"x": 1}, "keys must be token ids"), ({"5": 101}, "from -100 to 100"), ([1, 2], "must be an object"),
    ({"99999999": 1}, "token ids this model does not have"),
])
def test_bad_logit_bias_is_refused_naming_it(openai_client, model_id, bias, message):
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.chat.completions.create(model=model_id, messages=ask("Hi"), max_tokens=2,
                                              extra_body={"logit_bias": bias})
    assert err.value.body["param"] == "logit_bias" and message in err.value.body["message"]


CITY_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "country", "population"],
               "properties": {"name": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40},
                              "population": {"type": "integer"}}}


def test_json_object_answers_are_json_objects(openai_client, model_id):
    reply = openai_client.chat.completions.create(
        model=model_id, messages=ask("Give the name and country of the capital of France as JSON."),
        response_format={"type": "json_object"}, temperature=0, max_tokens=200)
    choice = reply.choices[0]
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.message.content), dict)
    else:  # cut by max_tokens: says so, and what there is starts as an object
        assert choice.finish_reason == "length" and choice.message.content.lstrip().startswith("{")


def test_json_schema_answers_match_the_schema_streamed_or_not(openai_client, model_id):
    import jsonschema

    kwargs = dict(model=model_id, messages=ask("Facts about Paris."), temperature=0, max_tokens=120,
                  response_format={"type": "json_schema",
                                   "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True}})
    reply = openai_client.chat.completions.create(**kwargs)
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), CITY_SCHEMA)
    streamed = "".join(c.choices[0].delta.content or "" for c in openai_client.chat.completions.create(
        **kwargs, stream=True) if c.choices)
    assert streamed == reply.choices[0].message.content


def test_sdk_parse_with_a_pydantic_model(openai_client, model_id):
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        country: str
        population: int

    completion = openai_client.beta.chat.completions.parse(
        model=model_id, messages=ask("Facts about Rome."), response_format=City, temperature=0, max_tokens=120)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.name and abs(parsed.population) < 10 ** 16  # digits are bounded


def test_sdk_parse_finishes_within_a_small_budget(openai_client, model_id):
    """Asked for far more than max_tokens holds, a structured answer still closes within it (the grammar's end,
    STRUCTURED_CLOSING_TOKENS), so parse() gets a finished, valid object instead of raising LengthFinishReasonError."""
    from pydantic import BaseModel

    class Fruits(BaseModel):
        fruits: list[str]

    completion = openai_client.beta.chat.completions.parse(
        model=model_id, messages=ask("List one hundred fruits."), response_format=Fruits, temperature=0, max_tokens=64)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Fruits)
    assert completion.usage.completion_tokens <= 64


def test_a_named_tool_call_s_arguments_close_within_max_tokens(openai_client, model_id):
    """A function asked for a long text argument, with max_tokens too small for it: the call still completes."""
    story = {"type": "function", "function": {"name": "save_story", "description": "Save a story.", "parameters": {
        "type": "object", "properties": {"title": {"type": "string"}, "text": {"type": "string"}},
        "required": ["title", "text"], "additionalProperties": False}}}
    reply = openai_client.chat.completions.create(
        model=model_id, messages=ask("Write a very long story about a lighthouse and save it."), tools=[story],
        tool_choice={"type": "function", "function": {"name": "save_story"}}, temperature=0, max_tokens=60)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and reply.usage.completion_tokens <= 60
    assert set(json.loads(choice.message.tool_calls[0].function.arguments)) == {"title", "text"}


def test_an_answer_cut_by_max_tokens_says_length(openai_client, model_id):
    reply = openai_client.chat.completions.create(
        model=model_id, messages=ask("Facts about Paris."), temperature=0, max_tokens=3,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}})
    assert reply.choices[0].finish_reason == "length"


def test_structured_completions_too(openai_client, model_id):
    reply = openai_client.completions.create(
        model=model_id, prompt="A JSON object describing a cat:", temperature=0, max_tokens=60,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "cat", "schema": {
            "type": "object", "properties": {"colour": {"enum": ["black", "white", "ginger"]}},
            "required": ["colour"], "additionalProperties": False}}}})
    assert json.loads(reply.choices[0].text)["colour"] in ("black", "white", "ginger")


@pytest.mark.parametrize("schema, keyword, where", [
    ({"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}, "uniqueItems",
     "json_schema.schema.properties.tags"),
    ({"not": {"type": "string"}}, "not", "json_schema.schema"),
    ({"anyOf": [{"type": "array", "contains": {"const": 1}}]}, "contains", "json_schema.schema.anyOf[0]"),
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "if", "json_schema.schema"),
    # oneOf promises exactly one branch; with branches that can overlap the grammar cannot keep that promise
    ({"oneOf": [{"type": "object"}, {"type": "object", "properties": {"a": {"type": "string"}}}]}, "oneOf", ""),
])
def test_schema_keywords_that_cannot_be_enforced_are_refused(openai_client, model_id, schema, keyword, where):
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.chat.completions.create(
            model=model_id, messages=ask("x"), max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    message = err.value.body["message"]
    assert err.value.body["param"] == "response_format" and keyword in message and where in message


# What the grammar converter used to drop (the answer then failed the check after generation: a 502), or could not
# parse (a 500): each is enforced now, and the answer matches. Strings are bounded and objects closed where the
# point is another keyword, so that even this small model's answer ends before max_tokens.
ENFORCED_NOW = {
    "allOf beside properties": {"type": "object", "properties": {"a": {"type": "integer"}},
                                "allOf": [{"required": ["a"]}], "additionalProperties": False},
    "minLength beside pattern": {"type": "object", "properties": {"code": {
        "type": "string", "minLength": 3, "maxLength": 8, "pattern": "^[A-Z]+$"}}, "required": ["code"],
        "additionalProperties": False},
    "maxLength beside $ref": {"$defs": {"s": {"type": "string"}}, "type": "object", "properties": {
        "name": {"$ref": "#/$defs/s", "maxLength": 5}}, "required": ["name"], "additionalProperties": False},
    "five numbers": {"type": "object", "properties": {k: {"type": "number"} for k in "abcde"},
                     "required": list("abcde"), "additionalProperties": False},
    "bounds": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 7},
                                                "f": {"type": "string", "format": "email", "maxLength": 24}},
               "required": ["n", "f"], "additionalProperties": False},
}


@pytest.mark.parametrize("name", sorted(ENFORCED_NOW))
def test_keywords_the_old_converter_dropped_are_enforced(openai_client, model_id, name):
    import jsonschema

    schema = ENFORCED_NOW[name]
    reply = openai_client.chat.completions.create(
        model=model_id, messages=ask("An example, as JSON."), max_tokens=80, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content), schema)


def test_a_long_string_bound_is_served_not_a_500(openai_client, model_id):
    """maxLength 4096 made a grammar llama.cpp could not parse (the ValueError escaped as a 500)."""
    import jsonschema

    schema = {"type": "object", "properties": {"t": {"type": "string", "maxLength": 4096}}, "required": ["t"],
              "additionalProperties": False}
    reply = openai_client.chat.completions.create(
        model=model_id, messages=ask("Say hi, as JSON."), max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.content.startswith('{"t": "')
    if choice.finish_reason == "stop":
        jsonschema.validate(json.loads(choice.message.content), schema)


@pytest.mark.parametrize("response_format", [
    {"type": "xml"}, {"type": "json_schema"}, "json",
    # a value beyond 64 bits, which the grammar engine cannot read (found by the Anthropic API's fuzzing): a 400
    {"type": "json_schema", "json_schema": {"name": "n", "schema": {"const": 2 ** 90}}},
])
def test_malformed_response_format_is_refused(openai_client, model_id, response_format):
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.chat.completions.create(model=model_id, messages=ask("x"), max_tokens=4,
                                              extra_body={"response_format": response_format})
    assert err.value.body["param"] == "response_format"


def test_a_bound_beyond_64_bits_is_brought_within_16_digits(openai_client, model_id):
    import jsonschema

    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 2 ** 90, "minimum": -(2 ** 90)}},
              "required": ["n"], "additionalProperties": False}
    reply = openai_client.chat.completions.create(
        model=model_id, messages=ask("Pick a number, as JSON."), max_tokens=30, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    if reply.choices[0].finish_reason == "stop":
        value = json.loads(reply.choices[0].message.content)
        jsonschema.validate(value, schema)
        assert abs(value["n"]) < 10 ** 16


def test_continue_final_message_continues_the_assistant_s_text(openai_client, model_id):
    history = [*ask("Count from one to ten in words."), {"role": "assistant", "content": "One, two, three,"}]
    whole = openai_client.chat.completions.create(model=model_id, messages=history[:1], max_tokens=12, temperature=0)
    continued = openai_client.chat.completions.create(
        model=model_id, messages=history, max_tokens=12, temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert continued.choices[0].message.content  # the continuation only, not the prefill again
    assert not continued.choices[0].message.content.startswith("One, two, three,")
    assert continued.usage.prompt_tokens > whole.usage.prompt_tokens
    for extra in ({"continue_final_message": True}, {"add_generation_prompt": False}):
        with pytest.raises(openai.BadRequestError) as err:
            openai_client.chat.completions.create(model=model_id, messages=history, max_tokens=2, extra_body=extra)
        assert err.value.body["param"] == "add_generation_prompt"
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.chat.completions.create(model=model_id, messages=history[:1], max_tokens=2, extra_body={
            "continue_final_message": True, "add_generation_prompt": False})
    assert err.value.body["param"] == "messages"


def city_tool(name, what):
    return {"type": "function", "function": {"name": name, "description": f"Current {what} in a city.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"],
        "additionalProperties": False}}}


TOOLS = [city_tool("get_weather", "weather"), city_tool("get_time", "time")]
WEATHER = ask("What's the weather in Paris?")


def test_required_tool_call_comes_back_in_openai_shape(openai_client, model_id):
    reply = openai_client.chat.completions.create(model=model_id, messages=WEATHER, tools=TOOLS,
                                                  tool_choice="required", temperature=0, max_tokens=60)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in ("get_weather", "get_time")
    assert set(json.loads(call.function.arguments)) == {"city"}


def test_named_tool_call_streamed_assembles_to_the_same_call(openai_client, model_id):
    kwargs = dict(model=model_id, messages=WEATHER, tools=TOOLS, temperature=0, max_tokens=60,
                  tool_choice={"type": "function", "function": {"name": "get_time"}})
    whole = openai_client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    name, arguments, finish, ids = None, "", None, set()
    for chunk in openai_client.chat.completions.create(**kwargs, stream=True):
        for delta in chunk.choices[0].delta.tool_calls or () if chunk.choices else ():
            name = name or delta.function.name
            arguments += delta.function.arguments or ""
            ids.add(delta.id) if delta.id else None
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert (name, arguments, finish) == ("get_time", whole.function.arguments, "tool_calls") and len(ids) == 1
    assert isinstance(json.loads(arguments)["city"], str)


def test_tool_results_in_the_history_are_accepted(openai_client, model_id):
    call = openai_client.chat.completions.create(
        model=model_id, messages=WEATHER, tools=TOOLS, temperature=0, max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}).choices[0].message.tool_calls[0]
    history = WEATHER + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                         {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}]
    reply = openai_client.chat.completions.create(model=model_id, messages=history, temperature=0, max_tokens=40)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.choices[0].message.content


def test_tool_choice_none_ignores_the_tools(openai_client, model_id):
    reply = openai_client.chat.completions.create(model=model_id, messages=WEATHER, tools=TOOLS, tool_choice="none",
                                                  temperature=0, max_tokens=8)
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].message.content


@pytest.mark.parametrize("kwargs, param, message", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tools": [{"type": "function"}], "tool_choice": "required"}, "tools", "function"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}],
      "tool_choice": "required"}, "tools", '"not"'),
])
def test_tool_requests_that_cannot_be_served_are_refused(openai_client, model_id, kwargs, param, message):
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.chat.completions.create(model=model_id, messages=WEATHER, max_tokens=4, **kwargs)
    assert err.value.body["param"] == param and message in err.value.body["message"]


def assembled(stream):
    """A streamed chat answer put together: (finish_reason, content, [(name, arguments)])."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or ():
            name, arguments = calls.get(call.index, ("", ""))
            calls[call.index] = (name + (call.function.name or ""), arguments + (call.function.arguments or ""))
        finish = chunk.choices[0].finish_reason or finish
    return finish, content or None, [calls[i] for i in sorted(calls)]


def valid_calls(calls, tools=TOOLS):
    import jsonschema

    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in tools}
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), schemas[name])
    return True


@pytest.mark.parametrize("question", ["What's the weather in Paris?", "Say hello to me."])
def test_auto_answers_or_calls_in_openai_shape_streamed_or_not(openai_client, model_id, question):
    """"auto" (also what tools without a tool_choice mean): the model chooses; either way the answer is well formed:
    text as content, or calls that match their functions' schemas, and streaming gives the same answer."""
    kwargs = dict(model=model_id, messages=ask(question), tools=TOOLS, temperature=0, max_tokens=150)
    whole = openai_client.chat.completions.create(**kwargs, tool_choice="auto").choices[0]
    default = openai_client.chat.completions.create(**kwargs).choices[0]
    calls = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or ()]
    if calls:
        assert whole.finish_reason == "tool_calls" and whole.message.content is None and valid_calls(calls)
        assert all(c.id.startswith("call_") for c in whole.message.tool_calls)
    elif whole.finish_reason == "stop":
        assert whole.message.content and not whole.message.content.startswith('{"answer"')  # unwrapped
    else:  # cut by max_tokens: the text so far, or nothing when it was writing calls
        assert whole.finish_reason == "length"
    assert (default.finish_reason, default.message.content) == (whole.finish_reason, whole.message.content)
    assert assembled(openai_client.chat.completions.create(**kwargs, stream=True)) == (
        whole.finish_reason, whole.message.content, calls)


def test_parallel_tool_calls_false_makes_at_most_one_call(openai_client, model_id):
    messages = ask("What's the weather and the time in Paris, Rome and Oslo? Call every function you need.")
    for parallel in (False, True):
        reply = openai_client.chat.completions.create(model=model_id, messages=messages, tools=TOOLS, temperature=0,
                                                      max_tokens=120, parallel_tool_calls=parallel)
        calls = reply.choices[0].message.tool_calls or []
        assert len(calls) <= (1 if not parallel else 8)
        assert valid_calls([(c.function.name, c.function.arguments) for c in calls])


def test_a_tool_loop_with_auto_runs_end_to_end(openai_client, model_id):
    """The loop every agent framework runs: ask with tools ("auto"), run each call the model makes, send the results
    back, until the model answers in text. Each turn is well formed, the tool results reach the model, and the loop
    ends with an answer (after at most three rounds of calls, the last turn says "none", as agents do at a limit)."""
    messages = ask("Use the get_weather function for Paris.")
    rounds = 0
    while True:
        choice = openai_client.chat.completions.create(
            model=model_id, messages=messages, tools=TOOLS, temperature=0, max_tokens=80, parallel_tool_calls=False,
            tool_choice="auto" if rounds < 3 else "none").choices[0]
        if not choice.message.tool_calls:
            break
        rounds += 1
        assert choice.finish_reason == "tool_calls"
        assert valid_calls([(c.function.name, c.function.arguments) for c in choice.message.tool_calls])
        messages.append(choice.message.model_dump(exclude_none=True))
        for call in choice.message.tool_calls:
            city = json.loads(call.function.arguments)["city"]
            messages.append({"role": "tool", "tool_call_id": call.id, "content": f"{city}: sunny, 21 C"})
    assert choice.finish_reason in ("stop", "length") and choice.message.content


# --- logprobs ---------------------------------------------------------------------------------------------------


def test_chat_logprobs_and_top_logprobs(openai_client, model_id):
    reply = openai_client.chat.completions.create(model=model_id, messages=ask("What is 2+2?"), temperature=0,
                                                  max_tokens=12, logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert b"".join(bytes(t.bytes) for t in content).decode() == choice.message.content
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        assert token.top_logprobs[0].token == token.token  # greedy: the most likely token was chosen
        assert [t.logprob for t in token.top_logprobs] == sorted((t.logprob for t in token.top_logprobs), reverse=True)
    plain = openai_client.chat.completions.create(model=model_id, messages=ask("What is 2+2?"), temperature=0,
                                                  max_tokens=12)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == choice.message.content
    # Streamed, the chunks' entries add up to the same list.
    streamed = []
    for chunk in openai_client.chat.completions.create(model=model_id, messages=ask("What is 2+2?"), temperature=0,
                                                       max_tokens=12, logprobs=True, top_logprobs=3, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content or []
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]


def test_chat_logprobs_without_alternatives(openai_client, model_id):
    reply = openai_client.chat.completions.create(model=model_id, messages=ask("Hi"), max_tokens=4, logprobs=True)
    assert all(t.top_logprobs == [] for t in reply.choices[0].logprobs.content)


def test_completion_logprobs(openai_client, model_id):
    reply = openai_client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=6,
                                             temperature=0, logprobs=2)
    choice = reply.choices[0]
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text and len(logprobs.tokens) == reply.usage.completion_tokens
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert top[token] == logprob and max(top.values()) == logprob and 2 <= len(top) <= 3


# --- n ----------------------------------------------------------------------------------------------------------


def test_n_choices_streamed_or_not(openai_client, model_id):
    kwargs = dict(model=model_id, messages=ask("Name a colour."), temperature=0.9, seed=3, max_tokens=12, n=3)
    reply = openai_client.chat.completions.create(**kwargs)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    assert all(texts) and len(set(texts)) > 1  # three samples, not one copied
    # Choice i is what the same request with seed + i answers on its own; usage counts the prompt once.
    alone = [openai_client.chat.completions.create(**{**kwargs, "n": 1, "seed": 3 + i}) for i in range(3)]
    assert [a.choices[0].message.content for a in alone] == texts
    assert reply.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert reply.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    streamed, finishes = ["", "", ""], {}
    for chunk in openai_client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert streamed == texts and set(finishes) == {0, 1, 2}


def test_n_with_structured_output_and_completions(openai_client, model_id):
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 20}}, "required": ["colour"],
              "additionalProperties": False}
    reply = openai_client.chat.completions.create(
        model=model_id, messages=ask("Name a colour as JSON."), max_tokens=40, n=2, temperature=1, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    assert len(reply.choices) == 2
    assert all(set(json.loads(c.message.content)) == {"colour"} for c in reply.choices)
    text = openai_client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=5, n=2, seed=4,
                                            temperature=1)
    assert [c.index for c in text.choices] == [0, 1] and all(c.text for c in text.choices)


SCHEMA_SAMPLE = [json.loads(line) for line in
                 (Path(__file__).resolve().parent.parent / "data" / "schemas.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("item", SCHEMA_SAMPLE, ids=[item["name"] for item in SCHEMA_SAMPLE])
def test_real_world_schemas_are_enforced_or_refused_by_name(openai_client, model_id, item):
    """The suite's sample of real-world schemas (Kubernetes and SchemaStore, from scripts/schema_corpus.py): never a
    5xx; a refusal is a 400 that says what cannot be enforced; a finished answer matches the schema."""
    import jsonschema

    try:
        reply = openai_client.chat.completions.create(
            model=model_id, messages=ask("An example, as JSON."), max_tokens=48, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": item["schema"]}})
    except openai.BadRequestError as refused:
        assert refused.body["param"] == "response_format" and "cannot be enforced: " in refused.body["message"]
        return
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length")
    if choice.finish_reason == "stop":
        jsonschema.validate(json.loads(choice.message.content), item["schema"])


def test_sdk_parse_with_field_constraints_and_nested_models(openai_client, model_id):
    """The SDK's parse() with a Pydantic model that uses Field(min_length, max_length, pattern, ge, le) and a nested
    model: the schema it sends is enforced (the old converter refused or dropped these), and the answer parses."""
    from pydantic import BaseModel, Field

    class Address(BaseModel):
        city: str = Field(min_length=1, max_length=30)
        code: str = Field(min_length=3, max_length=6, pattern=r"^[A-Z0-9]+$")

    class Person(BaseModel):
        name: str = Field(min_length=1, max_length=30)
        age: int = Field(ge=0, le=120)
        address: Address

    completion = openai_client.beta.chat.completions.parse(
        model=model_id, messages=ask("Describe a person, as JSON."), response_format=Person, temperature=0,
        max_tokens=120)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice
    person = choice.message.parsed
    assert isinstance(person, Person) and isinstance(person.address, Address)
    assert 0 <= person.age <= 120 and 3 <= len(person.address.code) <= 6 and person.address.code.isalnum()


def test_langchain_bind_tools_with_auto(live, model_id):
    """LangChain's ChatOpenAI, pointed at the service, with bind_tools(tool_choice="auto"): each answer is either
    text or calls LangChain parses into tool_calls with arguments that match the tool's schema."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    def get_weather(city: str) -> str:
        """Current weather in a city."""
        return f"{city}: sunny, 21 C"

    chat = ChatOpenAI(base_url=f"{live.url}/v1", api_key="x", model=model_id, temperature=0, max_tokens=80,
                      max_retries=0)
    bound = chat.bind_tools([get_weather], tool_choice="auto", parallel_tool_calls=False)
    messages = [HumanMessage("Use the get_weather function for Paris.")]
    reply = bound.invoke(messages)
    if reply.tool_calls:  # one at most: parallel_tool_calls=False
        (call,) = reply.tool_calls
        assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str) and call["id"]
        messages += [reply, ToolMessage(get_weather(**call["args"]), tool_call_id=call["id"])]
        reply = bound.invoke(messages)
    assert reply.tool_calls or reply.content
    streamed = list(bound.stream([HumanMessage("Say hello.")]))
    assert streamed and (any(chunk.content for chunk in streamed) or any(chunk.tool_call_chunks for chunk in streamed))
