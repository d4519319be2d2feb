"""POST /api/v1/infer: the native API, one prompt in, one answer out."""

from __future__ import annotations

from dataclasses import asdict

from ..engine.base import ChatMessage, GenerationRequest, SamplingParams
from ..http import ClientDisconnected, Request, Response, json_response
from ..router import Route
from ..schemas import InferRequest, InferResponse
from ..service import Service, complete
from ..validation import from_json


def routes(service: Service) -> list[Route]:
    settings = service.settings
    overrides = {"max_tokens": {"le": settings.max_tokens_limit}}

    async def infer(request: Request) -> Response:
        body = from_json(InferRequest, await request.json(settings.max_body_bytes), overrides=overrides)
        generation = await service.generate(
            GenerationRequest(
                params=SamplingParams(
                    max_tokens=body.max_tokens,
                    temperature=body.temperature,
                    top_p=body.top_p,
                    stop=body.stop_sequences(),
                    seed=body.seed,
                ),
                messages=(ChatMessage("system", settings.system_prompt), ChatMessage("user", body.prompt)),
            )
        )
        output = await complete(generation, request.receive)
        if output is None:
            raise ClientDisconnected()
        info = service.engine.info
        return json_response(
            asdict(InferResponse(
                output=output,
                tokens_used=generation.prompt_tokens + generation.completion_tokens,
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
                finish_reason=generation.finish_reason,
                model_name=info.name,
                model_version=info.revision,
            ))
        )

    return [
        Route(
            "POST", "/api/v1/infer", infer,
            summary="Answer one prompt with the model",
            request_schema=InferRequest, response_schema=InferResponse,
            errors=(400, 413, 422, 503), overrides=overrides,
        ),
    ]
