"""Request and response bodies of the native API. Requests validate with `validation.from_json`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..openai.schemas import ChatCompletionMessage
from ...web.validation import spec


@dataclass(frozen=True)
class InferRequest:
    """A single prompt, answered by the model as one user message under the service's system prompt."""

    prompt: str = field(metadata=spec(min_length=1, description="The user's message.", example="What is 2+2?"))
    max_tokens: int = field(default=100, metadata=spec(ge=1, description="Most tokens to generate."))
    temperature: float = field(
        default=0.7, metadata=spec(ge=0, le=2, description="Sampling temperature; 0 always picks the likeliest token.")
    )
    top_p: float = field(default=1.0, metadata=spec(gt=0, le=1, description="Nucleus sampling probability mass."))
    stop: str | list[str] | None = field(
        default=None,
        metadata=spec(min_length=1, max_length=500, max_items=4,
                      description="Up to 4 sequences (of at most 500 characters) that end generation; not returned."),
    )
    seed: int | None = field(default=None, metadata=spec(description="Makes sampling repeatable."))
    json_schema: dict[str, Any] | None = field(default=None, metadata=spec(
        description="A JSON schema the output must match, enforced while sampling (README: structured output)."))
    stream: bool = field(
        default=False,
        metadata=spec(description="Answer with server-sent events: `token` {text}, then `done` (the response "
                                  "object) or `error` {error}."),
    )

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


@dataclass(frozen=True)
class InferResponse:
    output: str
    tokens_used: int = field(metadata=spec(description="prompt_tokens + completion_tokens"))
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"] = field(
        metadata=spec(description="stop: the model ended or a stop sequence matched; length: max_tokens reached")
    )
    model_name: str
    model_version: str
    reasoning: str | None = field(default=None, metadata=spec(
        description="An upstream reasoning model's reasoning (its reasoning_content); null otherwise."))


@dataclass(frozen=True)
class ModelResponse:
    model_name: str
    model_version: str = field(metadata=spec(description="First 12 hex digits of the GGUF file's sha256."))
    status: Literal["loading", "ready", "failed"]
    description: str
    backend: str
    context_length: int | None = None
    quantization: str | None = None
    parameters: int | None = None
    sha256: str | None = None
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HealthResponse:
    status: Literal["healthy"]


@dataclass(frozen=True)
class ReadyResponse:
    status: Literal["ready", "loading", "failed", "restarting", "stalled", "draining", "stopping"]
    reason: str | None = None
    store: Literal["memory", "up", "down"] = field(
        default="memory", metadata=spec(description="Cache and rate-limit store: in memory, or Redis up/down.")
    )


@dataclass(frozen=True)
class ServiceResponse:
    name: str
    version: str
    environment: str
    model: str | None
    links: dict[str, str]


@dataclass(frozen=True)
class ErrorDetail:
    field: str
    message: str


@dataclass(frozen=True)
class ErrorBody:
    code: str = field(metadata=spec(description="Stable machine-readable error code."))
    message: str
    field: str | None = field(default=None, metadata=spec(description="The first offending request field."))
    details: list[ErrorDetail] | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class ErrorResponse:
    error: ErrorBody


@dataclass(frozen=True)
class TokenizeRequest:
    """Text to count in the model's own tokens: `content` (llama.cpp's server), else `prompt`, else `messages`
    (vLLM's; rendered with the chat template as /v1/chat/completions would); none of them: no tokens."""

    content: str | None = None
    prompt: str | None = None
    messages: list[ChatCompletionMessage] | None = field(default=None, metadata=spec(min_items=1))
    model: str | None = field(default=None, metadata=spec(description="Accepted for vLLM's clients; not checked."))
    add_special: bool | None = field(default=None, metadata=spec(
        description="Add the beginning-of-sequence token (default: false for content, true for prompt)."))
    add_special_tokens: bool | None = field(default=None, metadata=spec(description="vLLM's name for add_special."))
    add_generation_prompt: bool = field(default=True, metadata=spec(
        description="messages: end with the assistant's cue, as a chat completion's prompt does."))
    with_pieces: bool = field(default=False, metadata=spec(description="Answer each token with its text piece."))


@dataclass(frozen=True)
class TokenPiece:
    id: int
    piece: str


@dataclass(frozen=True)
class TokenizeResponse:
    # ids, or with `with_pieces` {"id", "piece"} objects (TokenPiece), as llama.cpp's server answers
    tokens: list[Any] = field(metadata=spec(description="token ids; with with_pieces, {id, piece} objects"))
    count: int
    max_model_len: int


@dataclass(frozen=True)
class DetokenizeRequest:
    tokens: list[int] = field(metadata=spec(max_items=1_000_000))
    model: str | None = None


@dataclass(frozen=True)
class DetokenizeResponse:
    content: str
    prompt: str
