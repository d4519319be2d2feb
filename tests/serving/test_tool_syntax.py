"""Tool calls in a chat template's own syntax (serving/tool_syntax.py): which templates have one, the lazy grammar
run by the engine's own llguidance matcher over the default model's real vocabulary, and the answer read back (whole
and as it streams)."""

import json
import re
from pathlib import Path

import pytest

from inference.engine.llama.native import load_model
from inference.engine.llama.sampling import Grammars
from inference.serving.tool_syntax import HERMES, LLAMA3, MISTRAL, NativeText, NativeTools, syntax_of
from inference.serving.tools import plan_tools

TEMPLATES = Path(__file__).parent.parent / "data" / "templates"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
           "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Time in a city.", "parameters": WEATHER}}]


@pytest.fixture(scope="module")
def vocab(model_file):
    model = load_model(model_file[0], vocab_only=True)
    return model, Grammars(model.vocab, model.n_vocab())


def matcher(vocab, grammar, text, special=()):
    """The engine's matcher for `grammar` after the model's tokens of `text` (and special token ids after it);
    None when the grammar refuses them."""
    model, grammars = vocab
    found = grammars.matcher(grammar)
    for token in model.tokenize(text.encode(), add_bos=False, special=False) + list(special):
        if not found.consume_token(token):
            return None
    return found


@pytest.mark.parametrize("name, syntax", [("hermes", HERMES), ("llama3", LLAMA3), ("mistral", MISTRAL)])
def test_each_template_shape_is_recognised(name, syntax):
    assert syntax_of((TEMPLATES / f"{name}.jinja").read_text()) is syntax


def test_templates_without_tool_syntax_have_none(model_file):
    model = load_model(model_file[0], vocab_only=True)
    assert syntax_of(model.metadata()["tokenizer.chat_template"]) is None  # the default model's: no tools
    assert syntax_of(None) is None
    assert syntax_of("{% for m in messages %}<tool_call>{{ m.content }}{% endfor %}") is None  # never reads tools


def test_hermes_auto_writes_freely_until_the_opener_then_only_a_valid_call(vocab):
    plan = plan_tools(TOOLS[:1], "auto", enforce=True, native=NativeTools(HERMES))
    assert plan.auto and plan.instruction is None and plan.sampling()["preserve"] == ()
    assert matcher(vocab, plan.grammar, "Paris is lovely. <b>Sunny</b>, no tool needed.").is_accepting()
    opened = matcher(vocab, plan.grammar, "Let me check. <tool_call>")
    assert not opened.is_accepting()
    assert opened.compute_ff_bytes().startswith(b'\n{"name": "get_weather", "arguments": {"city": "')
    assert matcher(vocab, plan.grammar, "Let me check. <tool_call>\nI think") is None
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert matcher(vocab, plan.grammar, f"Checking.\n{call}\nDone.").is_accepting()


def test_hermes_calls_are_capped_by_parallel_tool_calls(vocab):
    call = '<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>'
    one = plan_tools(TOOLS, "auto", enforce=True, parallel=False, native=NativeTools(HERMES))
    assert matcher(vocab, one.grammar, call).is_accepting()
    assert matcher(vocab, one.grammar, call + "\n<tool_call>") is None  # no second call, not even unconstrained
    many = plan_tools(TOOLS, "auto", enforce=True, native=NativeTools(HERMES))
    assert matcher(vocab, many.grammar, call + "\n" + call).is_accepting()


def test_required_starts_with_the_opener(vocab):
    plan = plan_tools(TOOLS, "required", enforce=True, native=NativeTools(HERMES))
    assert not plan.auto and plan.single is None
    assert matcher(vocab, plan.grammar, "").compute_ff_bytes() == b'<tool_call>\n{"name": "get_'
    assert matcher(vocab, plan.grammar, "Sure") is None
    named = plan_tools(TOOLS, {"type": "function", "function": {"name": "get_time"}}, enforce=True,
                       native=NativeTools(MISTRAL))
    assert matcher(vocab, named.grammar, "").compute_ff_bytes() == b'[TOOL_CALLS][{"name": "get_time", "arguments": {"city": "'


def test_llama3_answers_are_text_or_one_whole_call(vocab):
    plan = plan_tools(TOOLS, "auto", enforce=True, native=NativeTools(LLAMA3))
    assert matcher(vocab, plan.grammar, "It is sunny in Paris.").is_accepting()
    call = matcher(vocab, plan.grammar, "{")
    assert call.compute_ff_bytes() == b'"name": "get_'
    assert matcher(vocab, plan.grammar, '{"name": "get_time", "parameters": {"city": "Rome"}}').is_accepting()
    assert matcher(vocab, plan.grammar, '{"name": "get_time", "arguments"') is None  # Llama's key is "parameters"


def test_mistral_auto_lists_its_calls_after_the_opener(vocab):
    plan = plan_tools(TOOLS, "auto", enforce=True, parallel=False, native=NativeTools(MISTRAL))
    assert matcher(vocab, plan.grammar, "No call [needed].").is_accepting()
    opened = matcher(vocab, plan.grammar, "[TOOL_CALLS]")
    assert opened.compute_ff_bytes() == b'[{"name": "get_'
    done = matcher(vocab, plan.grammar, '[TOOL_CALLS][{"name": "get_time", "arguments": {"city": "Rome"}}')
    assert done.compute_ff_bytes() == b"]"  # parallel_tool_calls false: one call


def test_an_opener_that_is_a_special_token_is_matched_as_that_token(vocab):
    model, _ = vocab
    token = model.tokenize(b"<|im_start|>", add_bos=False, special=True)  # a special token this vocabulary has
    assert len(token) == 1
    plan = plan_tools(TOOLS[:1], "auto", enforce=True, native=NativeTools(HERMES, opener_token=token[0]))
    assert plan.sampling()["preserve"] == (token[0],)  # its text is shown, so the answer can be read back
    assert "<[" in plan.grammar
    opened = matcher(vocab, plan.grammar, "Let me see.", special=token)
    assert opened.compute_ff_bytes().startswith(b'\n{"name": "get_weather"')
    assert matcher(vocab, plan.grammar, "The text <tool_call> is only text here.").is_accepting()


def test_answers_are_read_back_in_each_syntax():
    ids = iter(f"id{n}" for n in range(10))

    def read(syntax, text):
        return NativeTools(syntax).read(text, lambda: next(ids))

    call = {"name": "get_time", "arguments": {"city": "Rome"}}
    content, calls = read(HERMES, f"Checking.\n<tool_call>\n{json.dumps(call)}\n</tool_call>\n"
                                  f"<tool_call>\n{json.dumps(call)}\n</tool_call>")
    assert content.strip() == "Checking." and [c["function"]["name"] for c in calls] == ["get_time", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"} and calls[0]["id"] == "id0"
    assert read(HERMES, 'Hi <tool_call>\n{"name": "get_ti') == ("Hi ", [])  # cut by max_tokens: no call
    assert read(HERMES, "Just text.") == ("Just text.", [])
    assert read(LLAMA3, ' {"name": "get_time", "parameters": {"city": "Rome"}}')[1][0]["function"]["arguments"] \
        == '{"city": "Rome"}'
    assert read(LLAMA3, "Rome is lovely.") == ("Rome is lovely.", [])
    content, calls = read(MISTRAL, f"[TOOL_CALLS]{json.dumps([call, call])}")
    assert content is None and len(calls) == 2


def stream(syntax, pieces):
    reader, out = NativeText(syntax), []
    for piece in pieces:
        out.append(reader.feed(piece))
    return out, reader


def test_streamed_text_stops_at_the_opener_and_holds_back_what_may_begin_it():
    out, reader = stream(HERMES, ["Let me", " check <to", "ol_call>\n{", '"name": "x"}'])
    assert out == ["Let me", " check ", "", ""] and reader.calling and reader.sent == len("Let me check ")
    out, reader = stream(HERMES, ["a <", "b> c"])  # "<" might have begun the opener: held, then released
    assert out == ["a ", "<b> c"] and not reader.calling
    out, _ = stream(MISTRAL, ["[", "TOOL", "_CALLS][{"])
    assert out == ["", "", ""]
    out, reader = stream(LLAMA3, [" \n", '{"name"'])
    assert out == ["", ""] and reader.calling
    out, _ = stream(LLAMA3, [" ", "Hello", " there"])
    assert out == ["", " Hello", " there"]


def test_mistral_ids_are_nine_letters_and_digits_and_history_ids_map_consistently():
    assert re.fullmatch(r"[A-Za-z0-9]{9}", MISTRAL.new_call_id())
    mapped = MISTRAL.history_id("call_0123456789abcdef01234567")
    assert re.fullmatch(r"[A-Za-z0-9]{9}", mapped) and mapped == MISTRAL.history_id("call_0123456789abcdef01234567")
    assert MISTRAL.history_id("abcDEF123") == "abcDEF123" and HERMES.history_id("call_1") == "call_1"
    assert HERMES.new_call_id().startswith("call_")
