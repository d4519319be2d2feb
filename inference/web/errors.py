"""HTTPError: raised anywhere, rendered only by the error middleware."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

OPENAI_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


@dataclass
class HTTPError(Exception):
    """An error with an HTTP status, a stable machine-readable `code` and a human `message`."""

    status: int
    code: str
    message: str
    field: str | None = None
    details: list[dict[str, str]] | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        if self.details:
            error["details"] = self.details
        return {"error": error}

    @property
    def openai_status(self) -> int:
        # OpenAI reports every invalid parameter as 400; its SDKs map 400 to BadRequestError.
        return 400 if self.status == 422 else self.status

    def openai_body(self) -> dict[str, Any]:
        """OpenAI's error shape, so that its SDKs raise the matching exception class."""
        if self.status in OPENAI_ERROR_TYPES:
            kind = OPENAI_ERROR_TYPES[self.status]
        else:
            kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.field, "code": self.code}}
