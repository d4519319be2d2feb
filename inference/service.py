"""Service: what the handlers share (settings, the engine, readiness) and the engine's error mapping."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from .config import Settings
from .engine.base import (
    ContextLengthExceeded,
    Engine,
    EngineError,
    EngineNotReady,
    EngineOverloaded,
    Generation,
    GenerationRequest,
    InvalidPrompt,
    UpstreamError,
)
from .errors import HTTPError
from .http import Receive

log = logging.getLogger("inference")

NOT_READY_RETRY_AFTER = "5"


class Service:
    """Owns the engine's life: loads it in the background at start-up, reports readiness, closes it at shutdown."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        owns_engine: bool = True,
        on_fatal: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.owns_engine = owns_engine
        self.on_fatal = on_fatal
        self.state = "loading"
        self.reason: str | None = "the model is loading"
        self._load_task: asyncio.Task[None] | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._load_task = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        try:
            if not self.engine.loaded:
                await asyncio.to_thread(self.engine.load)
        except Exception as exc:
            self.state, self.reason = "failed", f"the model failed to load: {exc}"
            log.error("%s", self.reason)
            if self.on_fatal is not None:
                self.on_fatal()
            return
        self.state, self.reason = "ready", None
        info = self.engine.info
        log.info(
            "ready: http://%s:%s serving %s (revision %s, %s)",
            _url_host(self.settings.host), self.settings.port, info.name, info.revision, info.backend,
        )

    async def stop(self) -> None:
        self.state, self.reason = "stopping", "the service is shutting down"
        if self._load_task is not None and not self._load_task.done():
            await asyncio.wait({self._load_task}, timeout=30)
        if self.owns_engine:
            await self.engine.close()

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    # --- requests ------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> Generation:
        """Start a generation, translating the engine's refusals into HTTP errors."""
        if not self.ready:
            raise HTTPError(503, "model_not_ready", self.reason or "the model is not ready",
                            headers={"Retry-After": NOT_READY_RETRY_AFTER})
        try:
            return await self.engine.generate(request)
        except EngineError as exc:
            raise engine_http_error(exc) from None


def engine_http_error(exc: EngineError) -> HTTPError:
    """The HTTP answer to an engine's refusal or failure."""
    if isinstance(exc, ContextLengthExceeded):
        return HTTPError(400, "context_length_exceeded", str(exc), field="prompt")
    if isinstance(exc, InvalidPrompt):
        return HTTPError(400, "invalid_prompt", str(exc), field="messages")
    if isinstance(exc, EngineOverloaded):
        return HTTPError(503, "overloaded", str(exc), headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, EngineNotReady):
        return HTTPError(503, "model_not_ready", str(exc), headers={"Retry-After": NOT_READY_RETRY_AFTER})
    if isinstance(exc, UpstreamError):
        headers = {"Retry-After": exc.retry_after} if exc.retry_after else {}
        return HTTPError(exc.status, exc.code, str(exc), field=exc.field, headers=headers)
    return HTTPError(500, "engine_error", str(exc))


async def complete(generation: Generation, receive: Receive) -> str | None:
    """The whole text of `generation`, or None if the client disconnected (the generation is then cancelled)."""
    watcher = asyncio.ensure_future(_cancel_on_disconnect(receive, generation))
    try:
        pieces = [piece async for piece in generation]
    except EngineError as exc:
        raise engine_http_error(exc) from None
    finally:
        watcher.cancel()
        await generation.aclose()
    return "".join(pieces) if generation.finish_reason is not None else None


async def _cancel_on_disconnect(receive: Receive, generation: Generation) -> None:
    # Once the body has been read, receive() only returns when the client goes away.
    while (await receive())["type"] != "http.disconnect":
        pass
    generation.cancel()


def _url_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::") else (f"[{host}]" if ":" in host else host)
