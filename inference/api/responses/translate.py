"""Responses requests into the engine's terms, through OpenAI's chat: parse (the fates of fields, input items, parts
and tools, then the schema; a 4xx names the Responses field), then the OpenAI chat request the conversation means
(instructions, the stored history and this input as messages, function calls and their outputs as tool calls and
tool results, tools, tool_choice, text.format), which openai/translate.py makes a GenerationRequest, as for
/v1/chat/completions: one pipeline, one set of rules for tools and grammars."""

from __future__ import annotations

import dataclasses
import json
import secrets
from typing import Any, Mapping

from ...config import Settings
from ...serving.tool_syntax import NativeTools
from ...serving.tools import FUNCTION_NAME
from ...web.errors import HTTPError
from ...web.validation import from_json
from ..openai.schemas import Fate
from ..openai.translate import Translated, fields_fate, parse_chat, translate_chat, typed_fate
from .schemas import FIELDS, ITEM_FIELDS, MAX_ITEMS, PART_FIELDS, TOOL_FIELDS, ResponsesRequest

# OpenAI chat's field names in a refusal from the shared translation, as this request named them.
FIELD_NAMES = {"response_format": "text.format", "max_tokens": "max_output_tokens", "messages": "input",
               "tools": "tools", "tool_choice": "tool_choice", "stop": "stop", "ignore_eos": "ignore_eos"}
# ... and the places inside them: a format's schema is at its top level, a tool's fields are not under "function".
PLACE_NAMES = (('"json_schema.', '"'), ("].function.", "]."))
UNKNOWN = Fate("refused", "refused", "not a field this server knows (README: Responses fields)", allowed=())
ITEM_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}
Overrides = Mapping[str, Mapping[str, Any]]


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def parse(raw: Any, overrides: Overrides) -> ResponsesRequest:
    """The request: a field, item, part or tool this service cannot honour is a 400 naming it, an unknown field a
    400 too, a wrong one a 400 saying which and why."""
    fields_fate(raw, FIELDS["responses"], embedded=True, unknown=UNKNOWN)
    body = from_json(ResponsesRequest, raw, overrides=overrides)
    if isinstance(body.input, list):
        if not body.input:
            raise _invalid("input", "must be text or at least one item")
        if len(body.input) > MAX_ITEMS:
            raise _invalid("input", f"must have at most {MAX_ITEMS} items")
        for i, item in enumerate(body.input):
            _check_item(item, f"input[{i}]")
    for i, tool in enumerate(body.tools or ()):
        _check_tool(tool, f"tools[{i}]")
    for key, value in (body.metadata or {}).items():
        if len(body.metadata or {}) > 16 or len(key) > 64 or not isinstance(value, str) or len(value) > 512:
            raise _invalid("metadata", "at most 16 pairs of a key (up to 64 characters) and a string (up to 512)")
    choice = body.tool_choice
    if not (choice is None or choice in ("none", "auto", "required") or isinstance(choice, dict) and choice.get(
            "type") == "function" and isinstance(choice.get("name"), str) and FUNCTION_NAME.fullmatch(choice["name"])
            and set(choice) <= {"type", "name"}):
        kind = choice.get("type") if isinstance(choice, dict) else None
        if isinstance(kind, str) and kind != "function":
            raise HTTPError(400, "unsupported_parameter", f'tool_choice: {{"type": "{kind}"}} is not supported '
                            '(only function tools run here)', field="tool_choice")
        raise _invalid("tool_choice", '"none", "auto", "required", or {"type": "function", "name": ...}')
    text = body.text or {}
    if text.get("verbosity") not in (None, "medium"):
        raise HTTPError(400, "unsupported_parameter", 'text.verbosity: only "medium" (this model cannot be told how '
                        "long to answer; use max_output_tokens)", field="text.verbosity")
    output = text.get("format")
    allowed = {"type", "name", "schema", "description", "strict"} if isinstance(output, dict) and output.get(
        "type") == "json_schema" else {"type"}
    for name in output if isinstance(output, dict) else ():
        if name not in allowed:
            raise HTTPError(400, "unsupported_parameter", f"text.format.{name}: not a field of this format",
                            field=f"text.format.{name}")
    for name in text:
        if name not in ("format", "verbosity"):
            raise HTTPError(400, "unsupported_parameter", f"text.{name}: not a field this server knows",
                            field=f"text.{name}")
    return body


def _check_item(item: Any, where: str) -> None:
    kind = typed_fate(item, FIELDS["item"], ITEM_FIELDS, where, "item",
                      default="message" if isinstance(item, dict) and "role" in item else None)
    if item.get("id") is not None and not isinstance(item["id"], str):
        raise _invalid(f"{where}.id", "must be a string")
    if kind == "message":
        if item.get("role") not in ("user", "assistant", "system", "developer"):
            raise _invalid(f"{where}.role", 'must be "user", "assistant", "system" or "developer"')
        content = item.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                _check_part(part, item["role"], f"{where}.content[{j}]")
        elif not isinstance(content, str):
            raise _invalid(f"{where}.content", "must be a string or content parts")
    elif kind == "function_call":
        if not (isinstance(item.get("call_id"), str) and item["call_id"]):
            raise _invalid(f"{where}.call_id", "must be a non-empty string")
        if not (isinstance(item.get("name"), str) and FUNCTION_NAME.fullmatch(item["name"])):
            raise _invalid(f"{where}.name", "must be 1 to 64 letters, digits, _ or -")
        if not isinstance(item.get("arguments"), str):
            raise _invalid(f"{where}.arguments", "must be a string (JSON)")
    else:
        if not (isinstance(item.get("call_id"), str) and item["call_id"]):
            raise _invalid(f"{where}.call_id", "must be a non-empty string")
        output = item.get("output")
        if isinstance(output, list):
            for j, part in enumerate(output):
                _check_part(part, "user", f"{where}.output[{j}]")
        elif not isinstance(output, str):
            raise _invalid(f"{where}.output", "must be a string or input_text parts")


def _check_part(part: Any, role: str, where: str) -> None:
    kind = typed_fate(part, FIELDS["part"], PART_FIELDS, where, "part")
    if kind != "input_text" and role != "assistant":
        raise _invalid(f"{where}.type", f"{kind} belongs in an assistant's message, not a {role}'s")
    value = part.get("refusal" if kind == "refusal" else "text")
    if not isinstance(value, str):
        raise _invalid(f"{where}.{'refusal' if kind == 'refusal' else 'text'}", "must be a string")
    if part.get("annotations"):
        raise HTTPError(400, "unsupported_parameter", f"{where}.annotations: citations are not supported",
                        field=f"{where}.annotations")


def _check_tool(tool: Any, where: str) -> None:
    typed_fate(tool, FIELDS["tool"], {"function": TOOL_FIELDS}, where, "tool")
    if tool.get("defer_loading"):
        raise HTTPError(400, "unsupported_parameter", f"{where}.defer_loading: tool search is not supported",
                        field=f"{where}.defer_loading")
    if not (isinstance(tool.get("name"), str) and FUNCTION_NAME.fullmatch(tool["name"])):
        raise _invalid(f"{where}.name", "must be 1 to 64 letters, digits, _ or -")
    if tool.get("parameters") is not None and not isinstance(tool["parameters"], dict):
        raise _invalid(f"{where}.parameters", "must be a JSON schema object")
    if tool.get("description") is not None and not isinstance(tool["description"], str):
        raise _invalid(f"{where}.description", "must be a string")
    if tool.get("strict") is not None and not isinstance(tool["strict"], bool):
        raise _invalid(f"{where}.strict", "must be true, false or null")


def _invalid(field: str, why: str) -> HTTPError:
    return HTTPError(422, "validation_error", f"{field}: {why}", field=field)


def input_items(body: ResponsesRequest) -> list[dict[str, Any]]:
    """This request's input as items, each with an id and its type spelled out (as input_items lists them)."""
    if isinstance(body.input, str):
        return [{"id": new_id("msg"), "type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": body.input}]}]
    items = []
    for item in body.input:
        kind = item.get("type", "message")
        item = {**item, "type": kind, "id": item.get("id") or new_id(ITEM_PREFIX[kind])}
        if kind == "message" and isinstance(item["content"], str):  # as OpenAI lists it: parts
            part = "output_text" if item["role"] == "assistant" else "input_text"
            item["content"] = [{"type": part, "text": item["content"]}]
        items.append(item)
    return items


def chat_request(body: ResponsesRequest, conversation: list[dict[str, Any]], first: int) -> dict[str, Any]:
    """The OpenAI chat request the conversation means. `first`: where this request's input begins in it (a
    function output must answer a call made before it, in this input or the stored history)."""
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    calls: set[str] = set()
    for i, item in enumerate(conversation):
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item["role"], "content": _text(item["content"])})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            calls.add(item["call_id"])
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)  # one assistant turn: its text, then its calls
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:  # function_call_output
            if item["call_id"] not in calls:
                where = f"input[{i - first}].call_id" if i >= first else "previous_response_id"
                raise _invalid(where, f"no function_call with call_id {json.dumps(item['call_id'])} comes before "
                                      "this output")
            output = item["output"]
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": output if isinstance(output, str) else _text(output)})
    chat: dict[str, Any] = {"model": body.model, "messages": messages, "stream": bool(body.stream)}
    for name, value in (("max_tokens", body.max_output_tokens), ("temperature", body.temperature),
                        ("top_p", body.top_p), ("parallel_tool_calls", body.parallel_tool_calls),
                        ("user", body.user or body.safety_identifier), ("stop", body.stop),
                        ("ignore_eos", body.ignore_eos)):
        if value is not None:
            chat[name] = value
    if body.tools:
        chat["tools"] = [{"type": "function", "function": {
            key: tool[key] for key in ("name", "description", "parameters", "strict") if tool.get(key) is not None}}
            for tool in body.tools]
    choice = body.tool_choice
    if choice is not None:
        chat["tool_choice"] = ({"type": "function", "function": {"name": choice["name"]}}
                               if isinstance(choice, dict) else choice)
    output = (body.text or {}).get("format")
    if output is not None:
        kind = output.get("type") if isinstance(output, dict) else None
        if kind == "json_schema":
            chat["response_format"] = {"type": "json_schema", "json_schema": {
                key: output[key] for key in ("name", "schema", "strict", "description") if key in output}}
        elif kind in ("text", "json_object"):
            chat["response_format"] = {"type": kind}
        else:
            raise _invalid("text.format.type", '"text", "json_object" or "json_schema"')
    return chat


def _text(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("refusal") if part.get("type") == "refusal" else part.get("text", "") for part in content)


def translate(body: ResponsesRequest, conversation: list[dict[str, Any]], first: int, settings: Settings,
              native: NativeTools | None) -> Translated:
    """The GenerationRequest, through the OpenAI chat request the conversation means."""
    chat = chat_request(body, conversation, first)
    try:
        openai_body, forwarded, forwarded_by_message = parse_chat(chat, settings, {})
        return translate_chat(chat, openai_body, forwarded, forwarded_by_message, settings, native)
    except HTTPError as exc:  # a refusal of the shared translation, named as this request names the field
        name = FIELD_NAMES.get(exc.field or "")
        if name is None:
            raise
        message = exc.message.replace(f"{exc.field}: ", f"{name}: ", 1)
        for chat_place, place in PLACE_NAMES:
            message = message.replace(chat_place, place)
        raise dataclasses.replace(exc, field=name, message=message) from None
