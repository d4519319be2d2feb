"""Tool calls for models whose chat template knows no tools: OpenAI's `tools` + `tool_choice` ("required" or a
named function) become an instruction to the model and a grammar its answer must follow.

With one function to call, the answer is that function's arguments (a JSON object matching its `parameters`
schema); with several ("required"), it is `{"name": ..., "arguments": {...}}` for one of them. Either way the
grammar (structured.py) guarantees a call that parses and matches, and the answer is returned in OpenAI's
`tool_calls` shape. "auto" would need the model to decide between text and a call in its own tool-call format, which
would need a parser per template family: it is refused with a 400 that says to use "required". History turns carrying tool calls and tool
results are rendered as ordinary assistant and user turns, which every chat template accepts.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from ..web.errors import HTTPError
from .structured import StructuredOutput, parse_response_format


@dataclass(frozen=True)
class ToolPlan:
    """The functions a request may call and how its answer is read back."""

    names: tuple[str, ...]
    structured: StructuredOutput
    instruction: str

    @property
    def single(self) -> str | None:
        return self.names[0] if len(self.names) == 1 else None

    def calls(self, text: str) -> list[dict[str, Any]]:
        """OpenAI's tool_calls for the model's answer (which the grammar made valid)."""
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
    return f"call_{uuid.uuid4().hex[:24]}"


def plan_tools(tools: Any, tool_choice: Any, *, enforce: bool) -> ToolPlan | None:
    """None when no tool is to be called; otherwise the plan; a 400 naming the field for what cannot be done."""
    named = isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and isinstance(
        (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice.get("function"), dict) else None, str)
    if tool_choice not in (None, "none", "auto", "required") and not named:
        raise _refuse("tool_choice", 'must be "none", "auto", "required" or {"type": "function", "function": '
                                     '{"name": ...}}')
    if not tools or tool_choice in (None, "none"):
        if tools and tool_choice is None:
            raise _refuse("tool_choice", 'with tools, say "required" or name a function: this model cannot '
                                         'choose between answering and calling ("auto")')
        return None
    functions = _functions(tools)
    if tool_choice == "auto":
        raise _refuse("tool_choice", '"auto" needs the model to choose between answering and calling in its own '
                                     'format, which the embedded engine does not parse; use "required" or name a '
                                     'function')
    if tool_choice == "required":
        chosen = list(functions)
    elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and isinstance(
            (tool_choice.get("function") or {}).get("name"), str):
        name = tool_choice["function"]["name"]
        if name not in functions:
            raise _refuse("tool_choice", f"names the function {name!r}, which is not among the tools")
        chosen = [name]
    else:
        raise _refuse("tool_choice", 'must be "none", "auto", "required" or {"type": "function", "function": '
                                     '{"name": ...}}')
    if len(chosen) == 1:
        schema = functions[chosen[0]]["parameters"]
        instruction = (f"Call the function {chosen[0]}: {functions[chosen[0]]['description']}\n"
                       f"Answer only with its arguments, a JSON object matching this schema: {json.dumps(schema)}")
    else:
        schema = {"anyOf": [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                             "properties": {"name": {"const": n}, "arguments": functions[n]["parameters"]}}
                            for n in chosen]}
        listing = "\n".join(f"- {n}: {functions[n]['description']} Arguments: {json.dumps(functions[n]['parameters'])}"
                            for n in chosen)
        instruction = ("Call one of these functions:\n" + listing +
                       '\nAnswer only with a JSON object {"name": <function>, "arguments": {...}}.')
    try:
        structured = parse_response_format(
            {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema}}, enforce=enforce)
    except HTTPError as exc:
        raise _refuse("tools", exc.message.removeprefix("response_format: ")) from None
    assert structured is not None
    return ToolPlan(tuple(chosen), structured, instruction)


def _functions(tools: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(tools, list):
        raise _refuse("tools", "must be a list of {\"type\": \"function\", \"function\": {...}}")
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise _refuse("tools", f'[{i}] must be {{"type": "function", "function": {{"name": ..., ...}}}}')
        parameters = function.get("parameters", {"type": "object"})
        if not isinstance(parameters, dict):
            raise _refuse("tools", f"[{i}].function.parameters must be a JSON schema object")
        functions[function["name"]] = {"description": str(function.get("description") or ""),
                                       "parameters": parameters or {"type": "object"}}
    return functions


def render_history(message: dict[str, Any]) -> tuple[str, str] | None:
    """(role, content) for history turns with tool calls or tool results; None for ordinary ones."""
    if message.get("role") == "tool":
        return "user", f"Result of the tool call {message.get('tool_call_id') or ''}: {message.get('content') or ''}"
    calls = message.get("tool_calls")
    if message.get("role") == "assistant" and calls:
        rendered = [{"name": (c.get("function") or {}).get("name"), "arguments": (c.get("function") or {}).get(
            "arguments")} for c in calls if isinstance(c, dict)]
        return "assistant", json.dumps(rendered)
    return None


def _refuse(field: str, why: str) -> HTTPError:
    return HTTPError(422, "validation_error", f"{field}: {why}", field=field)
