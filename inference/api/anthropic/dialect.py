"""The Anthropic dialect: errors as `{"type": "error", "error": {"type", "message"}}` with Anthropic's statuses, so
that its SDKs raise the matching exception class: an invalid request is 400, and overload is 529 where the other
dialects say 503."""

from __future__ import annotations

from typing import Any

from ...web.dialect import Dialect
from ...web.errors import HTTPError
from .schemas import AnthropicError

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error"}
OVERLOADED = 529  # Anthropic's "overloaded_error"


def status(error: HTTPError) -> int:
    if error.status == 422:
        return 400
    return OVERLOADED if error.status == 503 else error.status


def body(error: HTTPError, request_id: str | None = None) -> dict[str, Any]:
    code = status(error)
    kind = ERROR_TYPES.get(code) or ("api_error" if code >= 500 else "invalid_request_error")
    out: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": error.message}}
    if request_id is not None:
        out["request_id"] = request_id
    return out


ANTHROPIC = Dialect("anthropic", AnthropicError, body, status, binds_model=True)
