"""Tool calls through chat templates that have their own tool syntax (Hermes/Qwen, Llama 3.x, Mistral), end to end:
the default model served with each template (CHAT_TEMPLATE_FILE), the official openai SDK as the client. What the
model writes differs by CPU; what the grammar guarantees does not: a call is a valid call, text is text."""

import collections
import json
from pathlib import Path

import httpx
import jsonschema
import pytest

from conftest import InProcessServer, base_settings, own_engine
from inference.api.openai.schemas import ChatCompletionMessage
from inference.api.openai.translate import chat_messages
from inference.serving.tool_syntax import syntax_of
from inference.web.validation import from_json

TEMPLATES = Path(__file__).parent.parent / "data" / "templates"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 30}},
           "required": ["city"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city.",
                                           "parameters": WEATHER}}]
Served = collections.namedtuple("Served", "name engine client url")
OPENERS = {"hermes": "<tool_call>", "llama3": '{"name"', "mistral": "[TOOL_CALLS]"}


@pytest.fixture(scope="module", params=["hermes", "llama3", "mistral"])
def served(request, model_file):
    """The default model with the template, behind a real HTTP server."""
    import openai

    template = TEMPLATES / f"{request.param}.jinja"
    with own_engine(model_file, n_ctx=2048, max_concurrent=2, chat_template_file=template) as engine:
        from inference.app import build_app

        server = InProcessServer(build_app(base_settings(), engine=engine))
        try:
            server.wait_ready()
            with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
                yield Served(request.param, engine, client, server.url)
        finally:
            server.stop()


def ask(text):
    return [{"role": "user", "content": text}]


def assert_valid(calls):
    assert calls
    for call in calls:
        assert call.function.name == "get_weather" and call.id
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_the_template_is_recognised_and_names_the_revision(served):
    name, engine, client, url = served
    assert syntax_of(engine.chat_template()).name == name
    assert engine.info.extra["chat_template_file"].endswith(f"{name}.jinja")
    assert engine.info.revision != engine.info.sha256[:12]  # another template, another revision (cache keys)
    assert client.models.list().data[0].id == engine.info.name


def test_required_is_one_valid_call_whole_and_streamed(served):
    name, engine, client, url = served
    kwargs = dict(model=engine.info.name, messages=ask("What is the weather in Paris?"), tools=TOOLS,
                  tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=60)
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    assert_valid(choice.message.tool_calls)
    assert not (choice.message.content or "").strip()
    chunks = [c for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    deltas = [call for c in chunks for call in (c.choices[0].delta.tool_calls or ())]
    assert [d.index for d in deltas] == [0] and deltas[0].function.arguments == choice.message.tool_calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert OPENERS[name] not in "".join(c.choices[0].delta.content or "" for c in chunks)


@pytest.mark.parametrize("stream", [False, True])
def test_auto_is_text_or_valid_calls_never_a_broken_call(served, stream):
    name, engine, client, url = served
    reply = client.chat.completions.create(
        model=engine.info.name, messages=ask("What is the weather in Paris? Use the tool."), tools=TOOLS,
        temperature=0, max_tokens=80, stream=stream)
    if stream:
        chunks = [c for c in reply if c.choices]
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        calls = [call for c in chunks for call in (c.choices[0].delta.tool_calls or ())]
        finish = chunks[-1].choices[0].finish_reason
    else:
        content, calls, finish = (reply.choices[0].message.content or "", reply.choices[0].message.tool_calls or [],
                                  reply.choices[0].finish_reason)
    if finish == "tool_calls":
        assert_valid(calls)
    else:
        assert not calls and finish in ("stop", "length")
    if name != "llama3":  # Llama's call is the whole answer: its "{" may open any text
        assert OPENERS[name] not in content


def test_a_tool_loop_runs_through_the_template(served):
    """Call (required, as the first turn of an agent that must look something up), the result back, then "auto" until
    the model answers in text: the template renders the call and its result, and the loop ends."""
    name, engine, client, url = served
    messages = ask("What is the weather in Paris?")
    for rounds in range(4):
        choice = client.chat.completions.create(
            model=engine.info.name, messages=messages, tools=TOOLS, temperature=0, max_tokens=60,
            parallel_tool_calls=False, tool_choice="required" if rounds == 0 else "auto" if rounds < 3 else "none",
        ).choices[0]
        if not choice.message.tool_calls:
            break
        assert_valid(choice.message.tool_calls)
        messages.append(choice.message.model_dump(exclude_none=True))
        for call in choice.message.tool_calls:
            messages.append({"role": "tool", "tool_call_id": call.id, "content": "Paris: sunny, 21 C"})
    assert rounds >= 1 and choice.finish_reason in ("stop", "length")


def test_history_calls_and_results_are_written_by_the_template(served):
    name, engine, client, url = served
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_0123456789abcdef", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_0123456789abcdef", "content": "sunny, 21 C"}]
    parsed = [from_json(ChatCompletionMessage, m) for m in history]
    messages, _ = chat_messages(parsed, [{}] * len(parsed), base_settings(), syntax_of(engine.chat_template()))
    prompt = engine.detokenize(engine.render(messages, tools=TOOLS))
    written = {"hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
               "llama3": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
               "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "'}[name]
    assert written in prompt and "sunny, 21 C" in prompt and '"description": "The current weather' in prompt
    counted = httpx.post(f"{url}/tokenize", json={"messages": history}, timeout=30).json()["count"]
    assert counted == len(engine.render(messages))  # /tokenize counts tool turns as the chat sends them
    if name == "mistral":  # its template refuses ids other than 9 letters and digits: mapped, the same both times
        call_id = prompt.split(written)[1][:9]
        assert call_id.isalnum() and f'[TOOL_RESULTS]{{"call_id": "{call_id}"' in prompt
