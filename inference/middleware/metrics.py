"""Request metrics and the request log: both describe one finished request, so one middleware measures it.

Labels use the route template the router put in the scope (`unmatched` for paths no route has), never the
raw path. The log line is JSON with LOG_FORMAT=json, readable text otherwise; prompts appear only with
LOG_PROMPTS=true (the handlers put them in the scope).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

from ..config import Settings
from ..telemetry.tracing import Metrics, exemplar, trace_id
from ..web.http import ASGIApp, Receive, Scope, Send
from ..web.state import FinalStatus, state

log = logging.getLogger("inference.access")

UNMATCHED = "unmatched"
CACHE_HEADER = b"x-cache"


def metrics(
    app: ASGIApp,
    *,
    metrics: Metrics,
    settings: Settings,
    route_of: Callable[[str], str | None] = lambda _: None,
) -> ASGIApp:
    """`route_of` names the route of a request refused before the router saw it (401, 429). The durations of
    recorded requests carry their trace as an exemplar (the tracing middleware, outside this one, set the span)."""
    as_json = settings.log_format == "json"
    # prometheus-client's labels() takes a lock and builds a key each call; the children are few, keep them.
    counted: dict[tuple[str, str, int], Any] = {}
    timed: dict[tuple[str, str], Any] = {}

    def count(method: str, route: str, status: int) -> Any:
        child = counted.get((method, route, status))
        if child is None:
            child = counted[method, route, status] = metrics.requests.labels(method, route, str(status))
        return child

    def timer(method: str, route: str) -> Any:
        child = timed.get((method, route))
        if child is None:
            child = timed[method, route] = metrics.duration.labels(method, route)
        return child

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        start = time.perf_counter()
        final = FinalStatus()
        metrics.in_flight.inc()
        try:
            await app(scope, receive, final.watch(send))
        except Exception as exc:
            final.failed(exc, scope)
            raise
        finally:
            metrics.in_flight.dec()
            elapsed = time.perf_counter() - start
            request = state(scope)
            route = request.route or route_of(scope["path"]) or UNMATCHED
            method, status = scope["method"], final.status
            count(method, route, status).inc()
            span = request.span
            timer(method, route).observe(elapsed, None if span is None else exemplar(span))
            if status == 429:
                metrics.rate_limited.inc()
            if log.isEnabledFor(logging.INFO):
                _log(scope, method, route, status, elapsed, _cache(final), as_json)

    return asgi


def _cache(final: FinalStatus) -> str | None:
    """The X-Cache verdict: the sent header's, else the refusing error's (a 409 from idempotency says why)."""
    cache = None
    for name, value in final.headers:
        if name == CACHE_HEADER:
            cache = value.decode()
    if final.error is not None:
        cache = final.error.headers.get("x-cache", cache)
    return cache


def _log(scope: Scope, method: str, route: str, status: int, elapsed: float, cache: str | None, as_json: bool) -> None:
    request = state(scope)
    usage = request.usage or {}
    fields = {
        "method": method,
        "route": route,
        "path": scope["path"],
        "status": status,
        "duration_ms": round(elapsed * 1000, 3),
        "client": request.client or ("ip:" + scope["client"][0] if scope.get("client") else None),
        "cache": cache,
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "request_id": request.request_id,
        "trace_id": trace_id(request.span),
    }
    if request.user is not None:
        fields["user"] = request.user
    if request.prompt is not None:
        fields["prompt"] = request.prompt
    if as_json:
        log.info("request", extra={"fields": fields})
        return
    text = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) and (' ' in v or not v) else v}"
                    for k, v in fields.items() if v is not None)
    log.info("%s", text)
