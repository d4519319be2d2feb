"""Request and response bodies of the native API. Requests validate with `validation.from_json`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .validation import spec


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
        metadata=spec(min_length=1, max_items=4, description="Up to 4 sequences that end generation; not returned."),
    )
    seed: int | None = field(default=None, metadata=spec(description="Makes sampling repeatable."))
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
    status: Literal["ready", "loading", "failed", "stopping"]
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
