"""build_app: the whole service assembled in one place, bottom-up (store, engine, telemetry, the serving parts, the
routes, the middleware), middleware order included. Nothing below builds its own collaborators."""

from __future__ import annotations

from typing import Callable

from .api import meta, tokens
from .api.anthropic import routes as anthropic_api
from .api.native import infer
from .api.openai import routes as openai_api
from .api.responses import routes as responses_api
from .config import Settings
from .engine import create_engine
from .engine.base import Engine
from .middleware.auth import auth
from .middleware.errors import errors
from .middleware.limit import limit
from .middleware.metrics import metrics as observe_metrics
from .middleware.tracing import tracing as tracing_middleware
from .serving.cache import ResponseCache
from .serving.conversations import Conversations
from .serving.generation import Generator
from .serving.idempotency import Idempotency
from .serving.lifecycle import Lifecycle
from .serving.limits import TokenBudget
from .serving.service import Service
from .store import create_store
from .store.base import Store
from .store.memory import MemoryStore
from .telemetry.tracing import Metrics, create_tracing
from .web.http import ASGIApp, Receive, Scope, Send
from .web.router import Route, Router


def build_app(
    settings: Settings,
    engine: Engine | None = None,
    *,
    store: Store | None = None,
    on_fatal: Callable[[], None] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> Application:
    """The ASGI app. An `engine` passed in is loaded if needed but not closed: its owner closes it."""
    owns_engine = engine is None
    store = store if store is not None else create_store(settings)
    engine = engine if engine is not None else create_engine(settings)
    metrics = Metrics()
    tracing = create_tracing(settings, metrics)
    lifecycle = Lifecycle(settings, engine, store, metrics=metrics, tracing=tracing, owns_engine=owns_engine,
                          on_fatal=on_fatal, on_ready=on_ready)
    generator = Generator(settings, engine, budget=TokenBudget(store, settings), metrics=metrics,
                          tracer=tracing.tracer, model=lifecycle.model)
    service = Service(
        settings, engine, store, lifecycle, generator,
        cache=ResponseCache(store, settings, metrics=metrics, tracing=tracing),
        idempotency=Idempotency(store, settings),
        # In memory, stored responses get their own bounded store: cached answers must not evict conversations.
        conversations=Conversations(MemoryStore(settings.responses_memory_bytes)
                                    if isinstance(store, MemoryStore) else store, settings),
        metrics=metrics, tracing=tracing,
    )
    metrics.watch(
        queue_depth=lambda: engine.queue_depth,
        redis_up=(lambda: float(store.state == "up")) if settings.redis_url else None,
    )
    routes: list[Route] = []
    routes += meta.routes(service, routes)
    routes += infer.routes(service)
    routes += openai_api.routes(service)
    routes += anthropic_api.routes(service)
    routes += responses_api.routes(service)
    routes += tokens.routes(service)
    limited = frozenset(route.template for route in routes if route.limited)

    # The request path, innermost first; read bottom-up it is the order a request meets them.
    router = Router(routes)
    app: ASGIApp = router
    if settings.rate_limit_enabled:
        app = limit(app, store=store, settings=settings, paths=limited, tracing=tracing)
    app = auth(app, keys=settings.all_api_keys)
    app = observe_metrics(app, metrics=metrics, settings=settings, route_of=router.template_for)
    app = tracing_middleware(app, traces=tracing)
    app = errors(app, dialect_of=router.dialect_for, on_error=lambda code: metrics.errors.labels(code).inc())
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
                self.service.lifecycle.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.service.lifecycle.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return
