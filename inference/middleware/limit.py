"""Per-client rate limiting: one atomic store call per request, answered with draft-ietf-httpapi-ratelimit
headers (RateLimit-Policy, RateLimit) and, when refused, 429 with Retry-After."""

from __future__ import annotations

import math
from functools import cache

from opentelemetry import trace

from ..config import Settings
from ..web.errors import HTTPError
from ..web.http import ASGIApp, Message, Receive, Scope, Send
from ..store.base import Decision, Policy, Store, StoreUnavailable
from ..telemetry.tracing import Tracing, span
from ..web.identity import client_id

POLICY_NAME = "per-client"
NO_TRACING = Tracing(trace.NoOpTracer())


def request_policy(settings: Settings) -> Policy:
    return Policy(POLICY_NAME, settings.rate_limit_per_minute, 60, settings.burst)


@cache
def _policy_header(policy: Policy) -> tuple[bytes, bytes]:
    return b"ratelimit-policy", f'"{policy.name}";q={policy.burst};w={policy.window}'.encode()


def rate_limit_headers(policy: Policy, decision: Decision) -> list[tuple[bytes, bytes]]:
    seconds = math.ceil(decision.retry_after if not decision.allowed else decision.reset_after)
    return [_policy_header(policy), (b"ratelimit", f'"{policy.name}";r={decision.remaining};t={seconds}'.encode())]


def refusal(code: str, message: str, policy: Policy, decision: Decision) -> HTTPError:
    """429 for a request over `policy`'s budget: Retry-After, and the RateLimit headers that agree with it."""
    retry_after = str(math.ceil(decision.retry_after))
    headers = {"Retry-After": retry_after, **{k.decode(): v.decode() for k, v in rate_limit_headers(policy, decision)}}
    return HTTPError(429, code, f"{message}; retry in {retry_after} s", headers=headers)


def store_unavailable() -> HTTPError:
    """503 when the limiter's store cannot decide and RATE_LIMIT_FAIL_OPEN is false."""
    return HTTPError(503, "rate_limiter_unavailable", "the rate limiter's store is unavailable; retry shortly",
                     headers={"Retry-After": "1"})


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
