"""Tool planning and read-back (serving/tools.py), as pure functions: the envelope "auto" asks for, its calls and its
answer read back, the answer's text decoded as it streams, and history turns rendered in the model's own format."""

import json

import jsonschema
import pytest

from inference.serving.tools import AnswerText, plan_tools, render_history
from inference.web.errors import HTTPError

TOOLS = [{"type": "function", "function": {"name": n, "description": f"{n}.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}}}
    for n in ("get_weather", "get_time")]


@pytest.mark.parametrize("choice", ["auto", None])
def test_auto_is_an_envelope_of_an_answer_or_calls(choice):
    plan = plan_tools(TOOLS, choice, enforce=True)
    assert plan.auto and plan.single is None and "get_time" in plan.instruction
    schema = plan.structured.schema
    calls = {"tool_calls": [{"name": "get_time", "arguments": {"city": "Oslo"}}, {"name": "get_weather",
                                                                                   "arguments": {"city": "Rome"}}]}
    for valid in ({"answer": "Hi"}, calls):
        jsonschema.validate(valid, schema)
    for invalid in ({"answer": 1}, {"tool_calls": []}, {"tool_calls": [{"name": "nope", "arguments": {}}]},
                    {"answer": "x", "tool_calls": calls["tool_calls"]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(invalid, schema)
    read = plan.calls(json.dumps(calls, separators=(", ", ": ")))
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in read] == [
        ("get_time", {"city": "Oslo"}), ("get_weather", {"city": "Rome"})]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in read)
    assert plan.calls('{"answer": "Hi"}') == [] and AnswerText().feed('{"answer": "Hi"}') == "Hi"
    assert plan.calls('{"tool_calls": [{"name": "get_ti') == []  # cut by max_tokens: no call


def test_parallel_false_allows_one_call():
    schema = plan_tools(TOOLS, "auto", enforce=True, parallel=False).structured.schema
    one = {"name": "get_time", "arguments": {"city": "Oslo"}}
    jsonschema.validate({"tool_calls": [one]}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"tool_calls": [one, one]}, schema)


def test_none_and_no_tools_plan_nothing_and_unknown_choices_are_refused():
    assert plan_tools(TOOLS, "none", enforce=True) is None and plan_tools(None, "auto", enforce=True) is None
    with pytest.raises(HTTPError) as refused:
        plan_tools(TOOLS, "sometimes", enforce=True)
    assert refused.value.field == "tool_choice"


def test_an_answers_text_is_decoded_as_it_streams_whatever_the_pieces():
    text = 'Caf\u00e9 "au lait"\n\U0001F600 done'
    raw = '{"answer": ' + json.dumps(text, ensure_ascii=True) + "}"
    for size in (1, 2, 3, 5, 7):
        stream, out = AnswerText(), ""
        for start in range(0, len(raw), size):
            out += stream.feed(raw[start:start + size])
        assert out == text and stream.answering
    calls = AnswerText()
    assert calls.feed('{"tool_calls": [') == "" and calls.answering is False


def test_history_calls_are_rendered_as_the_envelope():
    role, content = render_history({"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"city": "Oslo"}'}}]})
    assert role == "assistant" and json.loads(content) == {
        "tool_calls": [{"name": "get_time", "arguments": {"city": "Oslo"}}]}
    assert render_history({"role": "tool", "tool_call_id": "call_1", "content": "12:00"}) == (
        "user", "Result of the tool call call_1: 12:00")
    assert render_history({"role": "user", "content": "hi"}) is None
