"""Telemetry built per app (no globals): the Prometheus registry with every metric family, and the tracer.

Metric names and labels are the contract with dashboards and alerts (k8s/components/monitoring/); labels are low
cardinality only: route templates, never raw paths.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from . import SERVICE_NAME, __version__
from .config import Settings

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


def span(tracer: trace.Tracer, name: str, **attributes: Any) -> Any:
    """`tracer.start_as_current_span(name)`, or NO_SPAN when nothing would be recorded: no tracer, or a request
    whose own span was not sampled (its children would not be either: the SDK's samplers decide per trace)."""
    if isinstance(tracer, trace.NoOpTracer) or not trace.get_current_span().is_recording():
        return NO_SPAN
    return tracer.start_as_current_span(name, attributes=attributes or None)


def exemplar() -> dict[str, str] | None:
    """The current trace, to link a histogram bucket to it (OpenMetrics exemplars)."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid or not context.trace_flags.sampled:
        return None
    return {"trace_id": format(context.trace_id, "032x")}


def trace_id() -> str | None:
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


@dataclass
class Tracing:
    tracer: trace.Tracer
    provider: Any  # the SDK's TracerProvider, or None when nothing is exported

    def shutdown(self) -> None:
        """Flush the spans still in the batch, then stop the exporter."""
        if self.provider is not None:
            self.provider.shutdown()


def create_tracing(settings: Settings) -> Tracing:
    """An SDK tracer exporting over OTLP in batches, or a no-op tracer when tracing is off or has nowhere to go."""
    if not settings.otel_enabled or not settings.otel_exporter_otlp_endpoint:
        return Tracing(trace.NoOpTracer(), None)
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    endpoint = settings.otel_exporter_otlp_endpoint.rstrip("/")
    if settings.otel_exporter_otlp_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        exporter: Any = GrpcExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        # As the spec says for OTEL_EXPORTER_OTLP_ENDPOINT: the signal's path is appended.
        exporter = HttpExporter(endpoint=f"{endpoint}/v1/traces")
    # Resource.create also reads OTEL_RESOURCE_ATTRIBUTES; the sampler and the batch processor read
    # OTEL_TRACES_SAMPLER(_ARG) and OTEL_BSP_* from the environment, as in any OpenTelemetry SDK.
    resource = Resource.create({"service.name": settings.otel_service_name, "service.version": __version__,
                                "deployment.environment.name": settings.environment})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    log.info("exporting traces to %s (%s)", endpoint, settings.otel_exporter_otlp_protocol)
    return Tracing(provider.get_tracer(SERVICE_NAME, __version__), provider)
