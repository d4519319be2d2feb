"""uvicorn's HTTP/1.1 protocol with the bounds it lacks against slow clients: httptools' (llhttp, in C) where it is
installed, as uvicorn itself would pick, else h11's (pure Python, about half the requests per second of a core).

- **Time to send a request head** (HEAD_TIMEOUT_SECONDS): from the moment a connection opens, or the first byte of
  the next request on a kept-alive one, the request line and headers must be complete within this time, else the
  connection gets 408 `request_timeout` and is closed. uvicorn bounds only the idle time between requests on a
  kept-alive connection, so a client that trickles its headers a byte at a time (or sends nothing) held a file
  descriptor for ever. The body has its own bound (BODY_TIMEOUT_SECONDS, in the app).
- **Size of a request head** (`head_limit`): at most that many bytes of a request line and headers are held; past
  it, 431 `headers_too_large` and the connection is closed (h11 does this itself, with a plain 400).
- **Connections** (MAX_CONNECTIONS): at most that many connections hold a slot. A connection that opens when every
  slot is taken waits, without a slot, for at most PROBATION_SECONDS (or the head timeout, if shorter) for its
  whole request head. If the head comes, the oldest connection that holds a slot but no request (a client still
  trickling its head, or idle between requests) is closed to make room, and the newcomer is served; if every slot
  holds a request, the newcomer is answered 503 `too_many_connections` (JSON, `Retry-After`, `Connection: close`)
  without reaching the app. So clients that trickle their heads, however many and however fast they reconnect,
  cannot lock out one that sends its request at once: they only ever displace each other. (uvicorn's
  `limit_concurrency` refuses a newcomer even when the slots are held by idle connections, in plain text.)

Both protocols get the same guard (`_Guard`); each says only when a request's head is complete.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Literal

log = logging.getLogger(__name__)

# How long a connection opened with every slot taken may take to send its whole request head: a client that sends
# its request as soon as it connects needs one round trip.
PROBATION_SECONDS = 1.0
HEAD_END = b"\r\n\r\n"
Implementation = Literal["auto", "httptools", "h11"]


def _raw_response(status: int, reason: str, code: str, message: str, retry_after: int | None = None) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
               "connection: close"]
    if retry_after is not None:
        headers.append(f"retry-after: {retry_after}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


def implementation(choice: Implementation = "auto") -> Literal["httptools", "h11"]:
    """The protocol `guarded_protocol` builds on: httptools when installed (or asked for), else h11."""
    if choice != "auto":
        return choice
    try:
        import httptools  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the install
        return "h11"
    return "httptools"


def guarded_protocol(max_connections: int, head_timeout: float, head_limit: int = 64 * 1024,
                     choice: Implementation = "auto") -> type[asyncio.Protocol]:
    """The protocol class to give uvicorn (`Config(http=...)`); `head_limit` is the most bytes of a request head
    held (for h11, also give uvicorn h11_max_incomplete_event_size)."""
    too_many = _raw_response(503, "Service Unavailable", "too_many_connections",
                             f"this server holds {max_connections} connections, each in the middle of a request "
                             "(MAX_CONNECTIONS); retry shortly", retry_after=1)
    too_slow = _raw_response(408, "Request Timeout", "request_timeout",
                             f"the request line and headers did not arrive within {head_timeout:g} s "
                             "(HEAD_TIMEOUT_SECONDS)")
    too_large = _raw_response(431, "Request Header Fields Too Large", "headers_too_large",
                              f"the request line and headers are over {head_limit} bytes")
    probation = min(PROBATION_SECONDS, head_timeout)
    too_slow_for_a_slot = _raw_response(408, "Request Timeout", "request_timeout",
                                        f"every connection slot is taken (MAX_CONNECTIONS) and the request line and "
                                        f"headers did not arrive within {probation:g} s; retry shortly")
    # Connections holding a slot but no request, oldest first (dicts keep insertion order): the ones to close for
    # room. `slots` counts connections holding a slot.
    between_requests: dict[Any, None] = {}
    slots = 0

    class _Guard:
        """The bounds, over either protocol: `_head_complete` says whether the current request's head is in."""

        # Set by the protocol classes below (uvicorn's own attributes).
        transport: asyncio.Transport
        loop: asyncio.AbstractEventLoop
        cycle: Any
        client: Any

        def _guard_init(self) -> None:
            self._head_timer: asyncio.TimerHandle | None = None
            self._slot = False
            self._pending: bytearray | None = None  # the head so far, while waiting for a slot

        def _head_complete(self) -> bool:
            raise NotImplementedError

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)  # type: ignore[misc]
            if slots < max_connections:
                self._take_slot()
                self._wait_for_head()
                self._arm_head_timer(head_timeout)
            else:
                self._pending = bytearray()
                self._arm_head_timer(probation)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            self._give_slot_back()
            super().connection_lost(exc)  # type: ignore[misc]

        def data_received(self, data: bytes) -> None:
            if self._pending is not None:
                self._waiting_for_slot(data)
                return
            if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._wait_for_head()
                self._arm_head_timer(head_timeout)  # the first bytes of the next request on a kept-alive connection
            self._feed(data)

        def _feed(self, data: bytes) -> None:
            super().data_received(data)  # type: ignore[misc]
            if self._head_timer is not None and self._head_complete():  # body or end of request next
                self._disarm_head_timer()
                between_requests.pop(self, None)

        def _waiting_for_slot(self, data: bytes) -> None:
            """No slot yet: buffer the head; once it is whole, make room (or refuse) and go on as any connection."""
            assert self._pending is not None
            self._pending += data
            if self._pending.find(HEAD_END, max(0, len(self._pending) - len(data) - 3)) < 0:
                if len(self._pending) > head_limit:
                    self._close_with(too_many)
                return
            if slots >= max_connections:
                if not between_requests:
                    self._close_with(too_many)  # every slot holds a request
                    return
                next(iter(between_requests))._make_room()
            buffered, self._pending = bytes(self._pending), None
            self._disarm_head_timer()
            self._take_slot()
            self._feed(buffered)

        def _take_slot(self) -> None:
            nonlocal slots
            self._slot = True
            slots += 1

        def _give_slot_back(self) -> None:
            nonlocal slots
            between_requests.pop(self, None)
            if self._slot:
                self._slot = False
                slots -= 1

        def _wait_for_head(self) -> None:
            between_requests.pop(self, None)
            between_requests[self] = None  # the youngest

        def _make_room(self) -> None:
            """Closed for a newcomer: this connection holds no request. A client mid-head is told why; an idle
            kept-alive connection is just closed, as its keep-alive timeout would."""
            idle = self.cycle is not None and self.cycle.response_complete and self._head_timer is None
            self._close_with(b"" if idle else too_many)

        def _close_with(self, response: bytes) -> None:
            self._disarm_head_timer()
            self._give_slot_back()  # at once: connection_lost comes a loop iteration later
            if response:
                self.transport.write(response)
            self.transport.close()

        def _arm_head_timer(self, seconds: float) -> None:
            self._disarm_head_timer()
            self._head_timer = self.loop.call_later(seconds, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or self._pending is None and self._head_complete():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is being answered: not a head any more
            log.debug("closing a connection from %s: no request head in time", self.client)
            self._close_with(too_slow if self._pending is None else too_slow_for_a_slot)

    if implementation(choice) == "h11":
        import h11
        from uvicorn.protocols.http.h11_impl import H11Protocol

        class GuardedH11Protocol(_Guard, H11Protocol):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self._guard_init()

            def _head_complete(self) -> bool:
                return self.conn.their_state is not h11.IDLE

            def on_response_complete(self) -> None:
                super().on_response_complete()
                if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                    self._wait_for_head()  # idle on a kept-alive connection (uvicorn's keep-alive timeout runs)

        return GuardedH11Protocol

    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(_Guard, HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._guard_init()
            self._in_head = False  # between a request's first byte and the end of its headers
            self._head_bytes = 0  # bytes received while in a head

        def _head_complete(self) -> bool:
            return not self._in_head

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._in_head = True  # the first request's head is due
            super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # Bytes that leave a head unfinished are held (as parsed headers): past the limit, the head is refused.
            # A chunk that finishes a head (its body may follow in it) never counts.
            if self._in_head and self._pending is None and not self.transport.is_closing():
                self._head_bytes += len(data)
                if self._head_bytes > head_limit:
                    self._close_with(too_large)

        def on_message_begin(self) -> None:
            self._in_head = True
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._in_head, self._head_bytes = False, 0
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and not self.pipeline:
                self._head_bytes = 0
                self._wait_for_head()  # idle on a kept-alive connection (uvicorn's keep-alive timeout runs)

    return GuardedHttpToolsProtocol
