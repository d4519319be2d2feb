"""The span record both processes share: one finished span as a tuple of plain values (what `marshal` writes to the
export process's pipe), made from the service's own spans (`span_record`) or the SDK's (`record`), and rebuilt into
an SDK span on the other side (`rebuild`); and `Drops`, how either side counts and reports spans it had to drop."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

KINDS = list(SpanKind)
STATUSES = {code.value: code for code in StatusCode}

# A record: one finished span as plain values (what `marshal` writes), in this order.
# (name, kind, trace id, span id, trace flags, trace state header, parent span id (0: none), parent is remote,
#  start, end, attributes, events ((name, time, attributes), ...), links ((trace id, span id, flags, state header,
#  is remote, attributes), ...), status code, status description, dropped (attributes, events, links),
#  instrumentation scope (name, version, schema url, attributes))
Record = tuple


def span_record(name: str, kind: int, context: SpanContext, parent: SpanContext | None, start: int, end: int,
                attributes: Any, events: tuple[Any, ...] | None, status: int, description: str | None,
                scope: tuple[Any, ...] | None, links: tuple[Any, ...] | None = None,
                dropped: tuple[int, int, int] | None = None) -> Record:
    """A record from a span's parts (the service's own spans, tracing.RecordedSpan, and the SDK's, `record`)."""
    return (name, kind, context.trace_id, context.span_id, int(context.trace_flags), _state(context.trace_state),
            parent.span_id if parent is not None else 0, parent is not None and parent.is_remote, start, end,
            attributes or None, events, links, status, description, dropped, scope)


def record(span: ReadableSpan) -> Record:
    """The record of a span the SDK finished."""
    scope = span.instrumentation_scope
    return span_record(
        span.name, span.kind.value, span.context, span.parent, span.start_time, span.end_time,
        dict(span.attributes) if span.attributes else None,
        tuple((e.name, e.timestamp, dict(e.attributes) if e.attributes else None) for e in span.events) or None,
        span.status.status_code.value, span.status.description,
        scope and (scope.name, scope.version, scope.schema_url, dict(scope.attributes) if scope.attributes else None),
        tuple((link.context.trace_id, link.context.span_id, int(link.context.trace_flags),
               _state(link.context.trace_state), link.context.is_remote,
               dict(link.attributes) if link.attributes else None) for link in span.links) or None,
        (span.dropped_attributes, span.dropped_events, span.dropped_links),
    )


def _state(state: TraceState | None) -> str:
    return state.to_header() if state else ""


class _Received(ReadableSpan):
    """A span rebuilt from its record, its dropped counts as they were in the service's process."""

    def __init__(self, *args: Any, dropped: tuple[int, int, int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._dropped = dropped

    @property
    def dropped_attributes(self) -> int:
        return self._dropped[0]

    @property
    def dropped_events(self) -> int:
        return self._dropped[1]

    @property
    def dropped_links(self) -> int:
        return self._dropped[2]


_scopes: dict[Any, InstrumentationScope] = {}


def rebuild(entry: Record, resource: Any) -> ReadableSpan:
    """The span a record was made of, with `resource` (the export process's, built from the same settings)."""
    (name, kind, trace_id, span_id, flags, state, parent_id, parent_remote, start, end, attributes, events, links,
     status, description, dropped, scope) = entry
    trace_state = TraceState.from_header([state]) if state else None
    context = SpanContext(trace_id, span_id, False, TraceFlags(flags), trace_state)
    parent = SpanContext(trace_id, parent_id, parent_remote, TraceFlags(flags), trace_state) if parent_id else None
    if scope is not None:
        key = (scope[0], scope[1], scope[2], tuple(sorted((scope[3] or {}).items())))
        scope = _scopes.get(key) or _scopes.setdefault(key, InstrumentationScope(*scope))
    return _Received(
        name, context, parent, resource, attributes or {},
        tuple(Event(n, a or {}, t) for n, t, a in events or ()),
        tuple(Link(SpanContext(t, s, r, TraceFlags(f), TraceState.from_header([h]) if h else None), a or {})
              for t, s, f, h, r, a in links or ()),
        KINDS[kind], status=Status(STATUSES[status], description), start_time=start, end_time=end,
        instrumentation_scope=scope, dropped=dropped or (0, 0, 0))


class Drops:
    """Counts dropped spans in `count` and logs one warning per burst (drops less than GAP seconds apart)."""

    GAP = 10.0

    def __init__(self, count: Callable[[int], None], message: str, log: logging.Logger) -> None:
        self.count = count
        self.message = message
        self.log = log
        self.last = -math.inf

    def __call__(self, n: int = 1) -> None:
        self.count(n)
        now = time.monotonic()
        if now - self.last > self.GAP:
            self.log.warning(self.message)
        self.last = now
