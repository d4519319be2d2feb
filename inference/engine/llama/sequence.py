"""One request inside the scheduler: its prompt, where it is, its sampler, and the text it has produced.

The scheduler thread owns every field but `cancelled`; text and the final result leave through `emit`: into the
scheduler's outbox, which it hands over once a step (worker.py sends it to the HTTP process in one message).
"""

from __future__ import annotations

import codecs
import threading
from dataclasses import dataclass, field
from typing import Any

from ..base import FinishReason, SamplingParams
from .sampling import Sampler


@dataclass
class Started:
    """The sequence has left the queue and holds a slot: from here a crash of the engine ends it."""


STARTED = Started()


@dataclass
class Finished:
    finish_reason: FinishReason | None
    completion_tokens: int
    reused_prompt_tokens: int
    stop_sequence: str | None = None  # the stop sequence that ended it, if one did


class JsonDepth:
    """What of a JSON text is open: the objects and arrays not closed yet, innermost last, and whether a string is
    (from its bytes as they are generated; text around the document counts as outside it). For a grammar's
    closing (scheduler.py, sampling.py)."""

    __slots__ = ("open", "in_string", "escaped")

    def __init__(self) -> None:
        self.open = bytearray()  # b"{" and b"[" not closed yet
        self.in_string = False
        self.escaped = False

    def feed(self, piece: bytes) -> None:
        for byte in piece:
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif byte == 0x5C:  # backslash
                    self.escaped = True
                elif byte == 0x22:  # quote
                    self.in_string = False
            elif byte == 0x22:
                self.in_string = True
            elif byte in (0x7B, 0x5B):  # { [
                self.open.append(byte)
            elif byte in (0x7D, 0x5D) and self.open:  # } ]
                self.open.pop()

    @property
    def to_close(self) -> int:
        """Tokens that closing takes at least: one per open string, object and array, and the end."""
        return len(self.open) + self.in_string + 1

    @property
    def closer(self) -> str:
        """What closes the innermost open thing: '"', '}' or ']'; "" when nothing is open."""
        if self.in_string:
            return '"'
        if self.open:
            return "}" if self.open[-1] == 0x7B else "]"
        return ""


@dataclass(eq=False)
class Sequence:
    tokens: list[int]
    # Prompt lengths where the chat template ends a message (content-defined, so the same messages give the same
    # boundaries in every request): prompts are evaluated in chunks that never cross one, and a prefix in the
    # KV cache is reused only up to one, so a prompt is always evaluated in the same pieces (see scheduler.py).
    boundaries: tuple[int, ...]
    params: SamplingParams
    seed: int
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Scheduler state.
    slot: int = -1
    evaluated: int = 0  # prompt tokens in the KV cache
    n_past: int = 0  # all of this sequence's tokens in the KV cache (prompt and generated)
    reused: int = 0  # of which copied from an earlier sequence
    produced: int = 0
    pending: int | None = None  # sampled, to be decoded at the next step
    sampler: Sampler | None = None
    outbox: list = field(default_factory=list)  # (sequence, item) pairs; the scheduler's own once submitted
    # One of several answers to the same prompt (OpenAI's n): the first of them, whose evaluated prompt this one
    # copies instead of evaluating it again (scheduler.py, _fork).
    leader: "Sequence | None" = None
    # Admission: whose it is (clients are served in turn), and the time.monotonic() deadlines: to leave the queue
    # (QUEUE_TIMEOUT_SECONDS) and to be complete (the request's own; None: none).
    client: str = ""
    queued_at: float = 0.0
    queue_deadline: float | None = None
    deadline: float | None = None
    id: int = 0  # the HTTP side's name for it
    counting: bool = False  # the HTTP side wants the tokens produced so far with each piece of text (worker.py)
    json: JsonDepth | None = None  # with a grammar that closes (params.closing_reserve): what is open so far
    _decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    _held: str = ""  # decoded text not yet sent because it may be the start of a stop sequence
    _stopped_by: str | None = None

    def __post_init__(self) -> None:
        if self.params.grammar is not None and self.params.closing_reserve:
            self.json = JsonDepth()

    @property
    def closing(self) -> str | None:
        """None, or the answer should close now (its grammar closes, and the tokens left are only the reserve and
        what closing takes): what closes its innermost open thing ("" when nothing is open). The reserve is at most
        a quarter of max_tokens, so a small budget is not all reserve."""
        json = self.json
        if json is None:
            return None
        params = self.params
        reserve = min(params.closing_reserve, params.max_tokens // 4)
        if params.max_tokens - self.produced > reserve + json.to_close:
            return None
        return json.closer

    @property
    def reserved(self) -> int:
        """KV cells this sequence may come to hold: its prompt and every token it may generate."""
        return len(self.tokens) + self.params.max_tokens

    @property
    def prefilling(self) -> bool:
        return self.evaluated < len(self.tokens)

    def next_chunk(self, size: int) -> tuple[int, int]:
        """The next piece of the prompt to evaluate: up to `size` tokens, counted from the last boundary, and
        never across the next one, so the pieces depend on the prompt alone."""
        start = self.evaluated
        base = max((b for b in self.boundaries if b <= start), default=0)
        end = base + ((start - base) // size + 1) * size
        following = min((b for b in self.boundaries if b > start), default=len(self.tokens))
        return start, min(end, following, len(self.tokens))

    def emit(self, item: Any) -> None:
        self.outbox.append((self, item))

    def add_text(self, piece: bytes) -> bool:
        """Append a generated token's bytes; sends what is safe to send. True when a stop sequence matched."""
        self._held += self._decoder.decode(piece)
        stops = self.params.stop
        if self.params.min_tokens and self.produced <= self.params.min_tokens:
            stops = ()  # before min_tokens a stop sequence does not end the answer either (vLLM's rule)
        if stops:
            found = find_stop(self._held, stops)
            if found is not None:
                cut, self._stopped_by = found
                self._held = self._held[:cut]
                return True
            keep = partial_stop(self._held, stops)
            ready, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
        else:
            ready, self._held = self._held, ""
        if ready:
            self.emit(ready)
        return False

    def finish(self, reason: FinishReason | None, stopped: bool = False) -> None:
        """Send what is held back (unless cancelled) and the result."""
        if reason is not None:
            if not stopped:  # bytes of an unfinished character belong to the answer unless a stop cut it
                self._held += self._decoder.decode(b"", final=True)
            if self._held:
                self.emit(self._held)
        self._held = ""
        self.emit(Finished(reason, self.produced, self.reused, self._stopped_by if stopped else None))


def find_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """Where the first stop sequence in `text` begins, and which it is."""
    found = [(i, s) for i, s in ((text.find(s), s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could still grow into a stop sequence."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
