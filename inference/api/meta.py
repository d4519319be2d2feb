"""The service's own endpoints: index, liveness, readiness, model card, metrics; with DOCS_ENABLED the OpenAPI
document, Swagger UI and the playground."""

from __future__ import annotations

from dataclasses import asdict
from functools import cache
from importlib import resources
from pathlib import Path

import prometheus_client
from prometheus_client.openmetrics import exposition as openmetrics

from .. import SERVICE_NAME, __version__
from ..web.errors import HTTPError
from ..web.openapi import openapi_document
from ..web.http import Request, Response, dump_json, json_response
from ..web.router import Route
from .native.schemas import HealthResponse, ModelResponse, ReadyResponse, ServiceResponse
from ..serving.service import Service

HEALTHY = dump_json({"status": "healthy"})
# Only these Swagger UI files are served; anything else under /docs/ is a 404.
DOCS_ASSETS = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} API</title>
<link rel="stylesheet" href="/docs/swagger-ui.css"><link rel="icon" href="/docs/favicon-32x32.png"></head>
<body><div id="swagger-ui"></div><script src="/docs/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({{url: "/openapi.json", dom_id: "#swagger-ui"}});</script></body></html>
"""


@cache
def _asset(name: str) -> bytes:
    from swagger_ui_bundle import swagger_ui_path

    return Path(swagger_ui_path, name).read_bytes()


def routes(service: Service, documented: list[Route]) -> list[Route]:
    """`documented` is the app's full route list, read when /openapi.json is first asked for."""
    settings, lifecycle = service.settings, service.lifecycle
    docs_page = DOCS_PAGE.format(title=SERVICE_NAME).encode()
    links = {"health": "/health", "ready": "/ready", "model": "/api/v1/model", "infer": "/api/v1/infer",
             "metrics": "/metrics", "openai": "/v1"}
    if settings.docs_enabled:
        links.update(docs="/docs", openapi="/openapi.json", playground="/playground")

    async def index(request: Request) -> Response:
        model = service.engine.info.name if service.engine.loaded else None
        return json_response(asdict(ServiceResponse(
            name=SERVICE_NAME, version=__version__, environment=settings.environment, model=model, links=links,
        )))

    async def health(request: Request) -> Response:
        return Response(HEALTHY)

    async def ready(request: Request) -> Response:
        # The store's state is reported, never judged: a cache outage must not take every pod out of rotation.
        store = service.store.state
        if store == "down":
            await service.store.ping()  # at most one probe a second (the store's own back-off)
            store = service.store.state
        status, reason = lifecycle.readiness
        if status == "ready":
            return json_response({"status": "ready", "store": store})
        body = asdict(ReadyResponse(status=status, reason=reason, store=store))
        return json_response(body, status=503, headers={"Retry-After": "5"})

    async def model(request: Request) -> Response:
        if not service.engine.loaded:
            raise HTTPError(503, "model_not_ready", lifecycle.reason or "the model is not loaded",
                            headers={"Retry-After": "5"})
        info = service.engine.info
        return json_response(asdict(ModelResponse(
            model_name=info.name, model_version=info.revision, status="ready" if lifecycle.ready else lifecycle.state,
            description=info.description, backend=info.backend, context_length=info.context_length,
            quantization=info.quantization, parameters=info.parameters, sha256=info.sha256, details=info.extra,
        )))

    @cache
    def openapi_body(model: str | None, vocab_size: int | None) -> bytes:
        return dump_json(openapi_document(documented, model=model, vocab_size=vocab_size))

    async def metrics(request: Request) -> Response:
        # OpenMetrics (with exemplars linking histogram buckets to traces) when the scraper asks for it.
        accept = request.headers.get("accept", "")
        if "application/openmetrics-text" in accept:
            return Response(openmetrics.generate_latest(service.metrics.registry),
                            media_type=openmetrics.CONTENT_TYPE_LATEST)
        return Response(prometheus_client.generate_latest(service.metrics.registry),
                        media_type=prometheus_client.CONTENT_TYPE_LATEST)

    async def openapi_json(request: Request) -> Response:
        # Once the model is loaded, the document also states what depends on it (its id, its vocabulary).
        if not service.engine.loaded:
            return Response(openapi_body(None, None))
        return Response(openapi_body(service.model_id, service.engine.info.vocab_size))

    playground_page = (resources.files("inference") / "static" / "playground.html").read_bytes()

    async def playground(request: Request) -> Response:
        return Response(playground_page, media_type="text/html; charset=utf-8")

    async def docs(request: Request) -> Response:
        return Response(docs_page, media_type="text/html; charset=utf-8")

    async def docs_asset(request: Request) -> Response:
        name = request.path_params["asset"]
        if name not in DOCS_ASSETS:
            raise HTTPError(404, "not_found", f"no endpoint at {request.path}")
        return Response(_asset(name), media_type=DOCS_ASSETS[name], headers={"Cache-Control": "public, max-age=86400"})

    own = [
        Route("GET", "/", index, summary="Service name, version and links", response_schema=ServiceResponse),
        Route("GET", "/health", health, summary="Liveness: the process answers", response_schema=HealthResponse),
        Route("GET", "/ready", ready, summary="Readiness: the model is loaded and work is accepted",
              response_schema=ReadyResponse, errors=(503,)),
        Route("GET", "/api/v1/model", model, summary="The served model", response_schema=ModelResponse, errors=(503,)),
        Route("GET", "/metrics", metrics, summary="Prometheus metrics (OpenMetrics on request)",
              media_type="text/plain"),
    ]
    if not settings.docs_enabled:  # DOCS_ENABLED=false: the routes below do not exist (404)
        return own
    return own + [
        Route("GET", "/openapi.json", openapi_json, summary="This document"),
        Route("GET", "/docs", docs, summary="Swagger UI", media_type="text/html"),
        Route("GET", "/playground", playground, summary="Chat with the model in the browser", media_type="text/html"),
        Route("GET", "/docs/{asset}", docs_asset, include_in_schema=False),
    ]
