"""Per-client rate limiting: one atomic store call per request, answered with draft-ietf-httpapi-ratelimit
headers (RateLimit-Policy, RateLimit) and, when refused, 429 with Retry-After."""

from __future__ import annotations

from opentelemetry import trace

from ..config import Settings
from ..serving.limits import rate_limit_headers, refusal, request_policy, store_unavailable
from ..store.base import Decision, Store, StoreUnavailable
from ..telemetry.tracing import Tracing, span
from ..web.http import ASGIApp, Message, Receive, Scope, Send
from ..web.identity import client_id

NO_TRACING = Tracing(trace.NoOpTracer())


def limit(
    app: ASGIApp, *, store: Store, settings: Settings, paths: frozenset[str], tracing: Tracing = NO_TRACING
) -> ASGIApp:
    """Count each request to `paths` against its client's budget in `store`."""
    policy = request_policy(settings)
    prefix = f"{settings.redis_key_prefix}:rl:"

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in paths:
            await app(scope, receive, send)
            return
        client = client_id(scope, settings.trusted_proxies)
        with span(scope, tracing, "rate_limit") as decided:
            try:
                decision: Decision | None = await store.acquire(prefix + client, policy)
            except StoreUnavailable:
                decision = None
            decided.set_attribute("inference.rate_limit.result",
                               "unavailable" if decision is None else "allowed" if decision.allowed else "limited")
        if decision is None:
            if settings.rate_limit_fail_open:
                await app(scope, receive, send)
                return
            raise store_unavailable()
        if not decision.allowed:
            raise refusal("rate_limited", f"rate limit of {policy.limit} requests per minute exceeded", policy, decision)
        headers = rate_limit_headers(policy, decision)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *headers]
            await send(message)

        await app(scope, receive, send_with_headers)

    return asgi
