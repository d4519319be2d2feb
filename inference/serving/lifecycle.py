"""The service's life: the engine loaded in the background at start-up, readiness told truthfully (the watchdog), the
drain on SIGTERM, and closing what the service owns at shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from ..config import Settings
from ..engine.base import Engine, ModelInfo
from ..store.base import Store
from ..telemetry.tracing import Metrics, Tracing
from ..web.errors import HTTPError
from .generation import NOT_READY_RETRY_AFTER

log = logging.getLogger("inference")

ABORT_MARGIN = 2.0  # seconds before the server's own graceful-shutdown timeout at which requests are ended


class Lifecycle:
    """Owns the engine's life (and closes the store and the tracing pipeline with it): loads it in the background at
    start-up, reports readiness, drains on SIGTERM, closes it at shutdown."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        store: Store,
        *,
        metrics: Metrics,
        tracing: Tracing,
        owns_engine: bool = True,
        on_fatal: Callable[[], None] | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.metrics = metrics
        self.tracing = tracing
        self.owns_engine = owns_engine
        self.on_fatal = on_fatal
        self.on_ready = on_ready
        engine.on_restart = lambda cause: self.metrics.engine_restarts.labels(cause).inc()
        self.state = "loading"
        self.reason: str | None = "the model is loading"
        self.stalled = False  # the watchdog's finding: work in flight, no progress for WATCHDOG_SECONDS
        self._load_task: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._load_task = self._loop.create_task(self._load())

    def drain(self) -> None:
        """SIGTERM: report not ready at once (load balancers stop sending), keep serving; the server stops
        accepting DRAIN_DELAY_SECONDS later and waits for what is in flight. Whatever has not finished
        SHUTDOWN_TIMEOUT_SECONDS after that is ended with an error (an error event on a stream), never cut
        silently. Safe to call from a signal handler or another thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        if self.state in ("draining", "stopping"):
            return
        self.state, self.reason = "draining", "the service is shutting down"
        log.info("draining: not ready; still serving for %g s, then finishing what is in flight (at most %g s)",
                 self.settings.drain_delay_seconds, self.settings.shutdown_timeout_seconds)
        timeout = self.settings.shutdown_timeout_seconds
        assert self._loop is not None
        self._loop.call_later(self.settings.drain_delay_seconds + timeout - min(ABORT_MARGIN, timeout / 4),
                              self._abort)

    def _abort(self) -> None:
        log.warning("shutdown timeout: ending the requests still in flight with an error")
        self.engine.abort()

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
        if self.state == "loading":
            self.state, self.reason = "ready", None
        if self.settings.watchdog_seconds and self.engine.progress is not None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())
        info = self.engine.info
        self.metrics.model_info.labels(info.name, info.revision, info.backend).set(1)
        log.info(
            "ready: http://%s:%s serving %s (revision %s, %s)",
            _url_host(self.settings.host), self.settings.port, info.name, info.revision, info.backend,
        )
        if self.on_ready is not None:
            self.on_ready()

    async def _watch(self) -> None:
        """Readiness that tells the truth: with work in flight and no step of the engine for WATCHDOG_SECONDS, the
        service is not ready (a load balancer routes around it) until the engine moves again; an engine process
        still stuck after ENGINE_STALL_RESTART_SECONDS is replaced."""
        limit = self.settings.watchdog_seconds
        restart_after = self.settings.engine_stall_restart_seconds
        engine = self.engine
        last, since = engine.progress, time.monotonic()
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            now, progress = time.monotonic(), engine.progress
            if engine.health is not None:  # a new engine process is starting: nothing to judge
                since = now
            elif progress != last or not engine.busy:
                last, since = progress, now
                if self.stalled:
                    log.warning("the engine is making progress again")
                self.stalled = False
            elif now - since >= limit and not self.stalled:
                self.stalled = True
                self.metrics.stalls.inc()
                log.error("the engine has made no progress for %g s with work in flight: not ready", limit)
            elif self.stalled and restart_after and now - since >= restart_after:
                # A process of its own: a stuck engine can be replaced (what runs fails, what waits is kept).
                if engine.restart(f"it made no progress for {now - since:.0f} s with requests in flight"):
                    since = now
            self.metrics.stalled.set(float(self.stalled))

    @property
    def readiness(self) -> tuple[str, str | None]:
        """("ready", None), or the state and why not: loading, failed, restarting, stalled, draining, stopping."""
        health = self.engine.health  # the engine process: restarting, or failed for good
        if health is not None and (self.state == "ready" or (self.state == "draining" and health[0] == "failed")):
            return health
        if self.state == "ready" and self.stalled:
            return "stalled", (f"the engine has made no progress for {self.settings.watchdog_seconds:g} s with "
                               "requests in flight")
        return self.state, self.reason

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.state, self.reason = "stopping", "the service is shutting down"
        if self._load_task is not None and not self._load_task.done():
            await asyncio.wait({self._load_task}, timeout=30)
        if self.owns_engine:
            await self.engine.close()
        await self.store.close()
        await asyncio.to_thread(self.tracing.shutdown)  # flushes the spans still batched

    @property
    def ready(self) -> bool:
        """The model is loaded and requests are served (also while draining: /ready says no, work goes on)."""
        return self.state in ("ready", "draining")

    def model(self) -> ModelInfo:
        """The served model, or 503 while it is not ready (a restarting engine process is: what arrives waits for
        the new one)."""
        health = self.engine.health
        if health is not None and health[0] == "failed":
            raise HTTPError(503, "model_not_ready", health[1] or "the engine failed",
                            headers={"Retry-After": NOT_READY_RETRY_AFTER})
        if not self.ready:
            raise HTTPError(503, "model_not_ready", self.reason or "the model is not ready",
                            headers={"Retry-After": NOT_READY_RETRY_AFTER})
        return self.engine.info


def _url_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::") else (f"[{host}]" if ":" in host else host)
