"""Request bodies of Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens), following Anthropic's API
reference, and what becomes of each field (FIELDS) and content block (BLOCKS): used, or refused by name. Both
backends take the same fates: an upstream gets the request translated into OpenAI's chat completions (README:
Anthropic Messages API), which has no place for a field this service does not know, so none is passed on unread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ...web.validation import spec
from ..openai.schemas import Fate, field_fates

MAX_STOP_SEQUENCES = 4  # each is matched against the text held back after every token
CACHE_CONTROL = {"type": "object", "nullable": True, "description": "A prompt-caching hint: accepted; prompt "
                                                                  "prefixes are reused automatically here."}
TEXT_BLOCK = {"type": "object", "required": ["type", "text"], "additionalProperties": False, "properties": {
    "type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}, "cache_control": CACHE_CONTROL,
    "citations": {"nullable": True, "type": "array", "maxItems": 0}}}
DIRECT_CALLER = {"type": "object", "required": ["type"], "additionalProperties": False,
                 "properties": {"type": {"type": "string", "enum": ["direct"]}}}
TOOL_USE_BLOCK = {"type": "object", "required": ["type", "id", "name", "input"], "additionalProperties": False,
                  "properties": {
    "type": {"type": "string", "enum": ["tool_use"]}, "id": {"type": "string", "minLength": 1},
    "name": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"}, "input": {"type": "object"},
    "cache_control": CACHE_CONTROL,
    # What the SDK returns and an agent loop sends back: who made the call, and the MCP toolset of its tool.
    "caller": {"nullable": True, "description": "Only null or a direct call: the client's own tool.", **DIRECT_CALLER},
    "toolset_name": {"nullable": True, "enum": [None], "description": "Only null: MCP toolsets are not served."}}}
TOOL_RESULT_BLOCK = {"type": "object", "required": ["type", "tool_use_id"], "additionalProperties": False,
                     "properties": {
    "type": {"type": "string", "enum": ["tool_result"]}, "tool_use_id": {"type": "string", "minLength": 1},
    "content": {"nullable": True, "anyOf": [{"type": "string"}, {"type": "array", "items": TEXT_BLOCK}]},
    "is_error": {"type": "boolean", "nullable": True}, "cache_control": CACHE_CONTROL}}
SYSTEM_SCHEMA = {"nullable": True, "anyOf": [{"type": "string"}, {"type": "array", "items": TEXT_BLOCK}]}
TOOL_SCHEMA = {"type": "object", "required": ["name", "input_schema"], "additionalProperties": False, "properties": {
    "name": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"}, "description": {"type": "string", "nullable": True},
    "input_schema": {"type": "object", "description": "A JSON Schema for the input (README: structured output; a "
                                                      "keyword the grammar cannot enforce is a 400)."},
    "type": {"type": "string", "nullable": True, "enum": ["custom", None]}, "cache_control": CACHE_CONTROL,
    "strict": {"type": "boolean", "nullable": True}, "eager_input_streaming": {"type": "boolean", "nullable": True},
    "input_examples": {"type": "array", "nullable": True, "items": {"type": "object"}}}}
# The fields of a client tool and of each content block this service reads (translate.py); others are refused.
TOOL_FIELDS = set(TOOL_SCHEMA["properties"])
BLOCK_FIELDS = {
    "text": field_fates(TEXT_BLOCK),
    "tool_use": field_fates(TOOL_USE_BLOCK, {
        "caller": Fate("refused", "refused", "only a direct call (a client tool's); programmatic tool calling runs at "
                       "Anthropic", allowed=(None, {"type": "direct"})),
        "toolset_name": Fate("refused", "refused", "MCP toolsets are not served here", allowed=(None,))}),
    "tool_result": field_fates(TOOL_RESULT_BLOCK)}
TOOL_CHOICE_SCHEMA = {"nullable": True, "type": "object", "required": ["type"], "properties": {
    "type": {"type": "string", "enum": ["auto", "any", "tool", "none"]},
    "name": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"},
    "disable_parallel_tool_use": {"type": "boolean"}}, "anyOf": [
        {"properties": {"type": {"enum": ["auto", "any", "none"]}}},
        {"required": ["name"], "properties": {"type": {"enum": ["tool"]}}}]}


@dataclass(slots=True)
class AnthropicMessage:
    # A user's blocks are text and tool results, an assistant's text and tool uses.
    json_schema_extra: ClassVar[dict[str, Any]] = {"anyOf": [
        {"properties": {"role": {"enum": ["user"]}, "content": {"anyOf": [
            {"type": "string"}, {"type": "array", "minItems": 1, "items": {"anyOf": [TEXT_BLOCK, TOOL_RESULT_BLOCK]}}]}}},
        {"properties": {"role": {"enum": ["assistant"]}, "content": {"anyOf": [
            {"type": "string"}, {"type": "array", "minItems": 1, "items": {"anyOf": [TEXT_BLOCK, TOOL_USE_BLOCK]}}]}}}]}

    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]] = field(metadata=spec(
        description="Text, or content blocks: text, tool_use (an assistant's), tool_result (a user's); image and "
                    "document blocks are refused by name."))


@dataclass(kw_only=True, slots=True)
class CountTokensRequest:
    """What /v1/messages/count_tokens counts: a request's prompt, tools included."""

    json_schema_extra: ClassVar[dict[str, Any]] = {"properties": {
        "system": SYSTEM_SCHEMA, "tools": {"nullable": True, "type": "array", "items": TOOL_SCHEMA},
        "tool_choice": TOOL_CHOICE_SCHEMA, "cache_control": CACHE_CONTROL,
        "output_config": {"nullable": True, "type": "object", "properties": {
            "format": {"nullable": True, "type": "object", "required": ["type", "schema"], "properties": {
                "type": {"type": "string", "enum": ["json_schema"]}, "schema": {"type": "object"}}},
            "effort": {"nullable": True, "enum": [None]}}, "additionalProperties": False},
        "speed": {"nullable": True, "type": "string", "enum": ["standard", None]},
        "thinking": {"nullable": True, "type": "object", "required": ["type"], "additionalProperties": False,
                     "properties": {"type": {"type": "string", "enum": ["disabled"]}}},
        "inference_geo": {"nullable": True, "enum": [None]}, "workspace_id": {"nullable": True, "enum": [None]},
        "mcp_servers": {"nullable": True, "type": "array", "maxItems": 0}},
        "allOf": [{"anyOf": [  # "any" or a named tool needs tools
            {"not": {"required": ["tool_choice"]}},
            {"properties": {"tool_choice": {"nullable": True, "properties": {"type": {"enum": ["auto", "none"]}}}}},
            {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}]},
            {"anyOf": [  # an output format, or tools to call: not both (README: Anthropic)
                {"not": {"required": ["output_config"]}},
                {"properties": {"output_config": {"nullable": True, "properties": {
                    "format": {"nullable": True, "enum": [None]}}}}},
                {"not": {"required": ["tools"]}},
                {"properties": {"tools": {"nullable": True, "type": "array", "maxItems": 0}}},
                {"required": ["tool_choice"], "properties": {"tool_choice": {"type": "object", "required": ["type"],
                                                                             "properties": {"type": {"enum": ["none"]}}}}}]}]}

    model: str = field(metadata=spec(min_length=1, description="The id listed by GET /v1/models."))
    messages: list[AnthropicMessage] = field(metadata=spec(min_items=1))
    system: str | list[dict[str, Any]] | None = field(default=None, metadata=spec(
        description="A system prompt: text, or text blocks (joined)."))
    tools: list[dict[str, Any]] | None = field(default=None, metadata=spec(
        description="Client tools {name, description, input_schema}; server tools are refused by name."))
    tool_choice: dict[str, Any] | None = field(default=None, metadata=spec(
        description='{"type": "auto" | "any" | "tool" | "none", "name", "disable_parallel_tool_use"}.'))
    cache_control: dict[str, Any] | None = field(default=None, metadata=spec(
        description="A prompt-caching hint: accepted; prompt prefixes are reused automatically here."))
    output_config: dict[str, Any] | None = field(default=None, metadata=spec(
        description='format {"type": "json_schema", "schema"}: enforced while sampling (README: structured output); '
                    "effort: only null."))
    speed: str | None = field(default=None, metadata=spec(description='Only null or "standard".'))
    user_profile_id: str | None = field(default=None, metadata=spec(
        max_length=256, description="Whom the request is for: as metadata.user_id when that is not given."))
    thinking: Any = field(default=None, metadata=spec(description='Only null or {"type": "disabled"}.'))
    mcp_servers: Any = field(default=None, metadata=spec(description="Only null or []."))
    inference_geo: str | None = field(default=None, metadata=spec(description="Only null."))
    workspace_id: str | None = field(default=None, metadata=spec(description="Only null."))


@dataclass(kw_only=True, slots=True)
class MessagesRequest(CountTokensRequest):
    json_schema_extra: ClassVar[dict[str, Any]] = {**CountTokensRequest.json_schema_extra, "properties": {
        **CountTokensRequest.json_schema_extra["properties"],
        "metadata": {"nullable": True, "type": "object", "properties": {
            "user_id": {"type": "string", "nullable": True, "maxLength": 256}}, "additionalProperties": False},
        "service_tier": {"nullable": True, "type": "string", "enum": ["auto", "standard_only", None]},
        "container": {"nullable": True, "enum": [None]},
        "context_management": {"nullable": True, "enum": [None]},
        "diagnostics": {"nullable": True, "enum": [None]}}}

    max_tokens: int = field(metadata=spec(ge=1, description="Most tokens to generate."))
    stop_sequences: list[str] | None = field(default=None, metadata=spec(
        min_length=1, max_length=500, max_items=MAX_STOP_SEQUENCES,
        description=f"Up to {MAX_STOP_SEQUENCES} sequences of at most 500 characters."))
    temperature: float | None = field(default=None, metadata=spec(ge=0, le=1, description="Default 1."))
    top_p: float | None = field(default=None, metadata=spec(gt=0, le=1))
    top_k: int | None = field(default=None, metadata=spec(ge=1, le=1000))
    stream: bool | None = False
    metadata: dict[str, Any] | None = field(default=None, metadata=spec(
        description="user_id: the end user, in the request log and on the server span."))
    service_tier: str | None = field(default=None, metadata=spec(
        description='"auto" or "standard_only": there is one tier.'))
    container: Any = field(default=None, metadata=spec(description="Only null."))
    context_management: Any = field(default=None, metadata=spec(description="Only null."))
    diagnostics: Any = field(default=None, metadata=spec(description="Only null."))


def _used(names: str) -> dict[str, Fate]:
    return {name: Fate("used", "used") for name in names.split()}


_NO_TOOLS_HERE = "server tools run at Anthropic; this service runs client tools only"
FIELDS: dict[str, dict[str, Fate]] = {
    "messages": {
        **_used("model max_tokens messages system stop_sequences temperature top_p top_k stream tools tool_choice"),
        "metadata": Fate("used", "used", "`user_id`: the request log's `user` and the server span's `user.id`"),
        "user_profile_id": Fate("used", "used", "as `metadata.user_id` when that is not given"),
        "cache_control": Fate("used", "used", "a hint: prompt prefixes are reused automatically, marked or not"),
        "output_config": Fate("used", "used", "`format` (json_schema) is enforced while sampling, as OpenAI's "
                              "response_format; `effort` is refused unless null (this model does not reason)"),
        "speed": Fate("refused", "refused", "there is one speed here", allowed=(None, "standard")),
        "inference_geo": Fate("refused", "refused", "inference runs where this service runs", allowed=(None,)),
        "workspace_id": Fate("refused", "refused", "there are no workspaces here", allowed=(None,)),
        "diagnostics": Fate("refused", "refused", "prompt-cache diagnostics are not reported", allowed=(None,)),
        "thinking": Fate("refused", "refused", "extended thinking is not supported",
                         allowed=(None, {"type": "disabled"})),
        "service_tier": Fate("refused", "refused", "there is one service tier here",
                             allowed=(None, "auto", "standard_only")),
        "container": Fate("refused", "refused", "code-execution containers are not supported", allowed=(None,)),
        "mcp_servers": Fate("refused", "refused", "MCP connectors are not supported", allowed=(None, [])),
        "context_management": Fate("refused", "refused", "context editing is not supported", allowed=(None,)),
    },
    # Content blocks, by type: what each becomes (translate.py says how).
    "block": {
        **_used("text tool_use tool_result"),
        "image": Fate("refused", "refused", "this service reads text only", allowed=()),
        "document": Fate("refused", "refused", "this service reads text only", allowed=()),
        "search_result": Fate("refused", "refused", "search results are not supported", allowed=()),
        "thinking": Fate("refused", "refused", "this model does not think", allowed=()),
        "redacted_thinking": Fate("refused", "refused", "this model does not think", allowed=()),
        "server_tool_use": Fate("refused", "refused", _NO_TOOLS_HERE, allowed=()),
        **{kind: Fate("refused", "refused", _NO_TOOLS_HERE, allowed=()) for kind in (
            "web_search_tool_result web_fetch_tool_result code_execution_tool_result "
            "bash_code_execution_tool_result text_editor_code_execution_tool_result tool_search_tool_result").split()},
        "container_upload": Fate("refused", "refused", "code-execution containers are not supported", allowed=()),
    },
}
FIELDS["count_tokens"] = {name: FIELDS["messages"][name]
                          for name in ("model messages system tools tool_choice thinking mcp_servers cache_control "
                                       "output_config speed user_profile_id inference_geo workspace_id").split()}


# Response shapes, for the OpenAPI document (handlers build the dicts directly).


@dataclass(frozen=True)
class AnthropicUsage:
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class AnthropicMessageResponse:
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[dict[str, Any]] = field(metadata=spec(description="text and tool_use blocks"))
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]
    stop_sequence: str | None
    usage: AnthropicUsage


@dataclass(frozen=True)
class TokenCount:
    input_tokens: int


@dataclass(frozen=True)
class AnthropicErrorBody:
    type: str
    message: str


@dataclass(frozen=True)
class AnthropicError:
    type: Literal["error"]
    error: AnthropicErrorBody
    request_id: str | None = None
