"""Service: what the handlers share (settings, the engine, readiness) and the engine's error mapping."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import replace
from typing import Any, Awaitable, Callable

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

from ..config import Settings
from ..engine.base import (
    ContextLengthExceeded,
    Engine,
    EngineError,
    EngineNotReady,
    EngineOverloaded,
    EngineRestarted,
    Generation,
    GenerationRequest,
    InvalidPrompt,
    ModelInfo,
    QueueTimeout,
    RequestTimeout,
    UpstreamError,
)
from ..web.errors import HTTPError
from ..web.http import Receive, Request, Response, Scope
from .cache import ResponseCache
from .idempotency import Idempotency
from ..middleware.limit import refusal, store_unavailable
from ..middleware.metrics import USAGE_KEY
from ..store.base import Policy, Store, StoreUnavailable
from ..telemetry.tracing import Metrics, Tracing, exemplar

log = logging.getLogger("inference")

NOT_READY_RETRY_AFTER = "5"
ABORT_MARGIN = 2.0  # seconds before the server's own graceful-shutdown timeout at which requests are ended


class Service:
    """Owns the engine's life: loads it in the background at start-up, reports readiness, closes it at shutdown."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        store: Store,
        *,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
        owns_engine: bool = True,
        on_fatal: Callable[[], None] | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.metrics = metrics or Metrics()
        self.tracing = tracing or Tracing(trace.NoOpTracer(), None)
        self.tracer = self.tracing.tracer
        self.cache = ResponseCache(store, settings, metrics=self.metrics, tracing=self.tracing)
        self.idempotency = Idempotency(store, settings)
        self.owns_engine = owns_engine
        self.on_fatal = on_fatal
        self.on_ready = on_ready
        self.token_policy = (
            Policy("tokens", settings.rate_limit_tokens_per_minute, 60, settings.rate_limit_tokens_per_minute)
            if settings.rate_limit_enabled and settings.rate_limit_tokens_per_minute else None
        )
        engine.on_restart = lambda cause: self.metrics.engine_restarts.labels(cause).inc()
        self._background: set[asyncio.Task[None]] = set()
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

    # --- requests ------------------------------------------------------------------------------

    async def respond(self, request: Request, material: dict[str, Any], deterministic: bool,
                      produce: Callable[[], Awaitable[Response]]) -> Response:
        """An inference request's answer: a retry's first answer (Idempotency-Key), else the cache's, else
        `produce()`'s. `material` is the normalized request (the cache key's and the retry check's)."""
        return await self.idempotency.serve(
            request, material, lambda: self.cache.serve(request, material, deterministic, produce))

    @property
    def model_id(self) -> str:
        """The model's id on /v1: SERVED_MODEL_NAME, else the engine's name for it (once loaded)."""
        return self.settings.served_model_name or self.engine.info.name

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

    async def generate(
        self, request: GenerationRequest, client: str | None = None, scope: Scope | None = None
    ) -> Generation:
        """Start a generation, translating the engine's refusals into HTTP errors.

        With a token budget (RATE_LIMIT_TOKENS_PER_MINUTE), `client` first reserves max_tokens; what is not
        generated is refunded. The generation is traced and measured; its usage lands in `scope` at the end.
        """
        return (await self.generate_many(request, 1, client, scope))[0]

    async def generate_many(
        self, request: GenerationRequest, n: int, client: str | None = None, scope: Scope | None = None
    ) -> list[Generation]:
        """`n` answers to one request (OpenAI's `n`), as `generate`: one span, one reservation of n x max_tokens,
        usage counting the prompt once and every choice's tokens."""
        info = self.model()
        request = replace(request, client=client or "", deadline=self._deadline(scope, request.stream))
        # The engine's refusals (no room in the queue, a prompt too long to tokenize) come before any work they
        # would waste: the token budget's round trip, rendering, tokenizing.
        try:
            admission = self.engine.admit(request, n)
        except EngineError as exc:
            raise engine_http_error(exc) from None
        try:
            reserved = await self._reserve(request, client, n) if self.token_policy and client else 0
        except BaseException:
            admission.release()
            raise
        attributes = _generation_attributes(request, info)
        if n > 1:
            attributes["gen_ai.request.choice.count"] = n
        span = self.tracer.start_span(
            f"{'chat' if request.messages is not None else 'text_completion'} {info.name}", attributes=attributes)
        started = time.perf_counter()
        try:
            generations = ([await self.engine.generate(request, admission)] if n == 1
                           else await self.engine.generate_many(request, n, admission))
        except BaseException as exc:
            self._refund(client, reserved)
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            span.end()
            if isinstance(exc, EngineError):
                raise engine_http_error(exc) from None
            raise

        def finished(group: _Group) -> None:
            self._refund(client, reserved - sum(g.completion_tokens for g in generations))
            self._record(group, generations, span, started, scope)

        group = _Group(len(generations), span, started, self.metrics, finished)
        return [_Observed(generation, group) for generation in generations]

    def _record(self, group: "_Group", generations: list[Generation], span: Span, started: float,
                scope: Scope | None) -> None:
        now = time.perf_counter()
        prompt, completion = generations[0].prompt_tokens, sum(g.completion_tokens for g in generations)
        if scope is not None:
            scope[USAGE_KEY] = {"prompt_tokens": prompt, "completion_tokens": completion}
        self.metrics.tokens.labels("prompt").inc(prompt)
        self.metrics.tokens.labels("completion").inc(completion)
        reused = sum(g.reused_prompt_tokens for g in generations)
        if reused:
            self.metrics.reused.inc(reused)
        example = exemplar()
        self.metrics.generation.observe(now - started, example)
        for observed, generation in zip(group.members, generations):
            if observed.first_token is not None and generation.completion_tokens > 1:
                self.metrics.tpot.observe((observed.last - observed.first_token) / (generation.completion_tokens - 1),
                                          example)
        span.set_attribute("gen_ai.usage.input_tokens", prompt)
        span.set_attribute("gen_ai.usage.output_tokens", completion)
        span.set_attribute("gen_ai.response.finish_reasons",
                           tuple(g.finish_reason or "cancelled" for g in generations))
        error = group.error
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, str(error)))
        span.end()

    def _deadline(self, scope: Scope | None, stream: bool) -> float:
        """When the answer must be complete: REQUEST_TIMEOUT_SECONDS from now, or sooner if the client says so
        (X-Request-Timeout: seconds; for a whole answer, also the OpenAI SDKs' X-Stainless-Read-Timeout, as
        its read timeout is then the time it waits for the whole answer)."""
        limit = self.settings.request_timeout_seconds
        headers = dict(scope["headers"]) if scope is not None else {}
        asked = headers.get(b"x-request-timeout")
        if asked is not None:
            seconds = _seconds(asked)
            if seconds is None:
                raise HTTPError(400, "invalid_header", "X-Request-Timeout must be a positive number of seconds",
                                field="X-Request-Timeout")
            limit = min(limit, seconds)
        sdk = headers.get(b"x-stainless-read-timeout")
        if sdk is not None and not stream and (seconds := _seconds(sdk)) is not None:
            limit = min(limit, seconds)
        return time.monotonic() + limit

    async def _reserve(self, request: GenerationRequest, client: str, n: int = 1) -> int:
        policy = self.token_policy
        assert policy is not None
        cost = min(request.params.max_tokens * n, policy.burst)
        try:
            decision = await self.store.acquire(self._token_key(client), policy, cost)
        except StoreUnavailable:
            if self.settings.rate_limit_fail_open:
                return 0
            raise store_unavailable() from None
        if not decision.allowed:
            message = f"token budget of {policy.limit} tokens per minute exceeded (this request reserves {cost})"
            raise refusal("tokens_rate_limited", message, policy, decision)
        return cost

    def _token_key(self, client: str) -> str:
        return f"{self.settings.redis_key_prefix}:tpm:{client}"

    def _refund(self, client: str | None, units: int) -> None:
        if units <= 0 or client is None or self.token_policy is None:
            return
        task = asyncio.get_running_loop().create_task(self._refund_now(client, units))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refund_now(self, client: str, units: int) -> None:
        assert self.token_policy is not None
        try:
            await self.store.refund(self._token_key(client), self.token_policy, units)
        except StoreUnavailable:
            pass


class _Group:
    """The generations of one request: the first token of any of them is its time to first token, and it is
    recorded once all of them have ended, however each ended."""

    def __init__(self, size: int, span: Span, started: float, metrics: Metrics,
                 on_end: Callable[["_Group"], None]) -> None:
        self.left = size
        self.span = span
        self.started = started
        self.metrics = metrics
        self.on_end = on_end
        self.first_token: float | None = None
        self.error: BaseException | None = None
        self.members: list[_Observed] = []

    def first(self, now: float) -> None:
        if self.first_token is None:
            self.first_token = now
            self.metrics.ttft.observe(now - self.started, exemplar())
            self.span.add_event("gen_ai.first_token")

    def ended(self, error: BaseException | None) -> None:
        if error is not None and not isinstance(error, (StopAsyncIteration, GeneratorExit, asyncio.CancelledError)):
            self.error = error
        self.left -= 1
        if self.left == 0:
            self.on_end(self)


class _Observed:
    """A Generation that is measured and traced: its first and last token, and its end however it ends."""

    def __init__(self, inner: Generation, group: _Group) -> None:
        self._inner = inner
        self._group: _Group | None = group
        group.members.append(self)
        self.first_token: float | None = None
        self.last = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __aiter__(self) -> "_Observed":
        return self

    async def __anext__(self) -> str:
        try:
            piece = await self._inner.__anext__()
        except BaseException as exc:
            self.last = time.perf_counter()
            self._end(exc)
            raise
        if self.first_token is None:
            self.first_token = time.perf_counter()
            if self._group is not None:
                self._group.first(self.first_token)
        return piece

    def cancel(self) -> None:
        self._inner.cancel()

    async def aclose(self) -> None:
        await self._inner.aclose()
        if not self.last:
            self.last = time.perf_counter()
        self._end(None)

    def _end(self, error: BaseException | None) -> None:
        if self._group is not None:
            group, self._group = self._group, None
            group.ended(error)


def http_error_of(exc: EngineError | HTTPError) -> HTTPError:
    """What to tell the client about a failure during generation, whichever layer raised it."""
    return exc if isinstance(exc, HTTPError) else engine_http_error(exc)


def engine_http_error(exc: EngineError) -> HTTPError:
    """The HTTP answer to an engine's refusal or failure."""
    if isinstance(exc, ContextLengthExceeded):
        return HTTPError(400, "context_length_exceeded", str(exc), field="prompt")
    if isinstance(exc, InvalidPrompt):
        return HTTPError(400, "invalid_prompt", str(exc), field=exc.field)
    if isinstance(exc, EngineOverloaded):
        return HTTPError(503, "overloaded", str(exc), headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, QueueTimeout):
        return HTTPError(503, "queue_timeout", str(exc), headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, RequestTimeout):
        return HTTPError(504, "timeout", str(exc))
    if isinstance(exc, EngineRestarted):
        return HTTPError(503, "engine_restarted", str(exc), headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, EngineNotReady):
        return HTTPError(503, "model_not_ready", str(exc), headers={"Retry-After": NOT_READY_RETRY_AFTER})
    if isinstance(exc, UpstreamError):
        headers = {"Retry-After": exc.retry_after} if exc.retry_after else {}
        return HTTPError(exc.status, exc.code, str(exc), field=exc.field, headers=headers)
    return HTTPError(500, "engine_error", str(exc))


async def complete(generation: Generation, receive: Receive) -> str | None:
    """The whole text of `generation`, or None if the client disconnected (the generation is then cancelled)."""
    texts = await complete_all([generation], receive)
    return None if texts is None else texts[0]


async def complete_all(generations: list[Generation], receive: Receive) -> list[str] | None:
    """The whole text of each generation (read side by side), or None if the client disconnected (all are then
    cancelled)."""

    async def text(generation: Generation) -> str:
        return "".join([piece async for piece in generation])

    watcher = asyncio.ensure_future(_cancel_on_disconnect(receive, generations))
    try:
        if len(generations) == 1:
            texts = [await text(generations[0])]
        else:
            results = await asyncio.gather(*(text(g) for g in generations), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            texts = list(results)  # type: ignore[arg-type]
    except EngineError as exc:
        raise engine_http_error(exc) from None
    finally:
        watcher.cancel()
        for generation in generations:
            await generation.aclose()
    return texts if all(g.finish_reason is not None for g in generations) else None


async def _cancel_on_disconnect(receive: Receive, generations: list[Generation]) -> None:
    # Once the body has been read, receive() only returns when the client goes away.
    while (await receive())["type"] != "http.disconnect":
        pass
    for generation in generations:
        generation.cancel()


def _seconds(raw: bytes) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if 0 < value < math.inf else None


def _url_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::") else (f"[{host}]" if ":" in host else host)


def _generation_attributes(request: GenerationRequest, info: ModelInfo) -> dict[str, Any]:
    """OpenTelemetry GenAI semantic-convention attributes of a generation's span."""
    params = request.params
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat" if request.messages is not None else "text_completion",
        "gen_ai.provider.name": info.backend,
        "gen_ai.request.model": info.name,
        "gen_ai.request.max_tokens": params.max_tokens,
        "gen_ai.request.temperature": params.temperature,
        "gen_ai.request.top_p": params.top_p,
    }
    if params.stop:
        attributes["gen_ai.request.stop_sequences"] = params.stop
    if params.seed is not None:
        attributes["gen_ai.request.seed"] = params.seed
    return attributes
