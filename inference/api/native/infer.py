"""POST /api/v1/infer: the native API, one prompt in, one answer out (or a stream of events)."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import AsyncIterator

from ...engine.base import ChatMessage, EngineError, Generation, GenerationRequest, SamplingParams
from ...web.errors import HTTPError
from ...web.http import ClientDisconnected, Request, Response, StreamingResponse, StreamOutcome, json_response, sse
from ...serving.cache import labelled_errors
from ...web.identity import client_id
from ...web.state import state
from ...web.router import Route
from .schemas import InferRequest, InferResponse
from ...serving.structured import StructuredOutput, parse_response_format
from ...serving.generation import complete, http_error_of
from ...serving.service import Service
from ...web.validation import from_json, plain


def routes(service: Service) -> list[Route]:
    settings = service.settings
    overrides = {"max_tokens": {"le": settings.max_tokens_limit}}

    def result(generation: Generation, output: str) -> dict:
        info = service.engine.info
        return asdict(InferResponse(
            output=output,
            tokens_used=generation.prompt_tokens + generation.completion_tokens,
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            finish_reason=generation.finish_reason,  # type: ignore[arg-type]
            model_name=info.name,
            model_version=info.revision,
            reasoning=generation.reasoning or None,
        ))

    def structured_of(body: InferRequest) -> StructuredOutput | None:
        if body.json_schema is None:
            return None
        try:
            return parse_response_format({"type": "json_schema", "json_schema": {"name": "output", "schema": body.json_schema}},
                                         enforce=settings.embedded)
        except HTTPError as exc:
            why = exc.message.removeprefix("response_format: ").replace("json_schema.schema", "json_schema")
            raise HTTPError(422, "validation_error", f"json_schema: {why}", field="json_schema") from None

    async def events(generation: Generation, outcome: StreamOutcome,
                     structured: StructuredOutput | None = None) -> AsyncIterator[bytes]:
        pieces: list[str] = []
        try:
            async for piece in generation:
                if not piece:  # an upstream reasoning model's reasoning arrived: it comes whole in the result
                    continue
                pieces.append(piece)
                yield sse({"text": piece}, event="token")
            if structured is not None:
                structured.check("".join(pieces), generation.finish_reason)
            if generation.finish_reason is not None:
                outcome.complete = True
                yield sse(result(generation, "".join(pieces)), event="done")
        except (EngineError, HTTPError) as exc:
            error = http_error_of(exc)
            yield sse(error.body(), event="error")
        finally:
            await generation.aclose()

    async def infer(request: Request) -> Response:
        body = from_json(InferRequest, await request.json(settings.max_body_bytes, settings.body_timeout_seconds), overrides=overrides)
        # A schema it cannot enforce is refused before anything else; compiled off the event loop (as on /v1).
        structured = await asyncio.to_thread(structured_of, body) if body.json_schema is not None else None
        if settings.log_prompts:
            state(request.scope).prompt = body.prompt
        info = service.model()
        material = {"endpoint": "/api/v1/infer", "model": info.name, "revision": info.revision,
                    "system_prompt": settings.system_prompt, "body": plain(body)}
        deterministic = body.temperature == 0 or body.seed is not None
        return await service.respond(request, material, deterministic, lambda: answer(request, body, structured))

    async def answer(request: Request, body: InferRequest, structured: StructuredOutput | None) -> Response:
        generation = await service.generate(
            GenerationRequest(
                params=SamplingParams(
                    max_tokens=body.max_tokens,
                    temperature=body.temperature,
                    top_p=body.top_p,
                    stop=body.stop_sequences(),
                    seed=body.seed,
                    **(structured.sampling() if structured is not None else {}),
                ),
                messages=(ChatMessage("system", settings.system_prompt), ChatMessage("user", body.prompt)),
                stream=body.stream,
            ),
            client=client_id(request.scope, settings.trusted_proxies),
            scope=request.scope,
        )
        if body.stream:
            outcome = StreamOutcome()
            return StreamingResponse(events(generation, outcome, structured), on_disconnect=generation.cancel,
                                     outcome=outcome)
        output = await complete(generation, request.receive)
        if output is None:
            raise ClientDisconnected()
        if structured is not None:
            structured.check(output, generation.finish_reason)
        return json_response(result(generation, output))

    return [
        Route(
            "POST", "/api/v1/infer", labelled_errors(infer),
            summary="Answer one prompt with the model (stream: server-sent events token/done/error)",
            request_schema=InferRequest, response_schema=InferResponse,
            errors=(400, 401, 409, 413, 422, 429, 502, 503, 504), overrides=overrides, limited=True, streams=True,
        ),
    ]
