"""An answer passed back as the upstream wrote it (UPSTREAM_PASSTHROUGH), its usage and end read on the way."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from .stream import UpstreamGeneration


class UpstreamRelay(UpstreamGeneration):
    """An answer passed back as the upstream wrote it (Relay: UPSTREAM_PASSTHROUGH): its text as the pieces, line
    by line when streaming, whole otherwise. Its usage and end are read on the way, whichever API it speaks:
    Anthropic's (`usage` in message_start and message_delta, `stop_reason`) or the Responses API's (the response's
    `usage` and `status`)."""

    answer_id: str | None = None  # the message's or response's id, once the answer has said it

    def _take(self, data: Any) -> None:
        if not isinstance(data, dict):
            return
        if self.answer_id is None and isinstance(data.get("id"), str) and (
                data.get("type") == "message" or data.get("object") == "response"):
            self.answer_id = data["id"]
        inner = data.get("message") or data.get("response")
        if isinstance(inner, dict):  # message_start's message, the Responses events' response
            self._take(inner)
        usage = data.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("input_tokens") or self.prompt_tokens)
            self.completion_tokens = int(usage.get("output_tokens") or self.completion_tokens)
        if (isinstance(data.get("delta"), dict) and data["delta"].get("stop_reason") == "max_tokens"
                or data.get("stop_reason") == "max_tokens" or data.get("status") == "incomplete"):
            self._length = True

    async def _read_whole(self) -> AsyncIterator[str]:
        self._length = False
        raw = await self._response.read()
        try:
            self._take(json.loads(raw))
        except ValueError:
            pass  # passed on as it came; there is no usage to count
        yield raw.decode("utf-8", errors="replace")
        self.finish_reason = "length" if self._length else "stop"

    async def _read_stream(self) -> AsyncIterator[str]:
        self._length = False
        async for raw in self._response.content:
            if raw.startswith(b"data:") and (b'"usage"' in raw or b'"stop_reason"' in raw or b'"status"' in raw):
                try:
                    self._take(json.loads(raw[5:]))
                except ValueError:
                    pass
            yield raw.decode("utf-8", errors="replace")
        if self._cancelled:
            return
        self.finish_reason = "length" if self._length else "stop"
