"""Stored responses of the Responses API (`store: true`), for `previous_response_id`, GET, DELETE and input_items.

A record is one JSON value under `{prefix}:resp:{owner}:{response id}`, written once, when the response is
complete, with RESPONSES_TTL_SECONDS; in Redis when it is configured, so a follow-up that lands on any replica finds
it, else in this process's memory (its own LRU of RESPONSES_MEMORY_BYTES, so cached answers never evict
conversations). It holds the response object, this request's input items, and the items before them (the previous
response's whole conversation): a follow-up reads its context in one round trip, function calls and their outputs
included. A record larger than RESPONSES_MAX_BYTES is not kept (the response says `"store": false`).

The owner is the caller's API key (its digest): no key can read, continue or delete another key's responses. With
no API keys configured every caller is one owner, and a response id (128 random bits) is what guards it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from ..config import Settings
from ..store.base import Store, StoreUnavailable
from ..web.errors import HTTPError

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]  # the response object, as last sent
    input: list[dict[str, Any]]  # this request's input items, with ids
    history: list[dict[str, Any]]  # the conversation before them (previous responses' inputs and outputs)

    def conversation(self) -> list[dict[str, Any]]:
        """What a follow-up continues: the history, this input, this output."""
        return self.history + self.input + list(self.response.get("output") or ())


def owner_of(client: str | None) -> str:
    """Whose responses a caller may see: its API key's digest (RequestState.client "key:..."), else everyone's."""
    return client[4:] if client is not None and client.startswith("key:") else ANONYMOUS


class Conversations:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.ttl = settings.responses_ttl_seconds
        self.max_bytes = settings.responses_max_bytes
        self.prefix = f"{settings.redis_key_prefix}:resp:"

    def _key(self, owner: str, response_id: str) -> str:
        # Hashed: an id is the client's string; the key stays short and cannot reach into another owner's keys.
        return self.prefix + hashlib.sha256(f"{owner}\n{response_id}".encode()).hexdigest()

    async def load(self, owner: str, response_id: str, field: str = "response_id") -> StoredResponse:
        """The stored response, or 404 (never stored, expired, deleted or another key's), or 503 (store down)."""
        try:
            raw = await self.store.cache_get(self._key(owner, response_id))
        except StoreUnavailable:
            raise _unavailable(field) from None
        if raw is None:
            raise _not_found(response_id, field)
        record = json.loads(raw)
        return StoredResponse(record["response"], record["input"], record["history"])

    async def save(self, owner: str, stored: StoredResponse) -> bool:
        """Keep `stored` for RESPONSES_TTL_SECONDS; False if it is too large or the store is down."""
        raw = json.dumps({"response": stored.response, "input": stored.input, "history": stored.history},
                         separators=(",", ":"), ensure_ascii=False).encode()
        if len(raw) > self.max_bytes:
            log.warning("response %s not stored: %d bytes > RESPONSES_MAX_BYTES=%d", stored.response["id"], len(raw),
                        self.max_bytes)
            return False
        try:
            await self.store.cache_set(self._key(owner, stored.response["id"]), raw, self.ttl)
        except StoreUnavailable:
            log.warning("response %s not stored: the store is unavailable", stored.response["id"])
            return False
        return True

    async def own(self, owner: str, response_id: str) -> None:
        """Note that `owner` made `response_id`, which an upstream stores (UPSTREAM_PASSTHROUGH): its stored-response
        routes answer only that owner. Best effort: with the store down, no one can read it through here."""
        try:
            await self.store.cache_set(self._owner_key(response_id), owner.encode(), self.ttl)
        except StoreUnavailable:
            log.warning("response %s: its owner was not recorded (the store is unavailable)", response_id)

    async def check_owner(self, owner: str, response_id: str) -> None:
        """404 unless `owner` made `response_id` (as `own` noted); 503 with the store down."""
        try:
            recorded = await self.store.cache_get(self._owner_key(response_id))
        except StoreUnavailable:
            raise _unavailable("response_id") from None
        if recorded != owner.encode():
            raise _not_found(response_id, "response_id")

    def _owner_key(self, response_id: str) -> str:
        return f"{self.prefix}owner:" + hashlib.sha256(response_id.encode()).hexdigest()

    async def delete(self, owner: str, response_id: str) -> None:
        """Forget a stored response: 404 if there is none for this owner."""
        try:
            deleted = await self.store.delete(self._key(owner, response_id))
        except StoreUnavailable:
            raise _unavailable("response_id") from None
        if not deleted:
            raise _not_found(response_id, "response_id")


def _unavailable(field: str) -> HTTPError:
    return HTTPError(503, "store_unavailable", "stored responses are unavailable right now (Redis is down); retry "
                     "shortly", field=field, headers={"Retry-After": "1"})


def _not_found(response_id: str, field: str) -> HTTPError:
    return HTTPError(404, "previous_response_not_found" if field == "previous_response_id" else "not_found",
                     f"No response with id '{response_id}' is stored (never stored, expired, deleted, or another API "
                     "key's)", field=field)
