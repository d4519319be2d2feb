"""Limits shared by the request limiter (middleware/limit.py) and the token budget of generations: the policies, the
draft-ietf-httpapi-ratelimit headers, and the 429/503 answers that agree with them."""

from __future__ import annotations

import asyncio
import math
from functools import cache

from ..config import Settings
from ..store.base import Decision, Policy, Store, StoreUnavailable
from ..web.errors import HTTPError

POLICY_NAME = "per-client"


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


class TokenBudget:
    """RATE_LIMIT_TOKENS_PER_MINUTE: a generation reserves max_tokens (x n) from its client's budget before it
    starts; what it does not generate is refunded when it ends (in the background: the answer never waits)."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.policy = (
            Policy("tokens", settings.rate_limit_tokens_per_minute, 60, settings.rate_limit_tokens_per_minute)
            if settings.rate_limit_enabled and settings.rate_limit_tokens_per_minute else None
        )
        self._background: set[asyncio.Task[None]] = set()

    async def reserve(self, client: str | None, max_tokens: int) -> int:
        """Reserve `max_tokens` (at most a full bucket) for `client`; the units reserved, 0 when nothing is counted.
        Raises 429 when the budget is spent, 503 when the store cannot decide and RATE_LIMIT_FAIL_OPEN is false."""
        policy = self.policy
        if policy is None or not client:
            return 0
        cost = min(max_tokens, policy.burst)
        try:
            decision = await self.store.acquire(self._key(client), policy, cost)
        except StoreUnavailable:
            if self.settings.rate_limit_fail_open:
                return 0
            raise store_unavailable() from None
        if not decision.allowed:
            message = f"token budget of {policy.limit} tokens per minute exceeded (this request reserves {cost})"
            raise refusal("tokens_rate_limited", message, policy, decision)
        return cost

    def refund(self, client: str | None, units: int) -> None:
        if units <= 0 or client is None or self.policy is None:
            return
        task = asyncio.get_running_loop().create_task(self._refund_now(client, units))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def settled(self) -> None:
        """Returns once the refunds under way have reached the store."""
        while self._background:
            await asyncio.gather(*self._background)

    def _key(self, client: str) -> str:
        return f"{self.settings.redis_key_prefix}:tpm:{client}"

    async def _refund_now(self, client: str, units: int) -> None:
        assert self.policy is not None
        try:
            await self.store.refund(self._key(client), self.policy, units)
        except StoreUnavailable:
            pass
