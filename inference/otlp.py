"""Span export over OTLP: the OpenTelemetry SDK's exporters, with a faster encoder for the batches.

The SDK's `encode_spans` builds every span and attribute as a protobuf message of its own and then hands lists of
them to the enclosing messages' constructors, which copy each one again at every level (span, scope, resource,
request): about 43 us of the export thread per span here, holding the GIL the event loop needs, and 6 times what
filling the request in place costs. `encode_spans` below fills one request in place and produces the same message
(tests/telemetry/test_otlp.py compares the two on spans of every shape); anything out of the ordinary on a span
(events, links, a value that is not a plain string, bool, int or float) goes through the SDK's own helpers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common._internal import (
    _encode_instrumentation_scope,
    _encode_resource,
    _encode_value,
)
from opentelemetry.exporter.otlp.proto.common._internal.trace_encoder import _encode_events, _encode_links
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PB2Span
from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

log = logging.getLogger(__name__)

KINDS = {
    SpanKind.INTERNAL: PB2Span.SpanKind.SPAN_KIND_INTERNAL,
    SpanKind.SERVER: PB2Span.SpanKind.SPAN_KIND_SERVER,
    SpanKind.CLIENT: PB2Span.SpanKind.SPAN_KIND_CLIENT,
    SpanKind.PRODUCER: PB2Span.SpanKind.SPAN_KIND_PRODUCER,
    SpanKind.CONSUMER: PB2Span.SpanKind.SPAN_KIND_CONSUMER,
}
LOCAL_PARENT = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
REMOTE_PARENT = LOCAL_PARENT | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def encode_spans(spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    """The OTLP request for `spans`, equal to the SDK's `encode_spans(spans)`: grouped by resource, then by
    instrumentation scope, each group in the order its first span came."""
    request = ExportTraceServiceRequest()
    groups: dict[Any, Any] = {}  # resource -> (its ResourceSpans, {scope -> its list of spans})
    by_identity: dict[tuple[int, int], Any] = {}  # (id(resource), id(scope)) -> list of spans: the fast lookup
    for span in spans:
        resource, scope = span.resource, span.instrumentation_scope or None
        out = by_identity.get((id(resource), id(scope)))
        if out is None:
            out = by_identity[id(resource), id(scope)] = _group(request, groups, resource, scope)
        _encode_span(out.add(), span)
    return request


def _group(request: ExportTraceServiceRequest, groups: dict[Any, Any], resource: Any, scope: Any) -> Any:
    """The repeated spans field of the (resource, scope) group, created when first met; equal resources and scopes
    share one group as in the SDK, which compares them by value."""
    group = groups.get(resource)
    if group is None:
        encoded = request.resource_spans.add()
        encoded.resource.CopyFrom(_encode_resource(resource))
        encoded.schema_url = resource.schema_url
        group = groups[resource] = (encoded, {})
    encoded, scopes = group
    spans = scopes.get(scope)
    if spans is None:
        scope_spans = encoded.scope_spans.add()
        scope_spans.scope.CopyFrom(_encode_instrumentation_scope(scope))
        if scope is not None and scope.schema_url:
            scope_spans.schema_url = scope.schema_url
        spans = scopes[scope] = scope_spans.spans
    return spans


def _encode_span(out: PB2Span, span: ReadableSpan) -> None:
    context, parent = span.context, span.parent
    out.trace_id = context.trace_id.to_bytes(16, "big")
    out.span_id = context.span_id.to_bytes(8, "big")
    if context.trace_state:
        out.trace_state = ",".join(f"{key}={value}" for key, value in context.trace_state.items())
    if parent is not None:
        out.parent_span_id = parent.span_id.to_bytes(8, "big")
    out.flags = REMOTE_PARENT if parent is not None and parent.is_remote else LOCAL_PARENT
    out.name = span.name
    out.kind = KINDS[span.kind]
    out.start_time_unix_nano = span.start_time or 0
    out.end_time_unix_nano = span.end_time or 0
    if span.attributes:
        _encode_attributes(out.attributes, span.attributes)
    if span.events:
        out.events.extend(_encode_events(span.events))
    if span.links:
        out.links.extend(_encode_links(span.links))
    status = out.status
    status.SetInParent()  # the SDK always sends a status, UNSET included
    if span.status.status_code.value:
        status.code = span.status.status_code.value
    if span.status.description:
        status.message = span.status.description
    out.dropped_attributes_count = span.dropped_attributes
    out.dropped_events_count = span.dropped_events
    out.dropped_links_count = span.dropped_links


def _encode_attributes(out: Any, attributes: Any) -> None:
    for key, value in attributes.items():
        kind = type(value)
        if kind is str:
            out.add(key=key).value.string_value = value
        elif kind is bool:
            out.add(key=key).value.bool_value = value
        elif kind is int and INT64_MIN <= value <= INT64_MAX:
            out.add(key=key).value.int_value = value
        elif kind is float:
            out.add(key=key).value.double_value = value
        else:
            try:
                encoded = _encode_value(value)
            except Exception as error:  # as the SDK's encoder: the attribute is left out, the span is sent
                log.exception("Failed to encode key %s: %s", key, error)
                continue
            out.add(key=key).value.CopyFrom(encoded)


def http_exporter(endpoint: str) -> Any:
    """The SDK's OTLP/HTTP span exporter (headers, compression, timeouts, retries and certificates from the
    OTEL_EXPORTER_OTLP_* environment as usual), encoding with `encode_spans` above."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    class HttpSpanExporter(OTLPSpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            client = getattr(self, "_client", None)  # the SDK's HTTP client (1.4x); otherwise the SDK's own path
            if client is None or self._shutdown:
                return super().export(spans)
            try:
                data = encode_spans(spans).SerializePartialToString()
            except Exception as error:
                log.error("Failed to encode span batch: %s", error)
                return SpanExportResult.FAILURE
            if len(data) > getattr(self, "_max_request_size", len(data)):
                return super().export(spans)  # the SDK says why it drops the batch
            return SpanExportResult.SUCCESS if client.export(data).success else SpanExportResult.FAILURE

    return HttpSpanExporter(endpoint=endpoint)


def grpc_exporter(endpoint: str, insecure: bool) -> Any:
    """The SDK's OTLP/gRPC span exporter, encoding with `encode_spans` above."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    class GrpcSpanExporter(OTLPSpanExporter):
        def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
            return encode_spans(data)

    return GrpcSpanExporter(endpoint=endpoint, insecure=insecure)


def _env_int(name: str, default: int) -> int:
    try:
        value = int(os.environ.get(name, default))
    except ValueError:
        return default  # the SDK logs it and uses its default too
    return value if value > 0 else default


class BoundedSpanProcessor(SpanProcessor):
    """The SDK's BatchSpanProcessor, with the spans it holds counted here: past OTEL_BSP_MAX_QUEUE_SIZE (2048) a
    span is dropped here instead of in the SDK, which would log a warning for every one of them, each costing
    more than the span (a log record, a stack walk) while the exporter is already behind. `on_drop(n)` counts them;
    one warning is logged per burst (export.Drops)."""

    def __init__(self, exporter: SpanExporter, on_drop: Callable[[int], None]) -> None:
        from .export import Drops

        self.capacity = _env_int("OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        batch = _env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
        # Each count is written by one thread only (spans end on one thread, batches go from the SDK's worker),
        # so no lock: `accepted - exported` is never less than what the SDK's queue holds, and the SDK's own
        # bound, one batch higher, is never reached.
        self.accepted = 0
        self.exported = 0
        self.drop = Drops(on_drop, f"span export queue full (OTEL_BSP_MAX_QUEUE_SIZE={self.capacity}): dropping "
                                   "spans until the exporter catches up, counted in inference_spans_dropped_total; "
                                   "one warning per burst")
        self.batch = BatchSpanProcessor(_Counting(exporter, self), max_queue_size=self.capacity + batch,
                                        max_export_batch_size=min(batch, self.capacity))

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if self.accepted - self.exported >= self.capacity:
            self.drop()
            return
        self.accepted += 1
        self.batch.on_end(span)

    def shutdown(self) -> None:
        self.batch.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.batch.force_flush(timeout_millis)


class _Counting(SpanExporter):
    """Passes batches on to the exporter, counting them as they leave the processor's queue."""

    def __init__(self, exporter: SpanExporter, processor: BoundedSpanProcessor) -> None:
        self.exporter = exporter
        self.processor = processor

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.processor.exported += len(spans)
        return self.exporter.export(spans)

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)
