"""Tool calls: OpenAI's `tools` + `tool_choice` become a plan, a grammar the answer must follow and how it is read
back in OpenAI's shape.

When the chat template has its own tool syntax (tool_syntax.py: Hermes/Qwen, Llama 3, Mistral), the template lists
the tools and writes the history's calls, and the grammar holds the model to its own call format (lazily for
"auto"). For a template without, the tools become an instruction in the system message and a JSON grammar
(structured.py):
- a named function (or "required" with one function): the answer is that function's arguments, a JSON object
  matching its `parameters` schema;
- "required" with several: `{"name": ..., "arguments": {...}}` for one of them;
- "auto" (OpenAI's default when tools are given): a generic envelope the model always completes validly, either
  `{"answer": "<text>"}` or `{"tool_calls": [{"name": ..., "arguments": {...}}, ...]}` (one call when
  `parallel_tool_calls` is false). The answer's text is unwrapped (streamed as it comes), the calls come back as
  OpenAI's `tool_calls`.
History turns carrying tool calls are then rendered as the envelope the model is asked to write, tool results as
user turns, which every chat template accepts.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from ..web.errors import HTTPError
from .structured import StructuredOutput, parse_response_format, shown, violation_of
from .tool_syntax import NativeText, NativeTools


ANSWER_OPEN = '{"answer": "'  # how an "auto" answer that is text begins (the grammar writes JSON compactly)
MAX_PARALLEL_CALLS = 8
FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


@dataclass(frozen=True)
class ToolPlan:
    """The functions a request may call and how its answer is read back: by the JSON plans of this module (an
    instruction and a JSON grammar), or in the chat template's own syntax (`native`, tool_syntax.py)."""

    names: tuple[str, ...]
    structured: StructuredOutput | None  # the JSON plans' grammar and the check of their answer
    instruction: str | None  # None: the chat template writes the tools into the prompt itself
    auto: bool = False  # the model chooses between answering and calling
    native: NativeTools | None = None
    grammar: str | None = None  # the template syntax's grammar (native)
    parameters: tuple[tuple[str, str], ...] = ()  # native: each function's parameters schema (JSON), for the check

    @property
    def single(self) -> str | None:
        """The one function a JSON plan's answer is the arguments of (they stream as they are generated)."""
        return self.names[0] if len(self.names) == 1 and not self.auto and self.native is None else None

    def sampling(self) -> dict[str, Any]:
        """The SamplingParams fields that carry the grammar."""
        if self.native is None:
            assert self.structured is not None
            return self.structured.sampling()
        token = self.native.opener_token
        return {"grammar": self.grammar, "response_format": None, "preserve": () if token is None else (token,)}

    def text_reader(self) -> AnswerText | NativeText | None:
        """What gives the text of an answer that may be text, as it is generated (None: it is calls only)."""
        if self.native is not None:
            return NativeText(self.native.syntax)
        return AnswerText() if self.auto else None

    def new_call_id(self) -> str:
        return self.native.syntax.new_call_id() if self.native is not None else new_call_id()

    def read(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, OpenAI tool_calls) of a finished answer."""
        if self.native is not None:
            return self.native.read(text, self.native.syntax.new_call_id)
        calls = self.calls(text)
        if self.auto and not calls:
            answer = AnswerText()
            content = answer.feed(text)
            return (content if answer.answering else None), []  # None: its calls were cut by max_tokens
        return None, calls

    def check(self, text: str, calls: list[dict[str, Any]], finish_reason: str | None) -> None:
        """The second net behind the grammar: a finished answer's calls match their functions' schemas."""
        if self.native is None:
            assert self.structured is not None
            self.structured.check(text, finish_reason)
            return
        if finish_reason != "stop":
            return
        schemas = dict(self.parameters)
        for call in calls:
            function = call["function"]
            violation = violation_of(schemas[function["name"]], function["arguments"])
            if violation is not None:
                raise HTTPError(502, "structured_output_invalid", f"the model's call of {function['name']} does not "
                                f"match its parameters' schema ({violation})")

    def calls(self, text: str) -> list[dict[str, Any]]:
        """A JSON plan's tool_calls for the model's answer (which the grammar made valid); none when it answered."""
        if self.auto:
            try:
                value = json.loads(text)
                listed = value["tool_calls"]
                return [{"id": new_call_id(), "type": "function", "function": {
                    "name": call["name"], "arguments": json.dumps(call["arguments"])}} for call in listed]
            except (ValueError, KeyError, TypeError):  # it answered, or was cut by max_tokens
                return []
        if self.single is not None:
            name, arguments = self.single, text
        else:
            try:
                value = json.loads(text)
                name, arguments = value["name"], json.dumps(value["arguments"])
            except (ValueError, KeyError, TypeError):  # cut by max_tokens: what there is
                name, arguments = "", text
        return [{"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}]


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def plan_tools(tools: Any, tool_choice: Any, *, enforce: bool, parallel: bool = True,
               native: NativeTools | None = None) -> ToolPlan | None:
    """None when no tool is to be called; otherwise the plan; a 400 naming the field for what cannot be done.
    Without a tool_choice, tools mean "auto" (as OpenAI's). `native`: the chat template's own tool syntax, if it has
    one (the embedded engine's)."""
    named = isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and isinstance(
        (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice.get("function"), dict) else None, str)
    if tool_choice not in (None, "none", "auto", "required") and not named:
        raise _refuse("tool_choice", 'must be "none", "auto", "required" or {"type": "function", "function": '
                                     '{"name": ...}}')
    if not tools and tool_choice not in (None, "none", "auto"):
        raise _refuse("tool_choice", f"{json.dumps(tool_choice)} needs tools to choose from")
    if not tools:
        return None
    functions = _functions(tools)  # checked even when none is to be called
    if tool_choice == "none":
        return None
    auto = tool_choice in (None, "auto")
    if auto:
        chosen = list(functions)
    elif tool_choice == "required":
        chosen = list(functions)
    else:
        name = tool_choice["function"]["name"]
        if name not in functions:
            raise _refuse("tool_choice", f"names the function {name!r}, which is not among the tools")
        chosen = [name]
    if native is not None and enforce:
        return _native(functions, chosen, native, auto=auto, parallel=parallel)
    if auto:
        return _auto(functions, enforce=enforce, parallel=parallel)
    if len(chosen) == 1:
        schema = functions[chosen[0]]["parameters"]
        instruction = (f"Call the function {chosen[0]}: {functions[chosen[0]]['description']}\n"
                       f"Answer only with its arguments, a JSON object matching this schema: {shown(schema)}")
    else:
        schema = _call_schema(functions, chosen)
        instruction = ("Call one of these functions:\n" + _listing(functions) +
                       '\nAnswer only with a JSON object {"name": <function>, "arguments": {...}}.')
    return ToolPlan(tuple(chosen), _structured(schema, enforce), instruction)


def _native(functions: dict[str, dict[str, Any]], chosen: list[str], native: NativeTools, *, auto: bool,
            parallel: bool) -> ToolPlan:
    """Calls in the template's own syntax: the template lists the tools, the grammar holds the calls to it."""
    try:
        grammar = native.grammar(functions, chosen, auto=auto, max_calls=MAX_PARALLEL_CALLS if parallel else 1)
    except HTTPError as exc:
        raise _refuse("tools", exc.message.removeprefix("response_format: ")) from None
    parameters = tuple((n, json.dumps(functions[n]["parameters"], sort_keys=True)) for n in chosen)
    return ToolPlan(tuple(chosen), None, None, auto=auto, native=native, grammar=grammar, parameters=parameters)


def template_tools(tools: Any) -> str:
    """OpenAI's tool list as a chat template reads it (each function's name, description and parameters)."""
    return json.dumps([{"type": "function", "function": {"name": name, **function}}
                       for name, function in _functions(tools).items()])


def _auto(functions: dict[str, dict[str, Any]], *, enforce: bool, parallel: bool) -> ToolPlan:
    names = list(functions)
    schema = {"anyOf": [
        {"type": "object", "additionalProperties": False, "required": ["answer"],
         "properties": {"answer": {"type": "string"}}},
        {"type": "object", "additionalProperties": False, "required": ["tool_calls"],
         "properties": {"tool_calls": {"type": "array", "minItems": 1, "maxItems": MAX_PARALLEL_CALLS if parallel else 1,
                                       "items": _call_schema(functions, names)}}}]}
    instruction = ("You can call these functions:\n" + _listing(functions) +
                   '\nTo call, answer only with a JSON object {"tool_calls": [{"name": <function>, "arguments": '
                   '{...}}]}' + (" (one or more calls)" if parallel else " (one call)") +
                   '. Otherwise answer the user with a JSON object {"answer": "<your reply>"}.')
    return ToolPlan(tuple(names), _structured(schema, enforce), instruction, auto=True)


def _call_schema(functions: dict[str, dict[str, Any]], names: list[str]) -> dict[str, Any]:
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": n}, "arguments": functions[n]["parameters"]}} for n in names]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def _listing(functions: dict[str, dict[str, Any]]) -> str:
    return "\n".join(f"- {n}: {f['description']} Arguments: {shown(f['parameters'])}"
                     for n, f in functions.items())


def _structured(schema: dict[str, Any], enforce: bool) -> StructuredOutput:
    try:
        structured = parse_response_format(
            {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema}}, enforce=enforce)
    except HTTPError as exc:
        raise _refuse("tools", exc.message.removeprefix("response_format: ")) from None
    assert structured is not None
    return structured


def _functions(tools: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(tools, list):
        raise _refuse("tools", "must be a list of {\"type\": \"function\", \"function\": {...}}")
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise _refuse("tools", f'[{i}] must be {{"type": "function", "function": {{"name": ..., ...}}}}')
        if not FUNCTION_NAME.fullmatch(function["name"]):
            raise _refuse("tools", f"[{i}].function.name must be 1 to 64 letters, digits, _ or - (as OpenAI's)")
        parameters = function.get("parameters", {"type": "object"})
        if not isinstance(parameters, dict):
            raise _refuse("tools", f"[{i}].function.parameters must be a JSON schema object")
        if not isinstance(function.get("description", ""), str):
            raise _refuse("tools", f"[{i}].function.description must be a string")
        if not isinstance(function.get("strict", False), (bool, type(None))):
            raise _refuse("tools", f"[{i}].function.strict must be true, false or null")
        functions[function["name"]] = {"description": str(function.get("description") or ""),
                                       "parameters": parameters or {"type": "object"}}
    return functions


def render_history(message: dict[str, Any]) -> tuple[str, str] | None:
    """(role, content) for history turns with tool calls or tool results; None for ordinary ones. Calls are
    rendered as the envelope an "auto" answer writes, so the model sees its own format."""
    if message.get("role") == "tool":
        return "user", f"Result of the tool call {message.get('tool_call_id') or ''}: {message.get('content') or ''}"
    calls = message.get("tool_calls")
    if message.get("role") == "assistant" and calls:
        rendered = [{"name": (c.get("function") or {}).get("name"),
                     "arguments": _parsed((c.get("function") or {}).get("arguments"))} for c in calls if isinstance(c, dict)]
        return "assistant", json.dumps({"tool_calls": rendered})
    return None


def _parsed(arguments: Any) -> Any:
    try:
        return json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        return arguments


def _refuse(field: str, why: str) -> HTTPError:
    return HTTPError(422, "validation_error", f"{field}: {why}", field=field)


class AnswerText:
    """An "auto" answer's text as it is generated: fed the raw pieces (the envelope's JSON), it gives the text decoded
    so far that was not given before; nothing when the answer turns out to be calls."""

    __slots__ = ("raw", "sent", "answering")

    def __init__(self) -> None:
        self.raw = ""
        self.sent = 0
        self.answering: bool | None = None  # None until the opening says whether it answers or calls

    def feed(self, piece: str) -> str:
        self.raw += piece
        if self.answering is None:
            if self.raw.startswith(ANSWER_OPEN):
                self.answering = True
            elif not ANSWER_OPEN.startswith(self.raw):
                self.answering = False
        if not self.answering:
            return ""
        text = _decoded_prefix(self.raw[len(ANSWER_OPEN):])
        new, self.sent = text[self.sent:], len(text)
        return new


def _decoded_prefix(body: str) -> str:
    """The text of a JSON string's body as far as it is complete: up to its closing quote, short of an escape that is
    cut off, and short of a high surrogate whose pair has not come yet."""
    end, i = len(body), 0
    while i < len(body):
        char = body[i]
        if char == '"':
            end = i
            break
        if char == "\\":
            size = 6 if body[i + 1:i + 2] == "u" else 2
            if i + size > len(body):
                end = i
                break
            i += size
            continue
        i += 1
    text = json.loads('"' + body[:end] + '"')
    return text[:-1] if text and "\ud800" <= text[-1] <= "\udbff" else text
