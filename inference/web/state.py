"""What the layers learn about one request, in one object in its ASGI scope instead of scattered string keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, MutableMapping

from .dialect import NATIVE, Dialect
from .errors import HTTPError
from .http import ClientDisconnected, Scope

STATE_KEY = "inference"  # the scope key; ASGI's own "state" is the lifespan's


@dataclass(slots=True)
class RequestState:
    """Set by whoever learns it first, read by everything after: the error middleware (request id, dialect), the
    router (route), tracing (span), auth or the limiter (client), handlers (prompt, user) and the generation when
    it ends (usage). The access log reads it all once the response is sent."""

    request_id: str | None = None
    dialect: Dialect | None = None
    route: str | None = None  # the matched route's template (its parameters: scope["path_params"], http.py)
    client: str | None = None  # "key:<hash>" or "ip:<address>": what limits count against
    span: Any = None  # the request's server span (telemetry.tracing)
    usage: dict[str, int] | None = None  # {"prompt_tokens", "completion_tokens"} once a generation ends
    prompt: str | None = None  # the prompt text, set by handlers only when LOG_PROMPTS=true
    user: str | None = None  # an OpenAI request's `user` (the caller's id for its end user)


def state(scope: MutableMapping[str, Any]) -> RequestState:
    """This request's state, made on first use (unit tests drive handlers and middleware without the full stack)."""
    found = scope.get(STATE_KEY)
    if found is None:
        found = scope[STATE_KEY] = RequestState()
    return found


def dialect_of(scope: Scope) -> Dialect:
    """The dialect this request is answered in (set by the error middleware; the framework's own before that)."""
    return state(scope).dialect or NATIVE


class FinalStatus:
    """The status a request ends with, however it ends: what `http.response.start` said, else the status its
    HTTPError is answered with in the request's dialect, 499 when the client left before an answer (nginx's "client
    closed request"), 500 for anything else. The metrics and tracing middlewares both read it."""

    __slots__ = ("status", "headers", "error")

    def __init__(self) -> None:
        self.status = 500
        self.headers: Any = ()
        self.error: HTTPError | None = None

    def watch(self, send: Callable[[Any], Any]) -> Callable[[Any], Any]:
        async def watched(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
                self.headers = message.get("headers", ())
            await send(message)

        return watched

    def failed(self, exc: Exception, scope: Scope) -> bool:
        """Note how the request failed; True when it was not an answer (neither an HTTPError nor a client gone)."""
        if isinstance(exc, HTTPError):
            self.status, self.error = dialect_of(scope).status(exc), exc  # OpenAI says 400 for 422
        elif isinstance(exc, ClientDisconnected):
            self.status = 499
        else:
            return True
        return False
