"""Telemetry built per app (no globals): the Prometheus registry with every metric family, and the tracer.

Metric names and labels are the contract with dashboards and alerts (k8s/components/monitoring/); labels are low
cardinality only: route templates, never raw paths.
"""

from __future__ import annotations

import logging
import random
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .. import SERVICE_NAME, __version__
from ..config import Settings
from .record import span_record
from ..web.http import Scope
from ..web.state import state

log = logging.getLogger(__name__)

# HTTP latency: from a cache hit (sub-millisecond) to a long generation (minutes).
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Time to first token: prompt evaluation, tens of milliseconds on a GPU to seconds on a CPU.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40)
# Time per output token: ~5 ms on a GPU, 10-100 ms on a CPU.
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1)
GENERATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300, 600)


class Metrics:
    """Every metric family the service exports, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("inference_http_requests", "HTTP requests answered",
                                ["method", "route", "status"], registry=registry)
        self.duration = Histogram("inference_http_request_duration_seconds",
                                  "Time from request to the end of the response (streams: the last event)",
                                  ["method", "route"], buckets=REQUEST_BUCKETS, registry=registry)
        self.in_flight = Gauge("inference_requests_in_flight", "HTTP requests being handled", registry=registry)
        self.queue_depth = Gauge("inference_queue_depth", "Requests accepted and waiting for the engine",
                                 registry=registry)
        self.cache = Counter("inference_cache_requests", "Response cache outcomes of the inference endpoints",
                             ["result"], registry=registry)
        self.rate_limited = Counter("inference_rate_limited", "Requests refused by a rate limit (429)",
                                    registry=registry)
        self.tokens = Counter("inference_tokens", "Tokens processed: prompt (read) and completion (generated)",
                              ["kind"], registry=registry)
        self.reused = Counter("inference_prompt_tokens_reused",
                              "Prompt tokens taken from the KV cache of an earlier sequence instead of evaluated",
                              registry=registry)
        self.ttft = Histogram("inference_time_to_first_token_seconds",
                              "Time from the start of a generation to its first token", buckets=TTFT_BUCKETS,
                              registry=registry)
        self.tpot = Histogram("inference_time_per_output_token_seconds",
                              "Mean time between output tokens after the first, per generation",
                              buckets=TPOT_BUCKETS, registry=registry)
        self.generation = Histogram("inference_generation_duration_seconds",
                                    "Time from the start of a generation to its end", buckets=GENERATION_BUCKETS,
                                    registry=registry)
        self.errors = Counter("inference_errors", "Error responses by error code (internal_error: a bug)",
                              ["type"], registry=registry)
        self.redis_up = Gauge("inference_redis_up", "1 when Redis answers, 0 when it does not (only with REDIS_URL)",
                              registry=registry)
        self.stalled = Gauge("inference_engine_stalled",
                             "1 while the watchdog finds work in flight but no engine progress (then /ready is 503)",
                             registry=registry)
        self.stalls = Counter("inference_engine_stalls", "Times the watchdog found the engine stalled",
                              registry=registry)
        self.engine_restarts = Counter("inference_engine_restarts",
                                       "Deaths of the engine process by cause (a signal's name, or exit), each followed "
                                       "by a restart unless it made a crash loop", ["cause"], registry=registry)
        self.spans_dropped = Counter("inference_spans_dropped",
                                     "Trace spans dropped because export fell behind (the pipe to the export process or its "
                                     "queue, OTEL_BSP_MAX_QUEUE_SIZE, full) or the export process died",
                                     registry=registry)
        self.model_info = Gauge("inference_model_info", "The served model (value 1)",
                                ["model", "revision", "backend"], registry=registry)
        for result in ("hit", "miss", "bypass"):
            self.cache.labels(result)
        for kind in ("prompt", "completion"):
            self.tokens.labels(kind)

    def watch(self, *, queue_depth: Callable[[], float], redis_up: Callable[[], float] | None) -> None:
        """Gauges read at scrape time."""
        self.queue_depth.set_function(queue_depth)
        if redis_up is None:
            self.registry.unregister(self.redis_up)
        else:
            self.redis_up.set_function(redis_up)


class _NoSpan:
    """Stands in for a span when nothing is traced: entering it and setting attributes cost nothing."""

    def __enter__(self) -> "_NoSpan":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def set_attribute(self, key: str, value: Any) -> None:
        pass


NO_SPAN = _NoSpan()


def _exception_attributes(exc: BaseException) -> dict[str, str]:
    """The attributes of the event the SDK's `Span.record_exception` adds."""
    module, name = type(exc).__module__, type(exc).__qualname__
    return {
        "exception.type": f"{module}.{name}" if module and module != "builtins" else name,
        "exception.message": str(exc),
        "exception.stacktrace": "".join(traceback.format_exception(exc)),
    }


def span(scope: Scope, tracing: "Tracing", name: str, **attributes: Any) -> Any:
    """A child of the request's span for a `with` block (an INTERNAL RecordedSpan, never made current: nothing
    under the request's children starts spans of its own), or NO_SPAN when the request is not recorded (its
    children would not be either: the SDK's samplers decide per trace) or not traced at all."""
    # The request's SERVER span, set by the tracing middleware: recording or not (an unsampled request's span still
    # carries its trace id onward). Read from the request's state rather than the context.
    parent = state(scope).span
    if parent is None or tracing.processor is None or not parent.is_recording():
        return NO_SPAN
    context = parent.get_span_context()
    return RecordedSpan(tracing, trace.SpanContext(context.trace_id, _span_id(), False, context.trace_flags,
                                                   context.trace_state), context, name, INTERNAL, attributes)


def exemplar(span: trace.Span | None = None) -> dict[str, str] | None:
    """The trace of `span` (default: the current span) when it is recorded and sampled, to link a histogram
    bucket to it (OpenMetrics exemplars)."""
    if span is None:
        span = trace.get_current_span()
    if not span.is_recording():
        return None
    context = span.get_span_context()
    if not context.trace_flags.sampled:
        return None
    return {"trace_id": format(context.trace_id, "032x")}


def trace_id(span: trace.Span | None) -> str | None:
    """The trace id of `span` for a log line: recorded or not, it is the id the caller and the upstream see."""
    if span is None:
        return None
    context = span.get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


class RecordedSpan(trace.Span):
    """A recorded span without the SDK's span machinery: a sampled request's SERVER span (`Tracing.server_span`)
    and its children (`span`). The SDK's `start_span` costs 13-15 us a span here (sampler, locks, bounded attribute
    maps, a snapshot copy at the end); this gathers attributes in a dict and hands one record to the export process
    at the end (export.py): the span the SDK would have recorded (tests compare them). The generation span (the
    SDK's), the upstream backend's `traceparent` and log lines use it through the context as any span. Used as a
    context manager it records an escaping exception and sets the status, as `start_as_current_span` does. Unlike
    the SDK's span it applies no attribute limits (OTEL_SPAN_*_LIMIT): the service sets a fixed, small set."""

    __slots__ = ("tracing", "context", "parent", "name", "kind", "attributes", "start")
    # Set on the instance only when they change: most spans end as they started.
    status = StatusCode.UNSET
    description: str | None = None
    events: tuple[tuple[str, int, Any], ...] = ()
    ended = False

    def __init__(self, tracing: "Tracing", context: trace.SpanContext, parent: trace.SpanContext | None,
                 name: str, kind: int, attributes: dict[str, Any] | None = None) -> None:
        self.tracing = tracing
        self.context = context
        self.parent = parent
        self.name = name
        self.kind = kind
        self.attributes: dict[str, Any] = attributes if attributes is not None else {}
        self.start = time.time_ns()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self.record_exception(exc)
            self.set_status(StatusCode.ERROR, f"{kind.__name__}: {exc}")  # type: ignore[union-attr]
        self.end()

    def get_span_context(self) -> trace.SpanContext:
        return self.context

    def is_recording(self) -> bool:
        return not self.ended

    def set_attribute(self, key: str, value: Any) -> None:
        self.attributes[key] = value

    def set_attributes(self, attributes: Any) -> None:
        self.attributes.update(attributes)

    def add_event(self, name: str, attributes: Any = None, timestamp: int | None = None) -> None:
        self.events += ((name, timestamp or time.time_ns(), dict(attributes) if attributes else None),)

    def update_name(self, name: str) -> None:
        self.name = name

    def set_status(self, status: Any, description: str | None = None) -> None:
        if self.status is StatusCode.OK:
            return  # final, as in the SDK
        if isinstance(status, Status):
            status, description = status.status_code, status.description
        self.status = status
        self.description = description if status is StatusCode.ERROR else None

    def record_exception(self, exception: BaseException, attributes: Any = None, timestamp: int | None = None,
                         escaped: bool = False) -> None:
        recorded = _exception_attributes(exception)
        recorded["exception.escaped"] = str(escaped)  # after the others, in the SDK's order
        if attributes:
            recorded.update(attributes)
        self.add_event("exception", recorded, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        self.tracing.processor.add(span_record(
            self.name, self.kind, self.context, self.parent, self.start, end_time or time.time_ns(), self.attributes,
            self.events or None, self.status.value, self.description, SCOPE))


SERVER, INTERNAL = trace.SpanKind.SERVER.value, trace.SpanKind.INTERNAL.value


class HeadSampler:
    """The sampling decision for a request, taken before anything else is built. The sampler is the SDK's, made
    from OTEL_TRACES_SAMPLER(_ARG) at start-up; the built-in ones (always_on, always_off, traceidratio and their
    parentbased_ forms, with the default delegates) are decided here in a few operations, the same way the SDK
    decides them; `decides` is False for any other sampler, which the SDK's tracer then applies itself."""

    def __init__(self, sampler: Any) -> None:
        from opentelemetry.sdk.trace import sampling

        self.parent_based = isinstance(sampler, sampling.ParentBased)
        root = getattr(sampler, "_root", None) if self.parent_based else sampler
        delegates = ([getattr(sampler, f"_{name}", None) for name in ("remote_parent_sampled",
                                                                       "remote_parent_not_sampled")]
                     if self.parent_based else [sampling.ALWAYS_ON, sampling.ALWAYS_OFF])
        self.bound: int | None = None
        if delegates == [sampling.ALWAYS_ON, sampling.ALWAYS_OFF]:
            if root is sampling.ALWAYS_ON:
                self.bound = 2**64
            elif root is sampling.ALWAYS_OFF:
                self.bound = 0
            elif type(root) is sampling.TraceIdRatioBased:
                self.bound = root.bound
        self.decides = self.bound is not None

    def sampled(self, trace_id: int, parent: trace.SpanContext | None) -> bool:
        if parent is not None and self.parent_based:
            return parent.trace_flags.sampled
        return trace_id & 0xFFFFFFFFFFFFFFFF < self.bound  # type: ignore[operator]


@dataclass
class Tracing:
    tracer: trace.Tracer
    provider: Any = None  # the SDK's TracerProvider, or None when nothing is exported
    processor: Any = None  # its span processor (export.ExportProcess), which RecordedSpans feed directly
    sampler: HeadSampler | None = None

    def server_span(self, name: str, parent: trace.SpanContext | None) -> trace.Span:
        """The request's SERVER span under the caller's `parent` (None: a new trace): a RecordedSpan when sampled,
        else a span that records nothing but carries the trace id and the unsampled flag onward."""
        sampler = self.sampler
        if sampler is None or not sampler.decides:
            return self.tracer.start_span(name, context=trace.set_span_in_context(trace.NonRecordingSpan(parent))
                                          if parent is not None else None, kind=trace.SpanKind.SERVER)
        trace_id = parent.trace_id if parent is not None else _trace_id()
        state = parent.trace_state if parent is not None else None
        if sampler.sampled(trace_id, parent):
            return RecordedSpan(self, trace.SpanContext(trace_id, _span_id(), False, SAMPLED, state), parent, name,
                                SERVER)
        return trace.NonRecordingSpan(trace.SpanContext(trace_id, _span_id(), False, UNSAMPLED, state))

    def shutdown(self) -> None:
        """Export the spans still batched, then stop the export process."""
        if self.provider is not None:
            self.provider.shutdown()


SCOPE = (SERVICE_NAME, __version__, None, None)  # the instrumentation scope of the service's spans (a record's)


SAMPLED, UNSAMPLED = trace.TraceFlags(trace.TraceFlags.SAMPLED), trace.TraceFlags(trace.TraceFlags.DEFAULT)


def _trace_id() -> int:
    """A random non-zero trace id, as the SDK's RandomIdGenerator makes them."""
    while True:
        trace_id = random.getrandbits(128)
        if trace_id:
            return trace_id


def _span_id() -> int:
    """A random non-zero span id, as the SDK's RandomIdGenerator makes them."""
    while True:
        span_id = random.getrandbits(64)
        if span_id:
            return span_id


def create_tracing(settings: Settings, metrics: Metrics | None = None) -> Tracing:
    """An SDK tracer exporting over OTLP in batches, or a no-op tracer when tracing is off or has nowhere to go.
    Spans dropped on the way (export.py) are counted in `metrics`."""
    if not settings.otel_enabled or not settings.otel_exporter_otlp_endpoint:
        return Tracing(trace.NoOpTracer())
    from opentelemetry.sdk.trace import TracerProvider

    from .export import ExportProcess

    # The export process (export.py) builds the exporter and the resource from these; Resource.create there also
    # reads OTEL_RESOURCE_ATTRIBUTES, the batch processor OTEL_BSP_* and the exporter OTEL_EXPORTER_OTLP_*; the
    # sampler here reads OTEL_TRACES_SAMPLER(_ARG), as in any OpenTelemetry SDK.
    config = {
        "endpoint": settings.otel_exporter_otlp_endpoint.rstrip("/"),
        "protocol": settings.otel_exporter_otlp_protocol,
        "resource": {"service.name": settings.otel_service_name, "service.version": __version__,
                     "deployment.environment.name": settings.environment},
        "log_level": settings.log_level, "log_format": settings.log_format,
    }
    dropped = metrics.spans_dropped.inc if metrics is not None else (lambda n: None)
    processor = ExportProcess(config, on_drop=dropped)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    log.info("exporting traces to %s (%s)", config["endpoint"], config["protocol"])
    return Tracing(provider.get_tracer(SERVICE_NAME, __version__), provider, processor, HeadSampler(provider.sampler))
