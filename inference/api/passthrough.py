"""Passthrough (UPSTREAM_PASSTHROUGH): a Messages or Responses request sent on unchanged to an upstream that speaks
that API itself (vLLM, llama.cpp's server), and its answer passed back as the upstream wrote it.

What this service still does: API keys, rate limits, the token budget (the request's max_tokens / max_output_tokens
is reserved, what was not generated refunded, from the usage the answer reports), deadlines, idempotency, the cache,
metrics, traces and logs. What it leaves to the upstream: checking the request (only `model` is checked here, and
replaced by the upstream's name for it) and everything the answer holds, stored responses included.
"""

from __future__ import annotations

import json
from urllib.parse import quote
from typing import AsyncIterator, Awaitable, Callable

from ..engine.base import EngineError, Generation, GenerationRequest, Relay, SamplingParams
from ..engine.upstream import UpstreamEngine
from ..serving.conversations import owner_of
from ..serving.generation import complete, http_error_of
from ..serving.service import Service
from ..web.dialect import Dialect
from ..web.errors import HTTPError
from ..web.http import ClientDisconnected, Request, Response, StreamingResponse, StreamOutcome, sse
from ..web.identity import client_id
from ..web.state import state


async def relay(service: Service, request: Request, path: str, max_field: str, dialect: Dialect) -> Response:
    """Answer `request` (a POST to /v1/{path}) from the upstream's own /{path}."""
    settings = service.settings
    raw = await request.json(settings.max_body_bytes, settings.body_timeout_seconds)
    if not isinstance(raw, dict):
        raise HTTPError(422, "validation_error", "the body must be a JSON object")
    if not isinstance(raw.get("model"), str):
        raise HTTPError(422, "validation_error", "model: required, a string", field="model")
    info = service.model()
    service.check_model(raw["model"])
    limit = raw.get(max_field)
    if limit is not None and not (isinstance(limit, int) and not isinstance(limit, bool)
                                  and 1 <= limit <= settings.max_tokens_limit):
        raise HTTPError(422, "validation_error", f"{max_field}: an integer from 1 to {settings.max_tokens_limit}",
                        field=max_field)
    stream = raw.get("stream") is True
    owner = owner_of(client_id(request.scope, settings.trusted_proxies))
    # The key: the request as sent, and whose it is (a stored response it names or makes is its caller's alone).
    material = {"endpoint": state(request.scope).route, "model": service.model_id, "revision": info.revision,
                "owner": owner, "body": raw}
    body = json.dumps({**raw, "model": info.name}).encode()
    if path == "responses" and isinstance(raw.get("previous_response_id"), str):
        await service.conversations.check_owner(owner, raw["previous_response_id"])
    stores = path == "responses" and raw.get("store") is not False

    async def claim(generation: Generation) -> bool:
        """Once the answer has said its id: the response the upstream stores is this owner's."""
        answer_id = getattr(generation, "answer_id", None)
        if answer_id is None:
            return False
        await service.conversations.own(owner, answer_id)
        return True

    async def produce() -> Response:
        generation = await service.generate(
            GenerationRequest(SamplingParams(max_tokens=limit or settings.max_tokens_limit), stream=stream,
                              relay=Relay(path, body)),
            client=client_id(request.scope, settings.trusted_proxies), scope=request.scope)
        if stream:
            outcome = StreamOutcome()
            return StreamingResponse(_passed(generation, outcome, dialect, claim if stores else None),
                                     on_disconnect=generation.cancel, outcome=outcome)
        text = await complete(generation, request.receive)
        if text is None:
            raise ClientDisconnected()
        if stores:
            await claim(generation)
        return Response(text.encode(), media_type="application/json")

    return await service.respond(request, material, raw.get("temperature") == 0, produce)


async def _passed(generation: Generation, outcome: StreamOutcome, dialect: Dialect,
                  claim: Callable[[Generation], Awaitable[bool]] | None) -> AsyncIterator[bytes]:
    try:
        async for piece in generation:
            if claim is not None and await claim(generation):  # before the client can know the id
                claim = None
            yield piece.encode()
        outcome.complete = generation.finish_reason is not None
    except EngineError as exc:  # the upstream broke off: an error event in the client's dialect
        yield sse(dialect.body(http_error_of(exc)), "error")
    finally:
        await generation.aclose()


async def fetch(service: Service, request: Request, method: str, response_id: str, suffix: str = "") -> Response:
    """A stored response's route (GET, DELETE, input_items: `suffix`) answered by the upstream that stored it, for
    the caller that made it (404 for another): its answer as it came, unless the upstream failed (502)."""
    service.model()
    await service.conversations.check_owner(owner_of(client_id(request.scope, service.settings.trusted_proxies)),
                                            response_id)
    return await _forwarded(service, method, "responses/" + quote(response_id, safe="") + suffix,
                            request.scope.get("query_string", b"").decode("latin-1"))


async def count(service: Service, request: Request) -> Response:
    """Anthropic's count_tokens answered by the upstream's own (its tokenizer is there)."""
    settings = service.settings
    raw = await request.json(settings.max_body_bytes, settings.body_timeout_seconds)
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), str):
        raise HTTPError(422, "validation_error", "model: required, a string", field="model")
    info = service.model()
    service.check_model(raw["model"])
    return await _forwarded(service, "POST", "messages/count_tokens", "",
                            json.dumps({**raw, "model": info.name}).encode())


async def _forwarded(service: Service, method: str, path: str, query: str, body: bytes | None = None) -> Response:
    engine = service.engine
    if not isinstance(engine, UpstreamEngine):  # config.check: passthrough needs MODEL_BACKEND=openai
        raise HTTPError(501, "not_supported", "passthrough needs the upstream backend")
    try:
        status, raw = await engine.fetch(method, path, query, body)
    except EngineError as exc:
        raise http_error_of(exc) from None
    if status >= 500:
        raise HTTPError(502, "upstream_error", f"the upstream answered {status}")
    return Response(raw, status=status, media_type="application/json")
