"""Span export over OTLP: the OpenTelemetry SDK's exporters and batch processor, with a faster encoder.

The SDK's `encode_spans` builds every span and attribute as a protobuf message of its own and then hands lists of
them to the enclosing messages' constructors, which copy each one again at every level (span, scope, resource,
request): about 43 us per span here. Filling one request in place (this module's first version) took ~18 us, and
rebuilding SDK spans from the records the service sends another ~6 us. `encode_records` below writes protobuf's wire
format straight from the records, ~5 us a span (the attribute pairs, which mostly repeat, are encoded once), and
gives the bytes of the SDK's request (tests/telemetry/test_otlp.py compares them on spans of every shape); anything
out of the ordinary on a span (events, links, a value that is not a plain string, bool, int or float) goes through
the SDK's own helpers.
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
from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanContext, TraceFlags

from .record import Drops

log = logging.getLogger(__name__)

LOCAL_PARENT = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
REMOTE_PARENT = LOCAL_PARENT | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class Entry(tuple):
    """A record (export.Record) as the SDK's batch processor takes it: it only asks a span whether it is sampled,
    which every record is (the service sends no other)."""

    __slots__ = ()
    context = SpanContext(1, 1, False, TraceFlags(TraceFlags.SAMPLED))


def http_exporter(endpoint: str, resource: Any) -> Any:
    """The SDK's OTLP/HTTP span exporter (headers, compression, timeouts, retries and certificates from the
    OTEL_EXPORTER_OTLP_* environment as usual), taking records and encoding them with `encode_records`."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    from .record import rebuild

    class HttpSpanExporter(OTLPSpanExporter):
        def export(self, records: Sequence[tuple]) -> SpanExportResult:  # type: ignore[override]
            client = getattr(self, "_client", None)  # the SDK's HTTP client; otherwise the SDK's own path
            if client is None or self._shutdown:
                return super().export([rebuild(r, resource) for r in records])
            try:
                data = encode_records(records, resource)
            except Exception as error:
                log.error("Failed to encode span batch: %s", error)
                return SpanExportResult.FAILURE
            if len(data) > getattr(self, "_max_request_size", len(data)):
                return super().export([rebuild(r, resource) for r in records])  # the SDK says why it drops it
            return SpanExportResult.SUCCESS if client.export(data).success else SpanExportResult.FAILURE

    return HttpSpanExporter(endpoint=endpoint)


def grpc_exporter(endpoint: str, insecure: bool, resource: Any) -> Any:
    """The SDK's OTLP/gRPC span exporter, taking records and encoding them with `encode_records`."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    class GrpcSpanExporter(OTLPSpanExporter):
        def _translate_data(self, data: Sequence[tuple]) -> ExportTraceServiceRequest:  # type: ignore[override]
            return ExportTraceServiceRequest.FromString(encode_records(data, resource))

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
    one warning is logged per burst (record.Drops)."""

    def __init__(self, exporter: SpanExporter, on_drop: Callable[[int], None]) -> None:
        self.capacity = _env_int("OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        batch = _env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
        # Each count is written by one thread only (spans end on one thread, batches go from the SDK's worker),
        # so no lock: `accepted - exported` is never less than what the SDK's queue holds, and the SDK's own
        # bound, one batch higher, is never reached.
        self.accepted = 0
        self.exported = 0
        self.drop = Drops(on_drop, f"span export queue full (OTEL_BSP_MAX_QUEUE_SIZE={self.capacity}): dropping "
                                   "spans until the exporter catches up, counted in inference_spans_dropped_total; "
                                   "one warning per burst", log)
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


# --- The wire encoder: records (export.Record) straight to the bytes of an ExportTraceServiceRequest ---------------
#
# Filling protobuf messages costs ~18 us a span here even in place, and rebuilding SDK spans from the records to do it
# another ~6 us: together most of what the export process spends. Protobuf's wire format is simple enough to write
# directly for what the service's spans hold (strings, bools, ints, floats): each span is a few bytes.join()s.
# Anything rarer (events, links, array or other values) is encoded by the SDK's own helpers and embedded as bytes.
# The result is byte for byte what `SerializeToString()` of the SDK's request gives (tests/telemetry/test_otlp.py).


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL = [bytes([n]) for n in range(0x80)]


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field: `tag` is (field number << 3) | 2."""
    return _SMALL[tag] + _varint(len(payload)) + payload if tag < 0x80 else _varint(tag) + _varint(len(payload)) + payload


_KEYS: dict[str, bytes] = {}  # attribute key -> its KeyValue's key field (the keys repeat from span to span)
_PACK_DOUBLE = __import__("struct").Struct("<d").pack
_PACK_FIXED64 = __import__("struct").Struct("<Q").pack
_PACK_FIXED32 = __import__("struct").Struct("<I").pack


_PAIRS: dict[tuple[str, type, Any], bytes] = {}  # (key, type, value) -> its KeyValue: most pairs repeat
PAIRS_KEPT = 8192


def _wire_attributes(tag: int, attributes: Any) -> list[bytes]:
    """Each attribute as a KeyValue field (`tag`: the repeated field's key byte)."""
    out = []
    pairs = _PAIRS
    for key, value in attributes.items():
        kind = type(value)
        cached = pairs.get((key, kind, value)) if kind in _PLAIN else None
        if cached is not None:
            out.append(cached)
            continue
        encoded_key = _KEYS.get(key)
        if encoded_key is None:
            encoded_key = _KEYS.setdefault(key, _field(0x0A, key.encode()) if key else b"")
        if kind is str:
            any_value = _field(0x0A, value.encode())
        elif kind is bool:
            any_value = b"\x10\x01" if value else b"\x10\x00"
        elif kind is int and INT64_MIN <= value <= INT64_MAX:
            any_value = b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
        elif kind is float:
            any_value = b"\x21" + _PACK_DOUBLE(value)
        else:
            try:
                any_value = _encode_value(value).SerializeToString()
            except Exception as error:  # as the SDK's encoder: the attribute is left out, the span is sent
                log.exception("Failed to encode key %s: %s", key, error)
                continue
        encoded = _field(tag, encoded_key + _field(0x12, any_value))
        if kind in _PLAIN:
            if len(pairs) >= PAIRS_KEPT:
                pairs.clear()
            pairs[key, kind, value] = encoded
        out.append(encoded)
    return out


_PLAIN = frozenset({str, bool, int, float})


def _wire_span(entry: tuple) -> bytes:
    (name, kind, trace_id, span_id, _flags, state, parent_id, parent_remote, start, end, attributes, events, links,
     status, description, dropped, _scope) = entry
    parts = [b"\x0a\x10", trace_id.to_bytes(16, "big"), b"\x12\x08", span_id.to_bytes(8, "big")]
    if state:  # the trace state's header: "key=value,key=value", as the SDK joins its items
        parts.append(_field(0x1A, state.encode()))
    if parent_id:
        parts += (b"\x22\x08", parent_id.to_bytes(8, "big"))
    if name:
        parts.append(_field(0x2A, name.encode()))
    parts.append(b"\x30" + _SMALL[kind + 1])  # the SDK's SpanKind value + 1 is OTLP's
    if start:
        parts += (b"\x39", _PACK_FIXED64(start))
    if end:
        parts += (b"\x41", _PACK_FIXED64(end))
    if attributes:
        parts += _wire_attributes(0x4A, attributes)
    dropped_attributes, dropped_events, dropped_links = dropped or (0, 0, 0)
    if dropped_attributes:
        parts.append(b"\x50" + _varint(dropped_attributes))
    if events:
        from opentelemetry.sdk.trace import Event

        parts += (_field(0x5A, e.SerializeToString())
                  for e in _encode_events([Event(n, a or {}, t) for n, t, a in events]))
    if dropped_events:
        parts.append(b"\x60" + _varint(dropped_events))
    if links:
        from opentelemetry.trace import Link, SpanContext, TraceFlags, TraceState

        parts += (_field(0x6A, link.SerializeToString()) for link in _encode_links([
            Link(SpanContext(t, s, r, TraceFlags(f), TraceState.from_header([h]) if h else None), a or {})
            for t, s, f, h, r, a in links]))
    if dropped_links:
        parts.append(b"\x70" + _varint(dropped_links))
    encoded_status = (_field(0x12, description.encode()) if description else b"") + (
        b"\x18" + _SMALL[status] if status else b"")
    parts.append(_field(0x7A, encoded_status))  # always present, as the SDK sends it
    parts += (b"\x85\x01", _PACK_FIXED32(REMOTE_PARENT if parent_id and parent_remote else LOCAL_PARENT))
    return b"".join(parts)


_RESOURCES: dict[int, tuple[Any, bytes, bytes]] = {}  # id -> (resource, its field, its schema_url field)
_SCOPES: dict[Any, tuple[bytes, bytes]] = {}  # scope key -> (its field, its schema_url field)


def _scope_key(scope: tuple | None) -> Any:
    return None if scope is None else (scope[0], scope[1], scope[2], tuple(sorted((scope[3] or {}).items())))


def _wire_scope(scope: tuple | None) -> tuple[bytes, bytes]:
    """(the ScopeSpans' scope field, its schema_url field) for a record's scope."""
    key = _scope_key(scope)
    encoded = _SCOPES.get(key)
    if encoded is None:
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        instrumentation = None if scope is None else InstrumentationScope(*scope)
        schema = instrumentation.schema_url if instrumentation is not None else None
        encoded = _SCOPES[key] = (_field(0x0A, _encode_instrumentation_scope(instrumentation).SerializeToString()),
                                  _field(0x1A, schema.encode()) if schema else b"")
    return encoded


def encode_records(records: Sequence[tuple], resource: Any) -> bytes:
    """The serialized ExportTraceServiceRequest for `records` (all of `resource`): the bytes the SDK's encoder
    gives for the spans they were made of, grouped by instrumentation scope in the order each first came."""
    if not records:
        return b""
    cached = _RESOURCES.get(id(resource))
    if cached is None or cached[0] is not resource:
        cached = _RESOURCES[id(resource)] = (
            resource, _field(0x0A, _encode_resource(resource).SerializeToString()),
            _field(0x1A, resource.schema_url.encode()) if resource.schema_url else b"")
    _, resource_field, resource_schema = cached
    groups: dict[Any, tuple[tuple | None, list[bytes]]] = {}
    for entry in records:
        key = _scope_key(entry[16])
        group = groups.get(key)
        if group is None:
            group = groups[key] = (entry[16], [])
        group[1].append(_field(0x12, _wire_span(entry)))
    scope_spans = []
    for scope, spans in groups.values():
        scope_field, scope_schema = _wire_scope(scope)
        scope_spans.append(_field(0x12, scope_field + b"".join(spans) + scope_schema))
    return _field(0x0A, resource_field + b"".join(scope_spans) + resource_schema)
