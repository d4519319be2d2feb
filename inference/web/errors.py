"""HTTPError: raised anywhere, rendered only by the error middleware."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

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
