"""Service: what the handlers share, assembled by app.build_app: settings, the engine and its lifecycle (readiness),
the generator, the response cache, idempotency, stored responses, metrics and tracing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from opentelemetry.trace import Tracer

from ..config import Settings
from ..engine.base import Engine, Generation, GenerationRequest, ModelInfo, Tokenizer
from ..store.base import Store
from ..telemetry.tracing import Metrics, Tracing
from ..web.errors import HTTPError
from ..web.http import Request, Response, Scope
from ..web.identity import client_id
from ..web.state import state
from .cache import ResponseCache
from .conversations import Conversations
from .generation import Generator
from .idempotency import Idempotency
from .lifecycle import Lifecycle
from .tool_syntax import NativeTools, syntax_of


@dataclass
class Service:
    settings: Settings
    engine: Engine
    store: Store
    lifecycle: Lifecycle
    generator: Generator
    cache: ResponseCache
    idempotency: Idempotency
    conversations: Conversations  # stored responses of the Responses API
    metrics: Metrics
    tracing: Tracing
    _native: tuple[str | None, NativeTools | None] | None = field(default=None, init=False, repr=False)

    @property
    def tracer(self) -> Tracer:
        return self.tracing.tracer

    @property
    def model_id(self) -> str:
        """The model's id on /v1: SERVED_MODEL_NAME, else the engine's name for it (once loaded)."""
        return self.settings.served_model_name or self.engine.info.name

    def native_tools(self) -> NativeTools | None:
        """The chat template's own tool-call syntax (tool_syntax.py), when the embedded engine's template has one."""
        engine = self.engine
        # An upstream writes its own calls; asked first, as isinstance against a Protocol is slow (each request).
        if not self.settings.embedded or not engine.loaded or not isinstance(engine, Tokenizer):
            return None
        template = engine.chat_template()
        if self._native is None or self._native[0] != template:  # worked out once per template
            syntax = syntax_of(template)
            token = engine.special_token(syntax.opener) if syntax is not None and syntax.opener else None
            self._native = (template, NativeTools(syntax, token) if syntax is not None else None)
        return self._native[1]

    def check_model(self, name: str) -> None:
        """A request's `model` must be the served one: 404 model_not_found otherwise, as OpenAI and Anthropic answer
        (while none is loaded, generating answers 503)."""
        if self.engine.loaded and name != self.model_id:
            raise HTTPError(404, "model_not_found", f"The model '{name}' does not exist; this server serves "
                            f"'{self.model_id}' (GET /v1/models)", field="model")

    def model(self) -> ModelInfo:
        """The served model, or 503 while it is not ready."""
        return self.lifecycle.model()

    async def respond(self, request: Request, material: dict[str, Any], deterministic: bool,
                      produce: Callable[[], Awaitable[Response]]) -> Response:
        """An inference request's answer: a retry's first answer (Idempotency-Key), else the cache's, else
        `produce()`'s. `material` is the normalized request (the cache key's and the retry check's)."""
        return await self.idempotency.serve(
            request, material, lambda: self.cache.serve(request, material, deterministic, produce))

    async def generate_for(self, request: Request, generation: GenerationRequest) -> Generation:
        """The generation an HTTP request asked for: counted against its client, its prompt in the request log when
        LOG_PROMPTS is on."""
        if self.settings.log_prompts:
            state(request.scope).prompt = [{"role": m.role, "content": m.content} for m in generation.messages or ()]
        return await self.generate(generation, client_id(request.scope, self.settings.trusted_proxies),
                                   request.scope)

    async def generate(self, request: GenerationRequest, client: str | None = None,
                       scope: Scope | None = None) -> Generation:
        return await self.generator.generate(request, client, scope)

    async def generate_many(self, request: GenerationRequest, n: int, client: str | None = None,
                            scope: Scope | None = None) -> list[Generation]:
        return await self.generator.generate_many(request, n, client, scope)
