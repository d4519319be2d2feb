"""Generations as handlers start them: the engine's admission, the token budget, the deadline, the generation's span
and metrics (time to first token, time per output token, usage), and the engine's errors as HTTP errors; and
reading whole answers while watching for the client to leave."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, Callable

from opentelemetry.trace import Span, Status, StatusCode, Tracer

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
from ..telemetry.tracing import Metrics, exemplar
from ..web.errors import HTTPError
from ..web.http import Receive, Scope
from ..web.state import state
from .limits import TokenBudget

NOT_READY_RETRY_AFTER = "5"


class Generator:
    """Starts an engine's generations for the handlers; `model()` is the served model or a 503 while none is ready."""

    def __init__(self, settings: Settings, engine: Engine, *, budget: TokenBudget, metrics: Metrics, tracer: Tracer,
                 model: Callable[[], ModelInfo]) -> None:
        self.settings = settings
        self.engine = engine
        self.budget = budget
        self.metrics = metrics
        self.tracer = tracer
        self.model = model
        # prometheus-client's labels() takes a lock and builds a key each call: the two children, kept.
        self._prompt_tokens = metrics.tokens.labels("prompt")
        self._completion_tokens = metrics.tokens.labels("completion")

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
        request = request.for_caller(client or "", deadline(self.settings, scope, request.stream))
        # The engine's refusals (no room in the queue, a prompt too long to tokenize) come before any work they
        # would waste: the token budget's round trip, rendering, tokenizing.
        try:
            admission = self.engine.admit(request, n)
        except EngineError as exc:
            raise engine_http_error(exc) from None
        try:
            reserved = await self.budget.reserve(client, request.params.max_tokens * n)
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
            self.budget.refund(client, reserved)
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            span.end()
            if isinstance(exc, EngineError):
                raise engine_http_error(exc) from None
            raise

        def finished(group: _Group) -> None:
            self.budget.refund(client, reserved - sum(g.completion_tokens for g in generations))
            self._record(group, generations, span, started, scope)

        group = _Group(len(generations), span, started, self.metrics, finished)
        return [_Observed(generation, group) for generation in generations]

    def _record(self, group: "_Group", generations: list[Generation], span: Span, started: float,
                scope: Scope | None) -> None:
        now = time.perf_counter()
        prompt, completion = generations[0].prompt_tokens, sum(g.completion_tokens for g in generations)
        if scope is not None:
            state(scope).usage = {"prompt_tokens": prompt, "completion_tokens": completion}
        self._prompt_tokens.inc(prompt)
        self._completion_tokens.inc(completion)
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


def deadline(settings: Settings, scope: Scope | None, stream: bool) -> float:
    """When the answer must be complete: REQUEST_TIMEOUT_SECONDS from now, or sooner if the client says so
    (X-Request-Timeout: seconds; for a whole answer, also the OpenAI SDKs' X-Stainless-Read-Timeout, as
    its read timeout is then the time it waits for the whole answer)."""
    limit = settings.request_timeout_seconds
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


def _inner(name: str) -> property:
    return property(lambda self: getattr(self._inner, name), doc=f"The generation's {name}.")


class _Observed:
    """A Generation that is measured and traced: its first and last token, and its end however it ends."""

    __slots__ = ("_inner", "_group", "first_token", "last")

    def __init__(self, inner: Generation, group: _Group) -> None:
        self._inner = inner
        self._group: _Group | None = group
        group.members.append(self)
        self.first_token: float | None = None
        self.last = 0.0

    # The Generation protocol's attributes as properties: renderers read them several times a request, and each
    # read through __getattr__ costs a failed lookup first (0.9 us against 0.1).
    prompt_tokens = _inner("prompt_tokens")
    completion_tokens = _inner("completion_tokens")
    finish_reason = _inner("finish_reason")
    logprobs = _inner("logprobs")
    reasoning = _inner("reasoning")
    tool_calls = _inner("tool_calls")
    reused_prompt_tokens = _inner("reused_prompt_tokens")
    stop_sequence = _inner("stop_sequence")

    def __getattr__(self, name: str) -> Any:  # what an engine's own generation adds (a relay's answer_id)
        return getattr(self._inner, name)

    def take_reasoning(self) -> str:
        return self._inner.take_reasoning()

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
