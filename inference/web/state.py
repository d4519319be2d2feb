"""What the layers learn about one request, in one object in its ASGI scope instead of scattered string keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, MutableMapping

if TYPE_CHECKING:
    from .dialect import Dialect

STATE_KEY = "inference"  # the scope key; ASGI's own "state" is the lifespan's


@dataclass(slots=True)
class RequestState:
    """Set by whoever learns it first, read by everything after: the error middleware (request id, dialect), the
    router (route, path parameters), tracing (span), auth or the limiter (client), handlers (prompt, user) and the
    generation when it ends (usage). The access log reads it all once the response is sent."""

    request_id: str | None = None
    dialect: Dialect | None = None
    route: str | None = None  # the matched route's template
    path_params: dict[str, str] | None = None
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
