"""Request and response bodies of the native API. Requests validate with `validation.from_json`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ...web.validation import spec


@dataclass(slots=True)
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
