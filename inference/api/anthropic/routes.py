"""Anthropic's Messages API: POST /v1/messages (streaming or not) and POST /v1/messages/count_tokens.

A message request reads as a chat completion does: parse (translate.parse), translate into a GenerationRequest
through the OpenAI chat request it means (translate.translate), answer from idempotency or the cache or generate
(Service.respond), render (render.whole or render.stream). Keys may come as `x-api-key` (middleware/auth.py);
`anthropic-version` is accepted whatever it says.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from ...engine.base import EngineError, Tokenizer
from ...serving.cache import labelled_errors
from ...serving.generation import complete, http_error_of
from ...serving.service import Service
from ...web.errors import HTTPError
from ...web.http import ClientDisconnected, Request, Response, StreamingResponse, StreamOutcome, json_response
from ...web.router import Route
from ...web.state import state
from ...web.validation import as_sent
from .. import passthrough
from ..openai.translate import Translated, note_user
from . import render
from .dialect import ANTHROPIC
from .schemas import AnthropicMessageResponse, CountTokensRequest, MessagesRequest, TokenCount
from .translate import DEFAULT_TEMPERATURE, parse, translate


def routes(service: Service) -> list[Route]:
    settings = service.settings
    limit = {"max_tokens": {"le": settings.max_tokens_limit}}

    async def parsed(request: Request, schema: type, overrides: Any) -> tuple[Any, Any]:
        raw = await request.json(settings.max_body_bytes, settings.body_timeout_seconds)
        body = parse(raw, schema, overrides)
        service.check_model(body.model)
        return raw, body

    async def translated(body: Any) -> Translated:
        native = service.native_tools()
        # Tools may take a grammar compile (once per schema): off the event loop.
        if body.tools:
            return await asyncio.to_thread(translate, body, settings, native)
        return translate(body, settings, native)

    async def create_message(request: Request) -> Response:
        if "messages" in settings.upstream_passthrough:  # the upstream speaks this API itself
            return await passthrough.relay(service, request, "messages", "max_tokens", ANTHROPIC)
        raw, body = await parsed(request, MessagesRequest, limit)
        user = (body.metadata or {}).get("user_id") or body.user_profile_id
        note_user(request, user if isinstance(user, str) else None)
        info = service.model()
        # The cache key is the request as sent (known fields normalized, the default temperature spelled out) and the
        # system prompt the service adds: a hit costs no translation.
        material = {"endpoint": state(request.scope).route, "model": service.model_id, "revision": info.revision,
                    "body": {**as_sent(raw, body),
                             "temperature": DEFAULT_TEMPERATURE if body.temperature is None else body.temperature}}
        if settings.embedded and settings.chat_system_prompt and not body.system:
            material["system_prompt"] = settings.system_prompt
        deterministic = body.temperature == 0

        async def produce() -> Response:
            return await generate(request, body, await translated(body))

        return await service.respond(request, material, deterministic, produce)

    async def generate(request: Request, body: MessagesRequest, translated: Translated) -> Response:
        generation = await service.generate_for(request, translated.generation)
        message_id = render.new_id()
        if body.stream:
            outcome = StreamOutcome()
            return StreamingResponse(render.stream(generation, message_id, service.model_id, translated, outcome),
                                     on_disconnect=generation.cancel, outcome=outcome)
        text = await complete(generation, request.receive)
        if text is None:
            raise ClientDisconnected()
        return json_response(render.whole(generation, text, message_id, service.model_id, translated))

    async def count_tokens(request: Request) -> Response:
        if "messages" in settings.upstream_passthrough:  # the upstream's own, with its tokenizer
            return await passthrough.count(service, request)
        service.model()  # 503 (529 here) while loading
        engine = service.engine
        if not isinstance(engine, Tokenizer):
            raise HTTPError(501, "not_supported", "the upstream backend has no tokenizer here; count tokens at the "
                                                  "upstream")
        _, body = await parsed(request, CountTokensRequest, {})
        generation = (await translated(body)).generation
        tools = json.loads(generation.tools) if generation.tools else None
        try:
            tokens = await asyncio.to_thread(engine.render, generation.messages, tools=tools)
        except EngineError as exc:
            raise http_error_of(exc) from None
        return json_response({"input_tokens": len(tokens)})

    errors = (400, 401, 404, 409, 413, 429, 502, 504, 529)
    return [
        Route("POST", "/v1/messages", labelled_errors(create_message), summary="Anthropic: create a message "
              "(stream: SSE events)", request_schema=MessagesRequest, response_schema=AnthropicMessageResponse,
              errors=errors, streams=True, overrides=limit, limited=True, dialect=ANTHROPIC),
        Route("POST", "/v1/messages/count_tokens", count_tokens, summary="Anthropic: count a message's input tokens",
              request_schema=CountTokensRequest, response_schema=TokenCount, errors=(400, 401, 404, 413, 501, 529),
              dialect=ANTHROPIC),
    ]

