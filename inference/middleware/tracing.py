"""A SERVER span per request, named "{METHOD} {route template}", joining the caller's trace (W3C traceparent)."""

from __future__ import annotations

from opentelemetry import context, trace
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..telemetry.tracing import Tracing
from ..web.http import ASGIApp, Receive, Scope, Send
from ..web.state import FinalStatus, state

PROPAGATOR = TraceContextTextMapPropagator()
CARRIED = {b"traceparent", b"tracestate"}


def tracing(app: ASGIApp, *, traces: Tracing) -> ASGIApp:
    if isinstance(traces.tracer, trace.NoOpTracer):
        return app  # nothing is exported: no spans, no cost

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        carrier = None
        for name, value in scope["headers"]:
            if name in CARRIED:
                if carrier is None:
                    carrier = {}
                carrier[name.decode("latin-1")] = value.decode("latin-1")
        parent = None
        if carrier:
            parent = trace.get_current_span(PROPAGATOR.extract(carrier)).get_span_context()
            if not parent.is_valid:
                parent = None
        # The sampler decides first, from the trace id and the caller's sampled flag: nothing else is built yet.
        # An unsampled request's span records nothing, but it is made current all the same: its context carries
        # the trace id and the unsampled flag to the upstream backend and into the log line.
        span = traces.server_span(scope["method"], parent)
        state(scope).span = span
        token = context.attach(trace.set_span_in_context(span))
        try:
            if span.is_recording():
                await _recorded(app, span, scope, receive, send)
            else:
                await app(scope, receive, send)
        finally:
            context.detach(token)

    return asgi


async def _recorded(app: ASGIApp, span: trace.Span, scope: Scope, receive: Receive, send: Send) -> None:
    final = FinalStatus()
    try:
        await app(scope, receive, final.watch(send))
    except Exception as exc:
        if final.failed(exc, scope):
            span.record_exception(exc)
        raise
    finally:
        _finish(span, scope, final.status)
        span.end()


def _finish(span: trace.Span, scope: Scope, status: int) -> None:
    """The span's attributes, all at once at the end (one pass through the SDK's attribute checks and lock)."""
    attributes = _request_attributes(scope)
    request = state(scope)
    route = request.route
    if route:
        span.update_name(f"{scope['method']} {route}")
        attributes["http.route"] = route
    attributes["http.response.status_code"] = status
    if request.request_id is not None:
        attributes["http.request.header.x-request-id"] = (request.request_id,)
    span.set_attributes(attributes)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))


def _request_attributes(scope: Scope) -> dict[str, object]:
    attributes: dict[str, object] = {
        "http.request.method": scope["method"],
        "url.path": scope["path"],
        "url.scheme": scope.get("scheme", "http"),
        "network.protocol.version": scope.get("http_version", "1.1"),
    }
    if scope.get("client"):
        attributes["client.address"] = scope["client"][0]
    if scope.get("server"):
        attributes["server.address"], attributes["server.port"] = scope["server"][0], scope["server"][1]
    for name, value in scope["headers"]:
        if name == b"user-agent":
            attributes["user_agent.original"] = value.decode("latin-1")
            break
    return attributes
