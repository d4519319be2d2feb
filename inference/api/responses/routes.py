"""OpenAI's Responses API: POST /v1/responses (streaming or not), GET and DELETE /v1/responses/{id}, GET
/v1/responses/{id}/input_items.

A response request reads as a chat completion does: parse (translate.parse), answer from idempotency or the cache
or generate (Service.respond); on a miss, the stored conversation it continues (previous_response_id, one store
read), translation into a GenerationRequest through the OpenAI chat request it means (translate.translate),
generation, rendering (render.whole or render.stream), which stores the finished response (store: true) before
the client hears it is complete. Errors are OpenAI's (the /v1 dialect).
"""

from __future__ import annotations

import asyncio
from typing import Any

from opentelemetry import trace

from ...serving.cache import labelled_errors
from ...serving.conversations import StoredResponse, owner_of
from ...serving.generation import complete
from ...serving.service import Service
from ...web.errors import HTTPError
from ...web.http import ClientDisconnected, Request, Response, StreamingResponse, StreamOutcome, json_response
from ...web.identity import client_id
from ...web.router import Route
from ...web.state import state
from ...web.validation import as_sent
from .. import passthrough
from ..openai.dialect import OPENAI
from ..openai.translate import DEFAULT_TEMPERATURE, note_user
from . import render
from .schemas import DeletedResponse, InputItemList, ResponseObject, ResponsesRequest
from .translate import input_items, new_id, parse, translate

MAX_LIST = 100
LIST_QUERY = {"after": {"type": "string"}, "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIST},
              "order": {"type": "string", "enum": ["asc", "desc"]},
              "include": {"type": "array", "items": {"type": "string"}, "maxItems": 0}}


def routes(service: Service) -> list[Route]:
    settings = service.settings
    conversations = service.conversations
    limit = {"max_output_tokens": {"le": settings.max_tokens_limit}}

    relayed = "responses" in settings.upstream_passthrough

    def owner(request: Request) -> str:
        return owner_of(client_id(request.scope, settings.trusted_proxies))

    async def create_response(request: Request) -> Response:
        if relayed:  # the upstream speaks this API itself, and keeps what it answers
            return await passthrough.relay(service, request, "responses", "max_output_tokens", OPENAI)
        raw = await request.json(settings.max_body_bytes, settings.body_timeout_seconds)
        body = parse(raw, limit)
        service.check_model(body.model)
        note_user(request, body.user or body.safety_identifier)
        span = trace.get_current_span()
        if body.prompt_cache_key:
            span.set_attribute("inference.prompt_cache_key", body.prompt_cache_key)
        for key, value in (body.metadata or {}).items():
            span.set_attribute(f"inference.metadata.{key}", value)
        info = service.model()
        whose = owner(request)
        # The cache key: the request as sent (known fields normalized, the default temperature spelled out), the
        # system prompt the service may add, and whose it is: a stored id it names, or one it answers with, is
        # that owner's alone.
        material = {"endpoint": state(request.scope).route, "model": service.model_id, "revision": info.revision,
                    "owner": whose, "body": {**as_sent(raw, body), "temperature": DEFAULT_TEMPERATURE
                                             if body.temperature is None else body.temperature}}
        if settings.embedded and settings.chat_system_prompt and not body.instructions:
            material["system_prompt"] = settings.system_prompt
        return await service.respond(request, material, body.temperature == 0,
                                     lambda: generate(request, body, whose))

    async def generate(request: Request, body: ResponsesRequest, whose: str) -> Response:
        history = (await conversations.load(whose, body.previous_response_id, "previous_response_id")
                   ).conversation() if body.previous_response_id else []
        items = input_items(body)
        native = service.native_tools()
        # Tools or a format may take a grammar compile (once per schema): off the event loop.
        work = (lambda: translate(body, history + items, len(history), settings, native))
        translated = await asyncio.to_thread(work) if body.tools or body.text else work()
        generation = await service.generate_for(request, translated.generation)
        response = render.base(new_id("resp"), body, service.model_id, store=body.store is not False)

        async def keep(final: dict[str, Any]) -> bool:
            return await conversations.save(whose, StoredResponse(final, items, history))

        if body.stream:
            outcome = StreamOutcome()
            return StreamingResponse(render.stream(generation, response, translated, keep, outcome),
                                     on_disconnect=generation.cancel, outcome=outcome)
        text = await complete(generation, request.receive)
        if text is None:
            raise ClientDisconnected()
        return json_response(await render.whole(generation, text, response, translated, keep))

    async def retrieve_response(request: Request) -> Response:
        query = request.query
        if query.get("stream", "false") != "false":
            raise HTTPError(400, "unsupported_parameter", "stream: a stored response cannot be streamed again "
                            "(responses here are never in the background)", field="stream")
        if query.get("include"):
            raise HTTPError(400, "unsupported_parameter", "include: no extra output data is available",
                            field="include")
        if relayed:
            return await passthrough.fetch(service, request, "GET", request.path_params["response_id"])
        stored = await conversations.load(owner(request), request.path_params["response_id"])
        return json_response(stored.response)

    async def delete_response(request: Request) -> Response:
        if relayed:
            return await passthrough.fetch(service, request, "DELETE", request.path_params["response_id"])
        response_id = request.path_params["response_id"]
        await conversations.delete(owner(request), response_id)
        return json_response({"id": response_id, "object": "response", "deleted": True})

    async def list_input_items(request: Request) -> Response:
        if relayed:
            return await passthrough.fetch(service, request, "GET", request.path_params["response_id"], "/input_items")
        query = request.query
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise HTTPError(422, "validation_error", 'order: "asc" or "desc"', field="order")
        try:
            count = int(query.get("limit", "20"))
        except ValueError:
            count = 0
        if not 1 <= count <= MAX_LIST:
            raise HTTPError(422, "validation_error", f"limit: an integer from 1 to {MAX_LIST}", field="limit")
        if query.get("include"):
            raise HTTPError(400, "unsupported_parameter", "include: no extra item data is available",
                            field="include")
        stored = await conversations.load(owner(request), request.path_params["response_id"])
        items = stored.input if order == "asc" else stored.input[::-1]
        after = query.get("after")
        if after is not None:
            ids = [item.get("id") for item in items]
            if after not in ids:
                raise HTTPError(422, "validation_error", f"after: no input item {after!r} in this response",
                                field="after")
            items = items[ids.index(after) + 1:]
        page = items[:count]
        return json_response({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                              "last_id": page[-1]["id"] if page else None, "has_more": len(items) > count})

    item = "/v1/responses/{response_id}"
    by_id = {"parameters": {"response_id": "$response.body#/id"}}
    return [
        Route("POST", "/v1/responses", labelled_errors(create_response), summary="OpenAI: create a response (stream: typed "
              "SSE events)", request_schema=ResponsesRequest, response_schema=ResponseObject,
              errors=(400, 401, 404, 409, 413, 429, 502, 503, 504), streams=True, overrides=limit, limited=True,
              dialect=OPENAI, links={"GetResponse": (f"GET {item}", by_id),
                                     "ListInputItems": (f"GET {item}/input_items", by_id),
                                     "DeleteResponse": (f"DELETE {item}", by_id)}),
        Route("GET", item, retrieve_response, summary="OpenAI: a stored response", response_schema=ResponseObject,
              errors=(400, 401, 404, 503), query={"stream": {"type": "boolean", "enum": [False]},
                                                  "include": LIST_QUERY["include"]}, dialect=OPENAI),
        Route("DELETE", item, delete_response, summary="OpenAI: delete a stored response", response_schema=DeletedResponse,
              errors=(401, 404, 503), dialect=OPENAI),
        Route("GET", f"{item}/input_items", list_input_items, summary="OpenAI: a stored response's input items",
              response_schema=InputItemList, errors=(400, 401, 404, 422, 503), query=LIST_QUERY, dialect=OPENAI),
    ]
