"""Request bodies of the OpenAI-compatible API (/v1), following the OpenAI API reference.

Fields it acts on are type-checked here. OpenAI fields it does not implement are refused by name in the handlers
(endpoints/openai_api.py); metadata fields and other servers' extensions are accepted: clients send them routinely.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from .validation import spec


@dataclass(frozen=True)
class ContentPart:
    type: Literal["text"]
    text: str


@dataclass(frozen=True)
class ChatCompletionMessage:
    role: Literal["system", "developer", "user", "assistant", "tool"] = field(
        metadata=spec(description="`developer` is treated as `system`; `tool` carries a tool call's result.")
    )
    content: str | list[ContentPart] | None = field(
        default=None, metadata=spec(description="Text, or a list of text parts (joined).")
    )
    name: str | None = None
    tool_calls: Any = field(default=None, metadata=spec(description="An assistant turn's tool calls (history)."))
    tool_call_id: str | None = None


@dataclass(frozen=True)
class StreamOptions:
    include_usage: bool = False


MAX_LOGIT_BIAS = 300  # OpenAI's own limit on entries
MAX_STOP_CHARS = 500  # each stop sequence is matched against the text held back after every token
MAX_MESSAGES = 2048
SAMPLING_SCHEMA: dict[str, Any] = {"properties": {
    "logit_bias": {
        "type": "object", "nullable": True, "maxProperties": MAX_LOGIT_BIAS,
        "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
        # Token ids; the served document bounds them by the model's vocabulary once it is loaded (openapi.py).
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


@dataclass(frozen=True, kw_only=True)
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
    user: str | None = None

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


@dataclass(frozen=True, kw_only=True)
class ChatCompletionRequest(SamplingFields):
    # top_logprobs only with logprobs: true (the handler answers 400 otherwise).
    json_schema_extra: ClassVar[dict[str, Any]] = {**SAMPLING_SCHEMA, "anyOf": [
        {"not": {"required": ["top_logprobs"]}},
        {"properties": {"top_logprobs": {"enum": [None]}}},
        {"required": ["logprobs"], "properties": {"logprobs": {"enum": [True]}}},
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


@dataclass(frozen=True, kw_only=True)
class CompletionRequest(SamplingFields):
    prompt: str | list[str] = field(metadata=spec(min_items=1, max_items=1, description="One prompt."))
    logprobs: int | None = field(default=None, metadata=spec(
        ge=0, le=5, description="Return each generated token's log probability and this many most likely tokens."))
    echo: Literal[False] | None = field(default=False, metadata=spec(description="Only false is supported."))
    suffix: str | None = field(default=None, metadata=spec(max_length=0, description="Not supported: null or empty."))


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
