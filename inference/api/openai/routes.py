"""The OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions (streaming or not).

A completion request reads top to bottom: parse (translate.parse_*), translate into a GenerationRequest
(translate.translate_*), answer from idempotency or the cache or generate (Service.respond), render (render.whole or
render.stream)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from ...serving.cache import labelled_errors
from ...serving.generation import complete_all
from ...serving.service import Service
from ...web.errors import HTTPError
from ...web.http import ClientDisconnected, Request, Response, StreamingResponse, StreamOutcome, json_response
from ...web.identity import client_id
from ...web.router import Route
from ...web.state import state
from ...web.validation import as_sent
from . import render
from .dialect import OPENAI
from .schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    Model,
    ModelList,
    SamplingFields,
    refused_values,
)
from .translate import (
    Translated,
    added_system_prompt,
    effective,
    note_caller,
    parse_chat,
    parse_completion,
    translate_chat,
    translate_completion,
)

OWNED_BY = "inference"


def routes(service: Service) -> list[Route]:
    settings = service.settings
    limit = {"max_tokens": {"le": settings.max_tokens_limit}, "max_completion_tokens": {"le": settings.max_tokens_limit},
             "n": {"le": settings.max_choices}}
    created = int(time.time())
    embedded = settings.embedded  # else an upstream enforces schemas itself
    # The embedded engine: fields it refuses may only have the values that ask for nothing (in the document too).
    chat_limit = {**limit, **(refused_values("chat", ChatCompletionRequest) if embedded else {})}
    completion_limit = {**limit, **(refused_values("completion", CompletionRequest) if embedded else {})}

    def model_object() -> dict[str, Any]:
        return {"id": service.model_id, "object": "model", "created": created, "owned_by": OWNED_BY}

    async def list_models(request: Request) -> Response:
        data = [model_object()] if service.engine.loaded else []
        return json_response({"object": "list", "data": data})

    async def retrieve_model(request: Request) -> Response:
        name = request.path_params["model"]
        if not service.engine.loaded or name != service.model_id:
            raise HTTPError(404, "model_not_found", f"The model '{name}' does not exist", field="model")
        return json_response(model_object())

    async def chat_completions(request: Request) -> Response:
        raw = await request.json(settings.max_body_bytes, settings.body_timeout_seconds)
        body, forwarded, forwarded_by_message = parse_chat(raw, settings, chat_limit)
        note_caller(request, body)
        service.check_model(body.model)
        native = service.native_tools()  # worked out once
        return await respond(request, raw, body, added_system_prompt(body.messages, settings),
                             lambda: translate_chat(raw, body, forwarded, forwarded_by_message, settings, native),
                             heavy=bool(body.response_format or body.tools))

    async def completions(request: Request) -> Response:
        raw = await request.json(settings.max_body_bytes, settings.body_timeout_seconds)
        body, forwarded = parse_completion(raw, settings, completion_limit)
        note_caller(request, body)
        service.check_model(body.model)
        return await respond(request, raw, body, None, lambda: translate_completion(body, forwarded, settings),
                             heavy=bool(body.response_format))

    async def respond(request: Request, raw: Any, body: SamplingFields, system: str | None,
                      translate: Callable[[], Translated], heavy: bool) -> Response:
        """A retry's first answer, else the cache's, else a new one, translated only then (a hit costs none). The
        cache key: every field the client sent, known ones normalized, unset sampling fields as the values they
        mean, and the system prompt the service adds. `heavy`: a schema (response_format, tools) may take a grammar
        compile (p99 ~0.1 s on real-world schemas, once per schema: cached), so it is translated off the event
        loop, where other requests never wait on it."""
        info = service.model()
        normalized = {**as_sent(raw, body), **effective(body)}
        material = {"endpoint": state(request.scope).route, "model": service.model_id, "revision": info.revision,
                    "body": normalized}
        if system is not None:
            material["system_prompt"] = system
        deterministic = body.temperature == 0 or body.seed is not None

        async def produce() -> Response:
            return await generate(request, body, await asyncio.to_thread(translate) if heavy else translate())

        return await service.respond(request, material, deterministic, produce)

    async def generate(request: Request, body: SamplingFields, translated: Translated) -> Response:
        """Generate, then render as a chat completion or a text completion, streamed or whole."""
        generation_request = translated.generation
        if settings.log_prompts:
            state(request.scope).prompt = (
                [{"role": m.role, "content": m.content} for m in generation_request.messages]
                if generation_request.messages is not None else generation_request.prompt
            )
        generations = await service.generate_many(
            generation_request, body.n or 1, client=client_id(request.scope, settings.trusted_proxies),
            scope=request.scope,
        )
        chat = generation_request.messages is not None
        meta = render.Meta("chatcmpl" if chat else "cmpl", service.model_id, service.engine.info.revision)
        if body.stream:
            outcome = StreamOutcome()

            def cancel() -> None:
                for generation in generations:
                    generation.cancel()

            return StreamingResponse(render.stream(generations, meta, translated, body.include_usage, outcome,
                                                   body.continuous_usage),
                                     on_disconnect=cancel, outcome=outcome)
        texts = await complete_all(generations, request.receive)
        if texts is None:
            raise ClientDisconnected()
        return json_response(render.whole(generations, texts, meta, translated))

    errors = (400, 401, 404, 409, 413, 429, 502, 503, 504)
    return [
        Route("GET", "/v1/models", list_models, summary="OpenAI: list models", response_schema=ModelList,
              links={"RetrieveModel": ("GET /v1/models/{model}",
                                       {"parameters": {"model": "$response.body#/data/0/id"}})}, dialect=OPENAI),
        Route("GET", "/v1/models/{model}", retrieve_model, summary="OpenAI: retrieve a model",
              response_schema=Model, errors=(404,), dialect=OPENAI),
        Route("POST", "/v1/chat/completions", labelled_errors(chat_completions),
              summary="OpenAI: chat completion (stream: SSE)", request_schema=ChatCompletionRequest,
              response_schema=ChatCompletion, errors=errors, streams=True, overrides=chat_limit,
              allow_unknown_fields=not embedded, limited=True, dialect=OPENAI),
        Route("POST", "/v1/completions", labelled_errors(completions), summary="OpenAI: text completion (stream: SSE)",
              request_schema=CompletionRequest, response_schema=Completion, errors=errors, streams=True,
              overrides=completion_limit, allow_unknown_fields=not embedded, limited=True, dialect=OPENAI),
    ]
