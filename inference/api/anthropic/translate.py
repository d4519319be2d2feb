"""Anthropic requests into the engine's terms, through OpenAI's: parse (the fates of fields and content blocks, then
the schema; a 4xx names the Anthropic field), then the OpenAI chat request the Anthropic one means (system prompt,
turns, tool_use and tool_result blocks as tool calls and results, tools and tool_choice), which openai/translate.py
makes a GenerationRequest, as for /v1/chat/completions: one pipeline, one set of rules for tools and grammars."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from typing import Any, Mapping

from ...config import Settings
from ...serving.tool_syntax import NativeTools
from ...serving.tools import FUNCTION_NAME as TOOL_NAME
from ...web.errors import HTTPError
from ...web.validation import from_json
from ..openai.schemas import Fate
from ..openai.translate import Translated, fields_fate, parse_chat, translate_chat, typed_fate
from .schemas import BLOCK_FIELDS, FIELDS, TOOL_FIELDS, AnthropicMessage, CountTokensRequest, MessagesRequest

DEFAULT_TEMPERATURE = 1.0  # Anthropic's
TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}  # "tool" names one: OpenAI's named function
# OpenAI's field names in a refusal from the shared translation, as this request named them.
FIELD_NAMES = {"response_format": "output_config.format", "stop": "stop_sequences"}
UNKNOWN = Fate("refused", "refused", "not a field this server knows (README: Anthropic fields)", allowed=())
Overrides = Mapping[str, Mapping[str, Any]]


def parse(raw: Any, schema: type, overrides: Overrides) -> Any:
    """The request as `schema` (MessagesRequest or CountTokensRequest): a field or block this service cannot
    honour is a 400 naming it, an unknown field a 400 too, a wrong one a 400 saying which and why."""
    fields_fate(raw, FIELDS["messages" if schema is MessagesRequest else "count_tokens"], embedded=True,
                unknown=UNKNOWN)
    body = from_json(schema, raw, overrides=overrides)
    for i, message in enumerate(body.messages):
        if message.content == []:
            raise _invalid(f"messages[{i}].content", "must be a string or at least one content block")
        for j, block in enumerate(message.content if isinstance(message.content, list) else ()):
            _check_block(block, message.role, f"messages[{i}].content[{j}]")
    for j, block in enumerate(body.system if isinstance(body.system, list) else ()):
        _check_block(block, "system", f"system[{j}]")
    for name, value in (body.metadata or {}).items() if isinstance(body, MessagesRequest) else ():
        if name != "user_id":
            raise HTTPError(400, "unsupported_parameter", f"metadata.{name}: not a field this server knows (only "
                            "user_id)", field=f"metadata.{name}")
        if value is not None and not (isinstance(value, str) and len(value) <= 256):
            raise _invalid("metadata.user_id", "must be a string of at most 256 characters, or null")
    choice = body.tool_choice or {}
    if "name" in choice and not (isinstance(choice["name"], str) and TOOL_NAME.fullmatch(choice["name"])):
        raise _invalid("tool_choice.name", "must be 1 to 64 letters, digits, _ or -")
    if "disable_parallel_tool_use" in choice and not isinstance(choice["disable_parallel_tool_use"], bool):
        raise _invalid("tool_choice.disable_parallel_tool_use", "must be true or false")
    config = body.output_config or {}
    if config.get("effort") is not None:
        raise HTTPError(400, "unsupported_parameter", "output_config.effort: only null (this model does not reason)",
                        field="output_config.effort")
    for name in config:
        if name not in ("format", "effort"):
            raise HTTPError(400, "unsupported_parameter", f"output_config.{name}: not a field this server knows",
                            field=f"output_config.{name}")
    return body


def _check_block(block: Any, role: str, where: str) -> None:
    kind = typed_fate(block, FIELDS["block"], BLOCK_FIELDS, where, "block")
    _check_common(block, where)
    allowed = {"text": ("user", "assistant", "system"), "tool_use": ("assistant",), "tool_result": ("user",)}[kind]
    if role not in allowed:
        raise _invalid(f"{where}.type", f"a {kind} block belongs in {' or '.join(allowed)} content, not {role}'s")
    if kind == "text" and not isinstance(block.get("text"), str):
        raise _invalid(f"{where}.text", "must be a string")
    if kind == "tool_use" and not (isinstance(block.get("id"), str) and block["id"] and isinstance(block.get("input"), dict)
                                   and isinstance(block.get("name"), str) and TOOL_NAME.fullmatch(block["name"])):
        raise _invalid(where, 'a tool_use block needs "id" (a string), "name" (1 to 64 letters, digits, _ or -) and '
                              '"input" (an object)')
    if kind == "tool_result":
        if not (isinstance(block.get("tool_use_id"), str) and block["tool_use_id"]):
            raise _invalid(f"{where}.tool_use_id", "must be a non-empty string")
        content = block.get("content")
        if not (content is None or isinstance(content, str) or isinstance(content, list) and all(
                isinstance(b, dict) and b.get("type") == "text" for b in content)):
            raise _invalid(f"{where}.content", "must be a string or text blocks")
        for k, inner in enumerate(content if isinstance(content, list) else ()):
            _check_block(inner, "user", f"{where}.content[{k}]")


def _check_common(item: dict[str, Any], where: str) -> None:
    """The optional fields blocks and tools share: a cache hint (an object), citations (none), flags (booleans)."""
    if item.get("cache_control") is not None and not isinstance(item["cache_control"], dict):
        raise _invalid(f"{where}.cache_control", "must be an object or null")
    citations = item.get("citations")
    if citations is not None and not isinstance(citations, list):
        raise _invalid(f"{where}.citations", "must be a list or null")
    if citations:
        raise HTTPError(400, "unsupported_parameter", f"{where}.citations: citations are not supported",
                        field=f"{where}.citations")
    for flag in ("is_error", "strict", "eager_input_streaming"):
        if item.get(flag) is not None and not isinstance(item[flag], bool):
            raise _invalid(f"{where}.{flag}", "must be true, false or null")
    if item.get("description") is not None and not isinstance(item["description"], str):
        raise _invalid(f"{where}.description", "must be a string")


def _invalid(field: str, why: str) -> HTTPError:
    return HTTPError(422, "validation_error", f"{field}: {why}", field=field)


def chat_request(body: CountTokensRequest) -> dict[str, Any]:
    """The OpenAI chat request `body` means."""
    messages: list[dict[str, Any]] = []
    if body.system:
        messages.append({"role": "system", "content": _text(body.system)})
    for message in body.messages:
        messages += _turns(message)
    chat: dict[str, Any] = {"model": body.model, "messages": messages}
    if body.messages[-1].role == "assistant" and not messages[-1].get("tool_calls"):  # a prefill: continued
        chat.update(continue_final_message=True, add_generation_prompt=False)
    if isinstance(body, MessagesRequest):
        chat.update(max_tokens=body.max_tokens, stream=bool(body.stream),
                    temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature)
        if body.top_p is not None:
            chat["top_p"] = body.top_p
        if body.stop_sequences:
            chat["stop"] = body.stop_sequences
        user = (body.metadata or {}).get("user_id") or body.user_profile_id
        if isinstance(user, str) and user:
            chat["user"] = user
    if body.tools:
        chat["tools"] = [_tool(tool, i) for i, tool in enumerate(body.tools)]
    output = (body.output_config or {}).get("format")
    if output is not None:
        if not isinstance(output, dict) or output.get("type") != "json_schema" or "schema" not in output:
            raise _invalid("output_config.format", 'must be {"type": "json_schema", "schema": {...}}')
        chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": output["schema"]}}
    choice = body.tool_choice
    if choice is not None:
        kind = choice.get("type") if isinstance(choice.get("type"), str) else None
        if kind == "tool":
            if not isinstance(choice.get("name"), str):
                raise _invalid("tool_choice.name", 'must name a tool with {"type": "tool"}')
            chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        elif kind in TOOL_CHOICES:
            chat["tool_choice"] = TOOL_CHOICES[kind]
        else:
            raise _invalid("tool_choice.type", 'must be "auto", "any", "tool" or "none"')
        if choice.get("disable_parallel_tool_use") is True and kind != "none":
            chat["parallel_tool_calls"] = False
    return chat


def _tool(tool: Any, index: int) -> dict[str, Any]:
    if not isinstance(tool, dict):
        raise _invalid(f"tools[{index}]", "must be an object {name, description, input_schema}")
    if tool.get("type") not in (None, "custom"):
        raise HTTPError(400, "unsupported_parameter", f"tools[{index}].type: {json.dumps(tool.get('type'))} is a "
                        "server tool; server tools run at Anthropic, this service runs client tools only",
                        field=f"tools[{index}].type")
    for name in tool:
        if name not in TOOL_FIELDS:
            raise HTTPError(400, "unsupported_parameter", f"tools[{index}].{name}: not supported here (a client "
                            f"tool has {', '.join(sorted(TOOL_FIELDS))})", field=f"tools[{index}].{name}")
    _check_common(tool, f"tools[{index}]")
    examples = tool.get("input_examples")
    if examples is not None and not (isinstance(examples, list) and all(isinstance(e, dict) for e in examples)):
        raise _invalid(f"tools[{index}].input_examples", "must be a list of objects")
    if not isinstance(tool.get("input_schema"), dict):
        raise _invalid(f"tools[{index}].input_schema", "is required: a JSON schema object for the tool's input")
    function = {"name": tool.get("name"), "parameters": tool["input_schema"]}
    description = tool.get("description") or ""
    if tool.get("input_examples"):  # shown to the model with the description, as Anthropic shows them
        description += "\nExamples of input: " + "; ".join(json.dumps(e) for e in tool["input_examples"])
    if description:
        function["description"] = description
    return {"type": "function", "function": function}


def _turns(message: AnthropicMessage) -> list[dict[str, Any]]:
    """One Anthropic turn as OpenAI's: an assistant's text and tool_use blocks are one message with tool_calls; a
    user's tool_result blocks are `tool` messages (first, as their calls came last), its text a user message."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    text = "".join(b["text"] for b in message.content if b.get("type") == "text")
    if message.role == "assistant":
        calls = [{"id": b["id"], "type": "function", "function": {"name": b["name"], "arguments": json.dumps(b["input"])}}
                 for b in message.content if b.get("type") == "tool_use"]
        return [{"role": "assistant", "content": text or None, **({"tool_calls": calls} if calls else {})}]
    turns: list[dict[str, Any]] = [
        {"role": "tool", "tool_call_id": b["tool_use_id"],
         "content": ("Error: " if b.get("is_error") else "") + _text(b.get("content") or "")}
        for b in message.content if b.get("type") == "tool_result"]
    if text or not turns:
        turns.append({"role": "user", "content": text})
    return turns


def _text(content: str | list[dict[str, Any]]) -> str:
    return content if isinstance(content, str) else "\n".join(b["text"] for b in content)


def translate(body: CountTokensRequest, settings: Settings, native: NativeTools | None) -> Translated:
    """The GenerationRequest, through the OpenAI chat request the Anthropic one means."""
    chat = chat_request(body)
    try:
        openai_body, forwarded, forwarded_by_message = parse_chat(chat, settings, {})
        translated = translate_chat(chat, openai_body, forwarded, forwarded_by_message, settings, native)
    except HTTPError as exc:  # a refusal of the shared translation, named as this request names the field
        name = FIELD_NAMES.get(exc.field or "")
        if name is None:
            raise
        raise dataclasses.replace(exc, field=name, message=exc.message.replace(f"{exc.field}: ", f"{name}: ", 1)
                                  ) from None
    if isinstance(body, MessagesRequest) and body.top_k is not None:
        params = replace(translated.generation.params, top_k=body.top_k)
        translated = replace(translated, generation=replace(translated.generation, params=params))
    return translated
