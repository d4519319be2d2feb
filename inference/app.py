"""build_app: the whole service assembled in one place, middleware order included."""

from __future__ import annotations

from typing import Callable

from .config import Settings
from .api import meta, tokens
from .api.native import infer
from .api.openai import routes as openai_api
from .engine.base import Engine
from .web.http import ASGIApp, Receive, Scope, Send
from .middleware.auth import auth
from .middleware.errors import errors
from .middleware.limit import limit
from .middleware.metrics import metrics as observe_metrics
from .middleware.tracing import tracing as tracing_middleware
from .web.router import Route, Router
from .serving.lifecycle import Service
from .store.base import Store
from .store.memory import MemoryStore
from .telemetry.tracing import Metrics, create_tracing


def create_engine(settings: Settings) -> Engine:
    """The engine MODEL_BACKEND names; may download the default model (models.pull) first."""
    if not settings.embedded:
        from .engine.upstream import UpstreamEngine

        assert settings.upstream_url is not None  # Settings.check guarantees it
        return UpstreamEngine(
            settings.upstream_url, api_key=settings.upstream_api_key, model=settings.upstream_model,
            timeout=settings.upstream_timeout_seconds,
        )
    from .engine.llama import LlamaEngine
    from .engine.llama.models import resolve_model

    path, sha256 = resolve_model(settings.model_path, settings.model_cache_dir)
    return LlamaEngine(
        path, n_ctx=settings.n_ctx, n_threads=settings.n_threads, max_queued=settings.max_queued_requests,
        max_concurrent=settings.max_concurrent_requests, queue_timeout=settings.queue_timeout_seconds, sha256=sha256,
        extra_buffers=settings.llama_extra_buffers, crash_test=settings.test_only_crash_with_extra_buffers,
        crash_loop_deaths=settings.engine_crash_loop_deaths, crash_loop_seconds=settings.engine_crash_loop_seconds,
        log_format=settings.log_format,
    )


def create_store(settings: Settings) -> Store:
    """Redis when REDIS_URL is set (shared by every replica), otherwise this process's memory."""
    if settings.redis_url:
        from .store.redis import RedisStore

        return RedisStore(settings.redis_url, password=settings.redis_auth,
                          timeout=settings.redis_timeout_ms / 1000)
    return MemoryStore(settings.cache_max_bytes)


def build_app(
    settings: Settings,
    engine: Engine | None = None,
    *,
    store: Store | None = None,
    on_fatal: Callable[[], None] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> Application:
    """The ASGI app. An `engine` passed in is loaded if needed but not closed: its owner closes it."""
    metrics = Metrics()
    tracing = create_tracing(settings, metrics)
    service = Service(
        settings, engine if engine is not None else create_engine(settings),
        store if store is not None else create_store(settings),
        metrics=metrics, tracing=tracing, owns_engine=engine is None, on_fatal=on_fatal, on_ready=on_ready,
    )
    metrics.watch(
        queue_depth=lambda: service.engine.queue_depth,
        redis_up=(lambda: float(service.store.state == "up")) if settings.redis_url else None,
    )
    routes: list[Route] = []
    routes += meta.routes(service, routes)
    routes += infer.routes(service)
    routes += openai_api.routes(service)
    routes += tokens.routes(service)
    limited = frozenset(route.template for route in routes if route.limited)

    # The request path, innermost first; read bottom-up it is the order a request meets them.
    router = Router(routes)
    app: ASGIApp = router
    if settings.rate_limit_enabled:
        app = limit(app, store=service.store, settings=settings, paths=limited, tracing=tracing)
    app = auth(app, keys=settings.all_api_keys)
    app = observe_metrics(app, metrics=metrics, settings=settings, route_of=router.template_for)
    app = tracing_middleware(app, traces=tracing)
    app = errors(app, on_error=lambda code: metrics.errors.labels(code).inc())
    return Application(app, service)


class Application:
    """The ASGI entry point: handles lifespan itself (load the model without delaying start-up, close the
    engine at shutdown) and passes everything else to the middleware stack."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.service.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.service.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return
