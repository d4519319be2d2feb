"""One request of the embedded engine on the HTTP side: what the engine process is sent for it (and sent again after
a restart), and the Generation its handler iterates, fed by the engine's per-step messages (engine.py)."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from ..base import FinishReason, TokenLogprob
from .scheduler import TokenLogprobs
from .sequence import Finished


class EngineRequest:
    """One sequence as the HTTP side knows it: where its items go, and what to send again after a restart."""

    __slots__ = ("id", "job", "fields", "loop", "out", "started", "sent", "cancelled")

    def __init__(self, id: int, job: int, fields: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
        self.id, self.job, self.fields, self.loop = id, job, fields, loop
        self.out: asyncio.Queue = asyncio.Queue()
        self.started = False  # left the engine's queue: a crash from here on ends it
        self.sent = False  # the current engine process has it
        self.cancelled = False


class LlamaGeneration:
    """Text pieces of one request as the engine produces them; `aclose()` cancels it (`cancel`: the engine's, which
    tells the engine process; `piece`: a token's bytes, for log probabilities)."""

    def __init__(self, request: EngineRequest, cancel: Callable[[EngineRequest], None],
                 piece: Callable[[int], bytes]) -> None:
        self._request = request
        self._cancel = cancel
        self._piece = piece
        self._done = False
        self._held: Any = None  # the item after a run of pieces, taken from the queue while joining them
        self.prompt_tokens = len(request.fields["tokens"])
        self.completion_tokens = 0
        self.reused_prompt_tokens = 0
        self.stop_sequence: str | None = None
        self.finish_reason: FinishReason | None = None
        self.logprobs: list[TokenLogprob] = []
        self.reasoning = ""  # the embedded models do not reason
        self.tool_calls: list[dict[str, Any]] = []  # calls come from the service's grammar, read back from the text

    def take_reasoning(self) -> str:
        return ""

    def __aiter__(self) -> "LlamaGeneration":
        return self

    async def __anext__(self) -> str:
        if self._done:
            raise StopAsyncIteration
        out = self._request.out
        item = self._held if self._held is not None else await out.get()
        self._held = None
        while isinstance(item, (TokenLogprobs, int)):
            self._note(item)
            item = await out.get()
        if isinstance(item, str):
            # Pieces that queued up while the consumer was busy leave as one: under load the HTTP layer writes
            # fewer, larger chunks instead of falling further behind.
            while not out.empty():
                following = out.get_nowait()
                if isinstance(following, (TokenLogprobs, int)):
                    self._note(following)
                elif isinstance(following, str):
                    item += following
                else:
                    self._held = following
                    break
            return item
        self._done = True
        if isinstance(item, Finished):
            self.finish_reason = item.finish_reason
            self.completion_tokens = item.completion_tokens
            self.reused_prompt_tokens = item.reused_prompt_tokens
            self.stop_sequence = item.stop_sequence
            raise StopAsyncIteration
        raise item

    def _note(self, item: TokenLogprobs | int) -> None:
        if isinstance(item, int):  # the tokens produced so far (asked for with count_as_it_goes)
            self.completion_tokens = item
            return
        piece = self._piece
        self.logprobs.append(TokenLogprob(piece(item.token), item.logprob,
                                          tuple((piece(token), logprob) for token, logprob in item.top)))

    def cancel(self) -> None:
        self._cancel(self._request)

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._cancel(self._request)


def put_all(batch: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)
