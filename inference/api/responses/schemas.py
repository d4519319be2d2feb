"""Request bodies of OpenAI's Responses API (/v1/responses), following OpenAI's API reference as of the installed
`openai` SDK, and what becomes of each field (FIELDS), input item type (FIELDS["item"]) and tool type
(FIELDS["tool"]): used, or refused by name. Both backends take the same fates: an upstream gets the request
translated into OpenAI's chat completions (README: OpenAI Responses API), so nothing is passed on unread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ...web.validation import spec
from ..openai.schemas import Fate, field_fates

MAX_ITEMS = 2048
SUMMARIES = (None, "auto", "concise", "detailed")  # a reasoning summary: of no reasoning, none
NAME = {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"}
INPUT_TEXT = {"type": "object", "required": ["type", "text"], "additionalProperties": False, "properties": {
    "type": {"type": "string", "enum": ["input_text"]}, "text": {"type": "string"}}}
OUTPUT_TEXT = {"type": "object", "required": ["type", "text"], "additionalProperties": False, "properties": {
    "type": {"type": "string", "enum": ["output_text"]}, "text": {"type": "string"},
    "annotations": {"type": "array", "maxItems": 0}, "logprobs": {"type": "array"}}}
REFUSAL_PART = {"type": "object", "required": ["type", "refusal"], "additionalProperties": False, "properties": {
    "type": {"type": "string", "enum": ["refusal"]}, "refusal": {"type": "string"}}}
STATUS = {"type": "string", "enum": ["in_progress", "completed", "incomplete"]}
MESSAGE_ITEM = {"type": "object", "required": ["role", "content"], "additionalProperties": False, "properties": {
    "type": {"type": "string", "enum": ["message"]}, "id": {"type": "string"},
    "role": {"type": "string", "enum": ["user", "assistant", "system", "developer"]},
    "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {
        "anyOf": [INPUT_TEXT, OUTPUT_TEXT, REFUSAL_PART]}}]},
    "status": STATUS, "phase": {"nullable": True, "enum": [None]}},
    # An assistant's parts are output_text and refusal, the others' input_text.
    "anyOf": [{"properties": {"role": {"enum": ["assistant"]}, "content": {"anyOf": [
        {"type": "string"}, {"type": "array", "items": {"anyOf": [OUTPUT_TEXT, REFUSAL_PART]}}]}}},
              {"properties": {"role": {"enum": ["user", "system", "developer"]}, "content": {"anyOf": [
                  {"type": "string"}, {"type": "array", "items": INPUT_TEXT}]}}}]}
NULLABLE_STATUS = {"nullable": True, **STATUS, "enum": [*STATUS["enum"], None]}
DIRECT_CALLER = {"nullable": True, "type": "object", "required": ["type"], "additionalProperties": False,
                 "properties": {"type": {"type": "string", "enum": ["direct"]}},
                 "description": "Only null or a direct call (the client's own function)."}
NOT_ASYNC = {"nullable": True, "enum": [False, None], "description": "Only false or null: calls are answered in turn."}
FUNCTION_CALL_ITEM = {"type": "object", "required": ["type", "call_id", "name", "arguments"],
                      "additionalProperties": False, "properties": {
    "type": {"type": "string", "enum": ["function_call"]}, "id": {"type": "string", "nullable": True},
    "call_id": {"type": "string", "minLength": 1}, "name": NAME, "arguments": {"type": "string"},
    "status": NULLABLE_STATUS, "namespace": {"nullable": True, "enum": [None]}, "caller": DIRECT_CALLER,
    # `async_` is the SDK's own name for `async`, as its model_dump() writes it.
    "async": NOT_ASYNC, "async_": NOT_ASYNC}}
FUNCTION_OUTPUT_ITEM = {"type": "object", "required": ["type", "call_id", "output"], "additionalProperties": False,
                        "properties": {
    "type": {"type": "string", "enum": ["function_call_output"]}, "id": {"type": "string", "nullable": True},
    "call_id": {"type": "string", "minLength": 1},
    "output": {"anyOf": [{"type": "string"}, {"type": "array", "items": INPUT_TEXT}]},
    "status": NULLABLE_STATUS, "caller": DIRECT_CALLER, "namespace": {"nullable": True, "enum": [None]},
    "name": {"type": "string", "nullable": True, "description": "The function's name: accepted, the call_id says it."},
    "created_by": {"type": "string", "nullable": True, "description": "Who made the item: accepted as it is."}}}
_ONLY_NULL_NAMESPACE = Fate("refused", "refused", "tool namespaces are not supported", allowed=(None,))
_DIRECT = Fate("refused", "refused", "only a direct call (a function of the client's); programmatic tool calling "
               "is not served", allowed=(None, {"type": "direct"}))
_NOT_ASYNC = Fate("refused", "refused", "asynchronous function calls are not served", allowed=(None, False))
# The fields of each input item this service knows (translate.py), and those it accepts only with a value that asks
# for nothing; others are refused by name.
ITEM_FIELDS = {
    "message": field_fates(MESSAGE_ITEM, {"phase": Fate("refused", "refused", "only null (this model does not "
                                                        "reason)", allowed=(None,))}),
    "function_call": field_fates(FUNCTION_CALL_ITEM, {"namespace": _ONLY_NULL_NAMESPACE, "caller": _DIRECT,
                                                      "async": _NOT_ASYNC, "async_": _NOT_ASYNC}),
    "function_call_output": field_fates(FUNCTION_OUTPUT_ITEM, {"namespace": _ONLY_NULL_NAMESPACE, "caller": _DIRECT}),
}
PART_FIELDS = {"input_text": field_fates(INPUT_TEXT), "output_text": field_fates(OUTPUT_TEXT),
               "refusal": field_fates(REFUSAL_PART)}
FUNCTION_TOOL = {"type": "object", "required": ["type", "name"], "additionalProperties": False, "properties": {
    "type": {"type": "string", "enum": ["function"]}, "name": NAME,
    "description": {"type": "string", "nullable": True},
    "parameters": {"type": "object", "nullable": True, "description": "A JSON Schema for the arguments (README: "
                   "structured output; a keyword the grammar cannot enforce is a 400)."},
    "strict": {"type": "boolean", "nullable": True}, "defer_loading": {"nullable": True, "enum": [None, False]}}}
TOOL_FIELDS = field_fates(FUNCTION_TOOL)
TOOL_CHOICE = {"nullable": True, "anyOf": [
    {"type": "string", "enum": ["none", "auto", "required"]},
    {"type": "object", "required": ["type", "name"], "additionalProperties": False, "properties": {
        "type": {"type": "string", "enum": ["function"]}, "name": NAME}}]}
TEXT_CONFIG = {"nullable": True, "type": "object", "additionalProperties": False, "properties": {
    "format": {"type": "object", "required": ["type"], "anyOf": [
        {"additionalProperties": False, "properties": {"type": {"enum": ["text", "json_object"]}}},
        {"required": ["name", "schema"], "additionalProperties": False, "properties": {
            "type": {"enum": ["json_schema"]}, "name": {"type": "string", "minLength": 1, "maxLength": 64},
            "schema": {"type": "object", "description": "A JSON Schema; a keyword the grammar cannot enforce is a "
                                                        "400 naming it (README: structured output)."},
            "description": {"type": "string"}, "strict": {"type": "boolean", "nullable": True}}}]},
    "verbosity": {"nullable": True, "enum": ["medium", None]}}}


@dataclass(kw_only=True, slots=True)
class ResponsesRequest:
    json_schema_extra: ClassVar[dict[str, Any]] = {
        "properties": {
            "input": {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"anyOf": [
                MESSAGE_ITEM, FUNCTION_CALL_ITEM, FUNCTION_OUTPUT_ITEM]}}]},
            "tools": {"nullable": True, "type": "array", "items": FUNCTION_TOOL}, "tool_choice": TOOL_CHOICE,
            "text": TEXT_CONFIG,
            "metadata": {"nullable": True, "type": "object", "maxProperties": 16,
                         "additionalProperties": {"type": "string", "maxLength": 512}},
            "stream_options": {"nullable": True, "type": "object", "additionalProperties": False,
                               "properties": {"include_obfuscation": {"enum": [False]}}},
            "truncation": {"nullable": True, "enum": ["disabled", None]},
            "include": {"nullable": True, "type": "array", "maxItems": 1,
                        "items": {"type": "string", "enum": ["reasoning.encrypted_content"]}},
            "reasoning": {"nullable": True, "type": "object", "additionalProperties": False, "properties": {
                "effort": {"nullable": True, "enum": ["none", None]},
                "summary": {"nullable": True, "enum": list(SUMMARIES)}}},
            "background": {"nullable": True, "enum": [False, None]},
            "service_tier": {"nullable": True, "enum": ["auto", "default", None]},
            "prompt_cache_retention": {"nullable": True, "enum": ["in_memory", None]},
            "top_logprobs": {"nullable": True, "enum": [0, None]},
            **{name: {"nullable": True, "enum": [None]} for name in (
                "conversation", "prompt", "max_tool_calls", "context_management", "moderation", "access_programs",
                "image", "background_options", "prompt_cache_options")}},
        "allOf": [
            {"anyOf": [  # "required" or a named function needs tools
                {"not": {"required": ["tool_choice"]}},
                {"properties": {"tool_choice": {"enum": [None, "none", "auto"]}}},
                {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}]},
            {"anyOf": [  # an output format, or tools to call: not both
                {"not": {"required": ["text"]}},
                {"properties": {"text": {"enum": [None]}}},
                {"properties": {"text": {"not": {"required": ["format"]}}}},
                {"properties": {"text": {"properties": {"format": {"properties": {"type": {"enum": ["text"]}}}}}}},
                {"not": {"required": ["tools"]}},
                {"properties": {"tools": {"nullable": True, "type": "array", "maxItems": 0}}},
                {"properties": {"tool_choice": {"enum": ["none"]}}, "required": ["tool_choice"]}]}]}

    model: str = field(metadata=spec(min_length=1, description="The id listed by GET /v1/models."))
    input: str | list[dict[str, Any]] = field(metadata=spec(
        description=f"Text, or up to {MAX_ITEMS} items: messages, function_call and function_call_output."))
    instructions: str | None = field(default=None, metadata=spec(
        description="The system message for this request (not carried over by previous_response_id)."))
    previous_response_id: str | None = field(default=None, metadata=spec(
        min_length=1, max_length=256, description="Continue a stored response's conversation (its input, output "
                                                  "and everything before them)."))
    store: bool | None = field(default=None, metadata=spec(
        description="Keep the response for previous_response_id, GET and input_items (default true)."))
    max_output_tokens: int | None = field(default=None, metadata=spec(ge=1, description="Most tokens to generate."))
    temperature: float | None = field(default=None, metadata=spec(ge=0, le=2, description="Default 1."))
    top_p: float | None = field(default=None, metadata=spec(gt=0, le=1, description="Default 1."))
    tools: list[dict[str, Any]] | None = field(default=None, metadata=spec(
        description="Function tools {type: function, name, description, parameters, strict}; other tool types are "
                    "refused by name."))
    tool_choice: Any = field(default=None, metadata=spec(
        description='"auto" (the default with tools), "none", "required", or {"type": "function", "name"}.'))
    parallel_tool_calls: bool | None = field(default=None, metadata=spec(
        description='With "auto": whether an answer may call several functions (default true).'))
    text: dict[str, Any] | None = field(default=None, metadata=spec(
        description='format: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "name", "schema", '
                    '"strict"}, enforced while sampling; verbosity: only "medium".'))
    stream: bool | None = False
    stream_options: dict[str, Any] | None = field(default=None, metadata=spec(
        description="include_obfuscation: only false (no padding is added to events)."))
    metadata: dict[str, str] | None = field(default=None, metadata=spec(
        description="Up to 16 string pairs: returned with the response, on the server span as "
                    "inference.metadata.<key>."))
    user: str | None = field(default=None, metadata=spec(
        max_length=256, description="The end user's id: in the request log and on the server span."))
    safety_identifier: str | None = field(default=None, metadata=spec(max_length=256, description="As `user`."))
    prompt_cache_key: str | None = field(default=None, metadata=spec(
        max_length=256, description="A caching hint: on the server span; prefix reuse here is automatic."))
    stop: str | list[str] | None = field(default=None, metadata=spec(
        min_length=1, max_length=500, max_items=4,
        description="Extension (vLLM): up to 4 stop sequences of at most 500 characters, as on chat completions."))
    ignore_eos: bool | None = field(default=None, metadata=spec(
        description="Extension (vLLM): the answer runs to max_output_tokens; not with text.format or tools."))
    # OpenAI's fields this service cannot honour: only the values that ask for nothing (FIELDS).
    truncation: str | None = field(default=None, metadata=spec(description='Only "disabled".'))
    include: list[str] | None = field(default=None, metadata=spec(
        description='Only [] or ["reasoning.encrypted_content"] (there is no reasoning to include).'))
    reasoning: dict[str, Any] | None = field(default=None, metadata=spec(
        description='effort: only null or "none" (this model does not reason); summary: accepted (of no reasoning).'))
    background: bool | None = field(default=None, metadata=spec(description="Only false."))
    service_tier: str | None = field(default=None, metadata=spec(description='"auto" or "default": one tier.'))
    prompt_cache_retention: str | None = field(default=None, metadata=spec(description='Only "in_memory".'))
    top_logprobs: int | None = field(default=None, metadata=spec(description="Only 0."))
    conversation: Any = field(default=None, metadata=spec(description="Only null: use previous_response_id."))
    prompt: Any = field(default=None, metadata=spec(description="Only null."))
    max_tool_calls: Any = field(default=None, metadata=spec(description="Only null."))
    context_management: Any = field(default=None, metadata=spec(description="Only null."))
    moderation: Any = field(default=None, metadata=spec(description="Only null."))
    access_programs: Any = field(default=None, metadata=spec(description="Only null."))
    image: Any = field(default=None, metadata=spec(description="Only null."))
    background_options: Any = field(default=None, metadata=spec(description="Only null."))
    prompt_cache_options: Any = field(default=None, metadata=spec(description="Only null."))


def _used(names: str, why: str = "") -> dict[str, Fate]:
    return {name: Fate("used", "used", why) for name in names.split()}


_RECORDED = "the request log's `user` and the server span's `user.id`"
_NOT_HERE = "only function tools are served here"
FIELDS: dict[str, dict[str, Fate]] = {
    "responses": {
        **_used("model input max_output_tokens temperature top_p tools tool_choice stream"),
        "instructions": Fate("used", "used", "the system message (not carried over by `previous_response_id`)"),
        "previous_response_id": Fate("used", "used", "the stored conversation it continues, function calls and "
                                     "their outputs included, from any replica sharing Redis"),
        "store": Fate("used", "used", "default true: kept for `RESPONSES_TTL_SECONDS` in Redis (or memory), readable "
                      "only with the API key that made it"),
        "parallel_tool_calls": Fate("used", "used", 'with "auto", false allows one call per answer'),
        "text": Fate("used", "used", "`format` json_schema / json_object enforced while sampling; `verbosity` only "
                     '"medium"'),
        "metadata": Fate("used", "used", "returned with the response; on the server span"),
        "user": Fate("used", "used", _RECORDED),
        "safety_identifier": Fate("used", "used", _RECORDED + " (`user` wins)"),
        "prompt_cache_key": Fate("used", "used", "on the server span; prompt prefixes are reused automatically"),
        "stop": Fate("used", "used", "an extension (vLLM's): up to 4 stop sequences, as on chat completions"),
        "ignore_eos": Fate("used", "used", "an extension (vLLM's): the answer runs to `max_output_tokens`; not with "
                           "`text.format` or tools"),
        "stream_options": Fate("refused", "refused", "events carry no obfuscation padding",
                               allowed=(None, {}, {"include_obfuscation": False})),
        "truncation": Fate("refused", "refused", "a conversation longer than the context is a 400, never cut",
                           allowed=(None, "disabled")),
        "include": Fate("refused", "refused", 'no extra output data (logprobs, sources) is available; only '
                        '"reasoning.encrypted_content" (there is no reasoning to include)',
                        allowed=(None, [], ["reasoning.encrypted_content"])),
        "reasoning": Fate("refused", "refused", 'this model does not reason: `effort` only null or "none" (a '
                          "`summary` of no reasoning is none)",
                          allowed=(None, *({**e, **m} for e in ({}, {"effort": None}, {"effort": "none"})
                                           for m in ({}, *({"summary": v} for v in SUMMARIES))))),
        "background": Fate("refused", "refused", "responses run while the request is open", allowed=(None, False)),
        "service_tier": Fate("refused", "refused", "there is one service tier here",
                             allowed=(None, "auto", "default")),
        "prompt_cache_retention": Fate("refused", "refused", "cached prompt prefixes live in the engine's memory",
                                       allowed=(None, "in_memory")),
        "top_logprobs": Fate("refused", "refused", "logprobs are available on /v1/chat/completions",
                             allowed=(None, 0)),
        "conversation": Fate("refused", "refused", "the Conversations API is not served; use previous_response_id",
                             allowed=(None,)),
        "prompt": Fate("refused", "refused", "stored prompt templates are not served", allowed=(None,)),
        "max_tool_calls": Fate("refused", "refused", "there are no built-in tools to limit", allowed=(None,)),
        "context_management": Fate("refused", "refused", "context compaction is not supported", allowed=(None, [])),
        "moderation": Fate("refused", "refused", "moderation is not supported", allowed=(None,)),
        "access_programs": Fate("refused", "refused", "there are no access programs here", allowed=(None,)),
        "image": Fate("refused", "refused", "this service reads and writes text only", allowed=(None,)),
        "background_options": Fate("refused", "refused", "responses run while the request is open", allowed=(None,)),
        "prompt_cache_options": Fate("refused", "refused", "prompt prefixes are reused automatically",
                                     allowed=(None,)),
    },
    # Input items, by type.
    "item": {
        **_used("message function_call function_call_output"),
        "item_reference": Fate("refused", "refused", "send the items themselves, or previous_response_id",
                               allowed=()),
        "reasoning": Fate("refused", "refused", "this model does not reason", allowed=()),
        "compaction": Fate("refused", "refused", "context compaction is not supported", allowed=()),
        "additional_tools": Fate("refused", "refused", "tools come in the request's `tools`; tools added by tool "
                                 "search are not served", allowed=()),
        **{kind: Fate("refused", "refused", "another tool's call or output: only function tools are served here",
                      allowed=()) for kind in (
            "file_search_call web_search_call computer_call computer_call_output image_generation_call "
            "code_interpreter_call local_shell_call local_shell_call_output shell_call shell_call_output "
            "apply_patch_call apply_patch_call_output mcp_list_tools mcp_approval_request mcp_approval_response "
            "mcp_call custom_tool_call custom_tool_call_output tool_search_call tool_search_output program "
            "program_output").split()},
    },
    # Parts of a message's content, by type.
    "part": {
        **_used("input_text output_text refusal"),
        **{kind: Fate("refused", "refused", "this service reads text only", allowed=())
           for kind in ("input_image", "input_file", "input_audio")},
    },
    # Tools, by type.
    "tool": {
        **_used("function"),
        **{kind: Fate("refused", "refused", _NOT_HERE, allowed=()) for kind in (
            "file_search web_search web_search_preview computer_use_preview computer mcp code_interpreter "
            "image_generation local_shell shell custom apply_patch namespace tool_search programmatic_tool_calling"
            ).split()},
    },
}


# Response shapes, for the OpenAPI document (handlers build the dicts directly).


@dataclass(frozen=True)
class ResponseUsage:
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens_details: dict[str, int]


@dataclass(frozen=True)
class ResponseObject:
    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "failed", "in_progress"]
    model: str
    output: list[dict[str, Any]] = field(metadata=spec(description="message and function_call items"))
    usage: ResponseUsage | None
    previous_response_id: str | None
    store: bool


@dataclass(frozen=True)
class DeletedResponse:
    id: str
    object: Literal["response"]
    deleted: bool


@dataclass(frozen=True)
class InputItemList:
    object: Literal["list"]
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool
