"""The OpenAI dialect: every error in OpenAI's shape and statuses, so that its SDKs raise the matching exception
class; it owns /v1/, where even a path no route matches answers this way."""

from __future__ import annotations

from typing import Any

from ...web.dialect import Dialect
from ...web.errors import HTTPError
from .schemas import OpenAIError

ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def status(error: HTTPError) -> int:
    # OpenAI reports every invalid parameter as 400; its SDKs map 400 to BadRequestError.
    return 400 if error.status == 422 else error.status


def body(error: HTTPError, request_id: str | None = None) -> dict[str, Any]:
    if error.status in ERROR_TYPES:
        kind = ERROR_TYPES[error.status]
    else:
        kind = "server_error" if error.status >= 500 else "invalid_request_error"
    return {"error": {"message": error.message, "type": kind, "param": error.field, "code": error.code}}


OPENAI = Dialect("openai", OpenAIError, body, status, mount="/v1/", binds_model=True)
