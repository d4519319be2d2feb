"""Request bodies of the OpenAI-compatible API (/v1), following the OpenAI API reference, and what becomes of each
of their fields (FIELDS): used here, forwarded to an upstream, or refused by name. Nothing is silently ignored:
a field this server does not know is refused with the embedded engine and forwarded as it came to an upstream,
which knows its own extensions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ...web.validation import spec


# Request bodies are plain slotted dataclasses, not frozen ones: each is built once per request by validation and
# never shared, and a frozen one sets every field through object.__setattr__ (a chat request's 46 fields took
# 9.6 us to build frozen, 1.3 us like this).
@dataclass(slots=True)
class ContentPart:
    type: Literal["text"]
    text: str


@dataclass(slots=True)
class ChatCompletionMessage:
    role: Literal["system", "developer", "user", "assistant", "tool"] = field(
        metadata=spec(description="`developer` is treated as `system`; `tool` carries a tool call's result.")
    )
    content: str | list[ContentPart] | None = field(
        default=None, metadata=spec(description="Text, or a list of text parts (joined).")
    )
    name: str | None = field(default=None, metadata=spec(
        max_length=256, description="The participant's name (embedded engine: written before the content)."))
    tool_calls: list[dict[str, Any]] | None = field(default=None, metadata=spec(
        description="An assistant turn's tool calls (history)."))
    tool_call_id: str | None = None
    refusal: str | None = field(default=None, metadata=spec(
        description="An assistant turn's refusal (history): its text when it has no content."))
    # Fields of OpenAI's (or other servers') messages that the embedded engine cannot honour: only the values that
    # ask for nothing (FIELDS["message"]; through an upstream the last three go as they came).
    audio: Any = field(default=None, metadata=spec(description="Only null: text only."))
    function_call: Any = field(default=None, metadata=spec(description="Only null: use tool_calls."))
    annotations: Any = field(default=None, metadata=spec(description="Embedded engine: null or empty."))
    reasoning_content: str | None = field(default=None, metadata=spec(
        description="Embedded engine: null or empty (the model does not reason)."))
    reasoning: str | None = field(default=None, metadata=spec(description="As reasoning_content."))

    json_schema_extra: ClassVar[dict[str, Any]] = {"properties": {
        "audio": {"nullable": True, "enum": [None]},
        "function_call": {"nullable": True, "enum": [None]},
        "annotations": {"nullable": True, "type": "array", "maxItems": 0},
        "reasoning_content": {"maxLength": 0},
        "reasoning": {"maxLength": 0},
    }}


@dataclass(slots=True)
class StreamOptions:
    include_usage: bool = False
    continuous_usage_stats: bool = field(default=False, metadata=spec(
        description="Extension (vLLM): with include_usage, every chunk carries the usage so far."))


MAX_LOGIT_BIAS = 300  # OpenAI's own limit on entries
MAX_STOP_CHARS = 500  # each stop sequence is matched against the text held back after every token
MAX_MESSAGES = 2048
SAMPLING_SCHEMA: dict[str, Any] = {"properties": {
    "logit_bias": {
        "type": "object", "nullable": True, "maxProperties": MAX_LOGIT_BIAS,
        "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
        # Token ids; the served document bounds them by the model's vocabulary once it is loaded (web/openapi.py).
        "propertyNames": {"pattern": "^[0-9]+$"}},
    "response_format": {"nullable": True, "oneOf": [
        {"type": "object", "properties": {"type": {"type": "string", "enum": ["text", "json_object"]}},
         "required": ["type"]},
        {"type": "object", "required": ["type", "json_schema"], "properties": {
            "type": {"type": "string", "enum": ["json_schema"]},
            "json_schema": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string", "minLength": 1}, "description": {"type": "string"},
                "schema": {"type": "object", "description": "A JSON Schema; a keyword the grammar cannot enforce "
                                                            "is a 400 naming it (README: structured output)."},
                "strict": {"type": "boolean", "nullable": True}}}}},
    ]},
}}


TOOL_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["type", "function"], "properties": {
        "type": {"type": "string", "enum": ["function"]},
        "function": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"},
            "description": {"type": "string"},
            "parameters": {"type": "object", "description": "A JSON Schema for the arguments (README: structured "
                                                            "output; a keyword the grammar cannot enforce is a 400)."},
            "strict": {"type": "boolean", "nullable": True}}}}}


@dataclass(kw_only=True, slots=True)
class SamplingFields:
    """The sampling fields both endpoints share."""

    json_schema_extra: ClassVar[dict[str, Any]] = SAMPLING_SCHEMA

    model: str = field(metadata=spec(min_length=1, description="The id listed by GET /v1/models."))
    max_tokens: int | None = field(default=None, metadata=spec(ge=1, description="Most tokens to generate."))
    temperature: float | None = field(default=None, metadata=spec(ge=0, le=2, description="Default 1."))
    top_p: float | None = field(default=None, metadata=spec(gt=0, le=1, description="Default 1."))
    stop: str | list[str] | None = field(default=None, metadata=spec(
        min_length=1, max_length=MAX_STOP_CHARS, max_items=4, description="Up to 4 sequences of at most 500 characters."))
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = field(default=None, metadata=spec(ge=1, description="Choices to generate (default 1; at most "
                                                                     "MAX_CHOICES)."))
    frequency_penalty: float | None = field(default=None, metadata=spec(
        ge=-2, le=2, description="Penalise tokens by how often they were generated so far (default 0)."))
    presence_penalty: float | None = field(default=None, metadata=spec(
        ge=-2, le=2, description="Penalise tokens that were generated at all so far (default 0)."))
    response_format: Any = field(default=None, metadata=spec(
        description='{"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}: '
                    "enforced while sampling (README: structured output)."))
    logit_bias: Any = field(default=None, metadata=spec(
        description="An object of token id (as a string) -> bias from -100 to 100 added to that token's logit."))
    repetition_penalty: float | None = field(default=None, metadata=spec(
        gt=0, le=10, description="Extension (llama.cpp, vLLM): divide repeated tokens' logits by it (default 1)."))
    ignore_eos: bool | None = field(default=None, metadata=spec(
        description="Extension (vLLM, llama.cpp): the model's end of generation is masked, so the answer runs to "
                    "max_tokens (or a stop sequence); not with response_format or tools."))
    min_tokens: int | None = field(default=None, metadata=spec(
        ge=0, description="Extension (vLLM): no end of generation and no stop sequence before this many tokens; "
                          "not with response_format or tools."))
    user: str | None = field(default=None, metadata=spec(
        description="The end user's id: in the request log and on the server span."))

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """Usage in every chunk (vLLM's continuous_usage_stats, which needs include_usage as vLLM's does)."""
        return self.include_usage and bool(self.stream_options and self.stream_options.continuous_usage_stats)


@dataclass(kw_only=True, slots=True)
class ChatCompletionRequest(SamplingFields):
    # top_logprobs only with logprobs: true (the handler answers 400 otherwise).
    json_schema_extra: ClassVar[dict[str, Any]] = {
        "properties": {**SAMPLING_SCHEMA["properties"],
                       "tools": {"items": TOOL_SCHEMA},
                       "functions": {"nullable": True, "enum": [None]},
                       "function_call": {"nullable": True, "type": "string", "enum": ["none", None]},
                       "audio": {"nullable": True, "enum": [None]},
                       "modalities": {"nullable": True, "type": "array", "items": {"type": "string",
                                                                                     "enum": ["text"]},
                                      "minItems": 1, "maxItems": 1},
                       "prediction": {"nullable": True, "enum": [None]},
                       "web_search_options": {"nullable": True, "enum": [None]},
                       "tool_choice": {"nullable": True, "oneOf": [
                           {"type": "string", "enum": ["none", "auto", "required"]},
                           {"type": "object", "required": ["type", "function"], "properties": {
                               "type": {"type": "string", "enum": ["function"]},
                               # the name of one of the tools (a 400 otherwise); named as tools' names are
                               "function": {"type": "object", "required": ["name"], "properties": {
                                   "name": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"}}}}}]}},
        "allOf": [
            {"anyOf": [  # top_logprobs only with logprobs: true
                {"not": {"required": ["top_logprobs"]}},
                {"properties": {"top_logprobs": {"enum": [None]}}},
                {"required": ["logprobs"], "properties": {"logprobs": {"enum": [True]}}}]},
            {"anyOf": [  # "required" or a named function needs tools
                {"not": {"required": ["tool_choice"]}},
                {"properties": {"tool_choice": {"enum": [None, "none", "auto"]}}},
                {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}]},
            {"anyOf": [  # a response format, or tools to call: not both
                {"not": {"required": ["response_format"]}},
                {"properties": {"response_format": {"enum": [None]}}},
                {"properties": {"response_format": {"properties": {"type": {"enum": ["text"]}}}}},
                {"not": {"required": ["tools"]}},
                {"properties": {"tools": {"nullable": True, "type": "array", "maxItems": 0}}},
                {"properties": {"tool_choice": {"enum": ["none"]}}, "required": ["tool_choice"]}]},
        ]}
    # The most messages is checked by the handler, not stated as maxItems: that many never fit a context anyway, and
    # a schema bound would make the fuzzer send exactly that many, a request no model could take.
    messages: list[ChatCompletionMessage] = field(metadata=spec(
        min_items=1, description=f"At most {MAX_MESSAGES}, within the model's context."))
    max_completion_tokens: int | None = field(default=None, metadata=spec(ge=1, description="Wins over max_tokens."))
    logprobs: bool | None = field(default=None, metadata=spec(
        description="Return each generated token's log probability (choices[].logprobs.content)."))
    top_logprobs: int | None = field(default=None, metadata=spec(
        ge=0, le=20, description="With logprobs: also the most likely tokens at each position, this many."))
    tools: list[Any] | None = field(default=None, metadata=spec(description="Function tools (README: tool calls)."))
    tool_choice: Any = field(default=None, metadata=spec(
        description='"auto" (the default with tools), "none", "required", or {"type": "function", "function": '
                    '{"name": ...}}.'))
    parallel_tool_calls: bool | None = field(default=None, metadata=spec(
        description='With "auto": whether an answer may call several functions (default true).'))
    safety_identifier: str | None = field(default=None, metadata=spec(
        max_length=256, description="The end user's id (OpenAI's successor to `user`): as `user`."))
    continue_final_message: bool | None = field(default=None, metadata=spec(
        description="Extension (vLLM): the last message is the assistant's answer begun; the answer continues it."))
    add_generation_prompt: bool | None = field(default=None, metadata=spec(
        description="Extension (vLLM): false only with continue_final_message (the default, true, otherwise)."))
    prompt_cache_key: str | None = field(default=None, metadata=spec(
        max_length=256, description="A caching hint: on the server span; prefix reuse here is automatic."))
    metadata: dict[str, str] | None = field(default=None, metadata=spec(
        max_items=16, max_length=512, description="Up to 16 string pairs: on the server span as inference.metadata.<key>."))
    store: bool | None = field(default=None, metadata=spec(description="Only false: completions are not stored."))
    service_tier: str | None = field(default=None, metadata=spec(
        description='"auto" or "default": there is one tier (others are refused).'))
    reasoning_effort: str | None = field(default=None, metadata=spec(
        description='Embedded engine: only "none" (the model does not reason); an upstream gets it as sent.'))
    verbosity: str | None = field(default=None, metadata=spec(
        description="Refused by the embedded engine (use max_tokens); an upstream gets it as sent."))
    # OpenAI's fields this service cannot honour at all: only the values that ask for nothing (FIELDS["chat"]).
    functions: Any = field(default=None, metadata=spec(description="Only null: use tools."))
    function_call: Any = field(default=None, metadata=spec(description='Only null or "none": use tool_choice.'))
    audio: Any = field(default=None, metadata=spec(description="Only null: text only."))
    modalities: Any = field(default=None, metadata=spec(description='Only null or ["text"].'))
    prediction: Any = field(default=None, metadata=spec(description="Only null."))
    web_search_options: Any = field(default=None, metadata=spec(description="Only null."))


@dataclass(kw_only=True, slots=True)
class CompletionRequest(SamplingFields):
    prompt: str | list[str] = field(metadata=spec(min_items=1, max_items=1, description="One prompt."))
    logprobs: int | None = field(default=None, metadata=spec(
        ge=0, le=5, description="Return each generated token's log probability and this many most likely tokens."))
    echo: Literal[False] | None = field(default=False, metadata=spec(description="Only false is supported."))
    suffix: str | None = field(default=None, metadata=spec(max_length=0, description="Not supported: null or empty."))
    best_of: int | None = field(default=None, metadata=spec(ge=1, le=1, description="Only 1."))


NOTHING_ASKED = (None, False, 0, "", (), [], {})


@dataclass(frozen=True)
class Fate:
    """What becomes of a request field: with the embedded engine ("used" or "refused") and through an upstream
    ("used": translated by this service; "forwarded": sent as it came; "refused"). A refused field is a 400
    naming it unless its value is one of `allowed`, which ask for nothing (`store: false`, `audio: null`)."""

    embedded: Literal["used", "refused"]
    gateway: Literal["used", "forwarded", "refused"]
    why: str = ""  # what it does, or why it is refused
    allowed: tuple[Any, ...] = NOTHING_ASKED

    def asks(self, value: Any) -> bool:
        return value not in self.allowed


USED = Fate("used", "used")


def field_fates(schema: dict[str, Any], quiet: dict[str, Fate] | None = None) -> dict[str, Fate]:
    """The fates of the fields of a typed object (a content block, an input item, a tool), read from its JSON
    schema's properties: each is used (read, or accepted as it is), unless `quiet` says it is accepted only with a
    value that asks for nothing (a tool call's `caller` when it is a direct one)."""
    fates = {name: USED for name in schema["properties"]}
    assert set(quiet or {}) <= set(fates), "a quiet field must be in the schema too"
    return {**fates, **(quiet or {})}


def _fates(used: str, **special: Fate) -> dict[str, Fate]:
    return {**{name: Fate("used", "used") for name in used.split()}, **special}


_RECORDED = "recorded: the request log's `user` and the server span's `user.id`"
SAMPLING_FATES = _fates(
    "model max_tokens temperature top_p stop seed stream stream_options n frequency_penalty presence_penalty "
    "response_format logit_bias repetition_penalty ignore_eos min_tokens",
    user=Fate("used", "forwarded", _RECORDED),
)
FIELDS: dict[str, dict[str, Fate]] = {
    "chat": {
        **SAMPLING_FATES,
        **_fates("messages max_completion_tokens logprobs top_logprobs tools tool_choice"),
        "parallel_tool_calls": Fate("used", "forwarded", 'with "auto", false allows one call per answer, true (the '
                                    "default) up to 8; \"required\" and a named function make one call"),
        "safety_identifier": Fate("used", "forwarded", _RECORDED + " (`user` wins when both are sent)"),
        "continue_final_message": Fate("used", "forwarded", "the last message must be the assistant's: the answer "
                                       "continues its text (the `content` returned is the continuation)"),
        "add_generation_prompt": Fate("used", "forwarded", "false with continue_final_message, true (the default) "
                                      "otherwise: any other pairing is a 400"),
        "prompt_cache_key": Fate("used", "forwarded", "on the server span (`inference.prompt_cache_key`); the "
                                 "embedded engine reuses cached prompt prefixes by their tokens, with or without it"),
        "metadata": Fate("used", "forwarded", "each pair on the server span as `inference.metadata.<key>`"),
        "store": Fate("refused", "forwarded", "completions are not stored here", allowed=(None, False)),
        "service_tier": Fate("refused", "forwarded", "there is one service tier here",
                             allowed=(None, "auto", "default")),
        "reasoning_effort": Fate("refused", "forwarded", "this model does not reason",
                                 allowed=(None, "none")),
        "verbosity": Fate("refused", "forwarded", "this model cannot be told how long to answer; use max_tokens",
                          allowed=(None,)),
        "functions": Fate("refused", "refused", "function calling (deprecated by OpenAI) is not supported; use tools",
                          allowed=(None,)),
        "function_call": Fate("refused", "refused", "function calling (deprecated by OpenAI) is not supported; use "
                              "tool_choice", allowed=(None, "none")),
        "audio": Fate("refused", "refused", "this service reads and writes text only", allowed=(None,)),
        "modalities": Fate("refused", "refused", "this service writes text only",
                           allowed=(None, ["text"])),
        "prediction": Fate("refused", "refused", "predicted outputs are not supported",
                           allowed=(None,)),
        "web_search_options": Fate("refused", "refused", "web search is not supported", allowed=(None,)),
    },
    "completion": {
        **SAMPLING_FATES,
        **_fates("prompt logprobs"),
        "echo": Fate("refused", "refused", "only false is supported", allowed=(None, False)),
        "suffix": Fate("refused", "refused", "insertion is not supported", allowed=(None, "")),
        "best_of": Fate("refused", "refused", "only best_of 1 is supported", allowed=(None, 1)),
    },
    "message": {
        **_fates("role content tool_calls tool_call_id"),
        "name": Fate("used", "forwarded", "written before the content as `name: ` (chat templates have no place "
                                          "for it)"),
        "refusal": Fate("used", "forwarded", "an assistant turn's refusal is its text when it has no content"),
        "annotations": Fate("refused", "forwarded", "citations come from web search, which is not supported",
                            allowed=(None, [])),
        "audio": Fate("refused", "refused", "this service reads and writes text only", allowed=(None,)),
        "function_call": Fate("refused", "refused", "function calling (deprecated by OpenAI) is not supported; use "
                              "tool_calls", allowed=(None,)),
        "reasoning_content": Fate("refused", "forwarded", "this model does not reason", allowed=(None, "")),
        "reasoning": Fate("refused", "forwarded", "this model does not reason", allowed=(None, "")),
    },
}
UNKNOWN = Fate("refused", "forwarded", "not a field this server knows (README: OpenAI fields)", allowed=())


def refused_values(kind: str, schema: type) -> dict[str, dict[str, Any]]:
    """Validation overrides for the embedded engine: each field of `schema` it refuses (and only it: through an
    upstream it is forwarded) may only take the values that ask for nothing, so the OpenAPI document says so too.
    Fields refused by every backend say so in the schema's own json_schema_extra."""
    names = {f for f in getattr(schema, "__dataclass_fields__", {})}
    return {name: {"enum": fate.allowed} for name, fate in FIELDS[kind].items()
            if fate.embedded == "refused" and fate.gateway != "refused" and name in names}


# Response shapes, for the OpenAPI document (handlers build the dicts directly: this is the hot path).


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class ChatChoice:
    index: int
    message: dict[str, Any]
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: Any = None


@dataclass(frozen=True)
class ChatCompletion:
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str


@dataclass(frozen=True)
class CompletionChoice:
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: Any = None


@dataclass(frozen=True)
class Completion:
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str


@dataclass(frozen=True)
class Model:
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


@dataclass(frozen=True)
class ModelList:
    object: Literal["list"]
    data: list[Model]


@dataclass(frozen=True)
class OpenAIErrorBody:
    message: str
    type: str
    param: str | None
    code: str | None


@dataclass(frozen=True)
class OpenAIError:
    error: OpenAIErrorBody
