"""The step loop: one thread owns the llama.cpp context and, each step, advances every sequence it holds.

A step: drop waiting sequences that expired or were abandoned, admit waiting ones while a slot is free (clients
in turn, admission.py; reusing the prompt prefix an idle slot still holds where one matches), evaluate pending prompt pieces, then decode one token for every generating sequence in a single
batch, sample each with its own native sampler chain, hand the text to the event loop and retire what finished.
Every slot is a llama.cpp sequence with a KV stream of its own (`n_ctx` cells: one request's whole context), so
an admitted request always fits and the slots share the memory evenly.

Repeatability. llama.cpp's CPU kernels can give a row slightly different results when the batch around it has
another shape (measured here: eight prompts evaluated in one batch answered differently from each prompt alone;
one-token decode rows batched with others did not; and with one KV pool shared by all sequences, where each
sequence's cells land changed the order attention sums them in). So what a sequence's results depend on is fixed
by the request alone: each slot has its own KV stream, filled in position order; every prompt piece is evaluated
in a llama_decode call of its own, cut at content-defined points (chat-message boundaries, then every
PROMPT_CHUNK tokens); and a cached prefix is reused only up to a boundary that both prompts share, where the
cached KV was itself evaluated in the same pieces. Decode steps batch one token per sequence. A temperature-0 or seeded request then answers the same alone, beside seven others, and
with or without a reused prefix (tests/engine/test_batching.py checks each).

Only this thread touches the context, the batch and the samplers; the event loop talks to it through `submit`
(under the lock) and each sequence's `emit`. Native objects are freed in one place each: samplers in `_retire`,
the batch and context in `close`.

Over 400 lines on purpose: the step loop is one state machine owned by one thread; admission, prefix reuse,
prompt evaluation, decoding and retiring share its slots and batch, and read best in the order a step runs them.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from typing import Any, Callable, NamedTuple

import numpy as np
from llama_cpp import llama_cpp as C

from ..base import EngineNotReady, EngineOverloaded, QueueTimeout, RequestTimeout
from .admission import DrainRate, FairQueue
from .sampling import Grammars, Sampler
from .sequence import STARTED, Sequence

log = logging.getLogger(__name__)

PROMPT_CHUNK = 256  # prompt tokens per llama_decode: long prompts never stall the running streams for long
PREFILL_BUDGET = 256  # prompt tokens evaluated per step (at least one piece), between decode steps
EXPIRY_INTERVAL = 0.05  # seconds between scans of the queue for requests that expired or were abandoned
NEAR_TOP = 1024  # logprobs: how many candidates near the top logit are sorted at most


def _top(logits: np.ndarray, k: int, peak: float) -> np.ndarray:
    """The ids of the k largest logits, largest first. A partition of the whole vocabulary costs ~0.4 ms (alone; more
    in the step loop); the few tokens near the top are found with a comparison pass or two, the margin below the peak narrowed while too many
    tokens are within it, widened while too few."""
    margin, near = 8.0, np.flatnonzero(logits >= peak - 8.0)
    while len(near) > NEAR_TOP and margin > 1e-4:
        narrower = np.flatnonzero(logits >= peak - margin / 4)
        if len(narrower) < k:
            break
        margin, near = margin / 4, narrower
    while len(near) < k and margin < 1e4:
        margin *= 4
        near = np.flatnonzero(logits >= peak - margin)
    if len(near) < k:  # fewer than k finite logits: the whole vocabulary's order
        near = np.argpartition(logits, -k)[-k:]
    elif len(near) > k:
        near = near[np.argpartition(logits[near], -k)[-k:]]
    return near[np.argsort(-logits[near], kind="stable")]


class TokenLogprobs(NamedTuple):
    """What the scheduler emits for a token when log probabilities are asked: ids, turned into text by the engine."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


class _Cached:
    """What an idle slot's KV cache holds: a prompt prefix evaluated in its own pieces, kept for reuse."""

    __slots__ = ("tokens", "boundaries")

    def __init__(self, tokens: list[int], boundaries: tuple[int, ...]) -> None:
        self.tokens, self.boundaries = tokens, boundaries


class Scheduler:
    def __init__(
        self,
        ctx: C.llama_context_p,
        *,
        slots: int,
        max_queued: int,
        n_vocab: int,
        vocab: Any,
        is_eog: Callable[[int], bool],
        piece: Callable[[int, bool], bytes],  # a token's bytes (True: a special token's text too)
        publish: Callable[[list[tuple[Sequence, Any]]], None],
    ) -> None:
        self.ctx = ctx
        self.publish = publish  # hands a step's emitted items over (worker.py: to the pipe), also when there are none
        self.on_crash: Callable[[], None] | None = None
        self.memory = C.llama_get_memory(ctx)
        self.slots = slots
        self.max_queued = max_queued
        self.n_vocab = n_vocab
        self.grammars = Grammars(vocab, n_vocab)  # structured output's compiled grammars (llguidance)
        self.is_eog = is_eog
        # The end-of-generation tokens, masked while a sequence may not end yet (min_tokens, ignore_eos).
        self.end_tokens = np.array([token for token in range(n_vocab) if is_eog(token)], dtype=np.int32)
        self.piece = piece
        self.batch = C.llama_batch_init(max(PROMPT_CHUNK, slots), 0, 1)
        self.lock = threading.Condition()
        self.waiting = FairQueue()
        self.drain = DrainRate()
        self.running: list[Sequence] = []
        self.idle: collections.OrderedDict[int, _Cached] = collections.OrderedDict()  # least recently used first
        self.free = list(range(slots - 1, -1, -1))
        self.outbox: list = []  # what sequences emitted this step, handed to the event loop at its end
        self.closed = False
        self.aborting = False
        self._next_expiry = 0.0
        # Written by this thread only; read by tests, metrics and the watchdog.
        self.steps = 0  # llama_decode calls: the engine's progress
        self.tokens_generated = 0
        self.prompt_tokens_reused = 0

    # --- event loop side -------------------------------------------------------------------------

    def submit(self, *sequences: Sequence) -> None:
        """Queue `sequences` (one request's: admitted together, in its client's turn), or none of them."""
        with self.lock:
            if self.closed:
                raise EngineNotReady("the service is shutting down")
            held = len(self.waiting) + len(self.running)  # the free slots are room too, not the queue alone
            if held + len(sequences) > max(self.max_queued + self.slots, len(sequences)):
                raise EngineOverloaded(len(self.waiting), self.retry_after())
            for sequence in sequences:
                sequence.outbox = self.outbox
            self.waiting.push(list(sequences))
            self.lock.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    def retry_after(self) -> int:
        """Seconds an overloaded client should wait: until the queue ahead of it has drained, at the recent pace."""
        return self.drain.retry_after(len(self.waiting), time.monotonic())

    def stop(self) -> None:
        """Refuse new work and end everything: what waits and what runs fails with an error its client sees (an
        error event on a stream, never a silent cut); the loop then retires it all and returns."""
        with self.lock:
            self.closed = True
            waiting = self.waiting.clear()
            self.aborting = True
            self.lock.notify()
        self.publish([(sequence, EngineNotReady("the service is shutting down")) for sequence in waiting])

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    # --- the loop (its own thread) ---------------------------------------------------------------

    def run(self) -> None:
        try:
            while True:
                with self.lock:
                    if not self.closed and not self.waiting and not self.running:
                        self.drain.idle(time.monotonic())  # the queue-timeout Retry-After's pace skips idle spells
                        while not self.closed and not self.waiting and not self.running:
                            self.lock.wait()
                        self.drain.busy(time.monotonic())
                    if self.closed and not self.running:
                        return
                    self._expire()
                    self._admit()
                self._step()
                self._deliver()
        except BaseException:
            log.exception("the scheduler stopped on an error; failing every request it holds")
            if self.on_crash is not None:
                self.on_crash()  # the engine process: exit, so that the supervisor restarts it
            raise
        finally:
            # Whatever ended the loop, nobody may wait forever: what is left fails, and new work is refused.
            with self.lock:
                self.closed = True
                left = self.waiting.clear() + self.running
                self.running = []
            for sequence in left:
                if sequence.sampler is not None:
                    sequence.sampler.close()
                    sequence.sampler = None
                sequence.emit(EngineNotReady("the engine stopped"))
            self._deliver()
            self.close()

    def _deliver(self) -> None:
        items, self.outbox[:] = list(self.outbox), []
        self.publish(items)

    def _step(self) -> None:
        now = time.monotonic()
        if self.aborting:
            for sequence in list(self.running):
                self._retire(sequence, None, error=EngineNotReady("the service is shutting down"))
            return
        for sequence in [s for s in self.running if s.cancelled.is_set()]:
            self._retire(sequence, None)
        for sequence in [s for s in self.running if s.deadline is not None and now > s.deadline]:
            self._retire(sequence, None, error=RequestTimeout(round(sequence.deadline - sequence.queued_at, 3)))
        try:
            self._prefill()
            self._decode()
        except Exception as exc:
            log.exception("llama_decode failed; failing the sequences in flight")
            for sequence in list(self.running):
                self._retire(sequence, None, error=exc)

    # --- admission and prefix reuse --------------------------------------------------------------

    def _expire(self) -> None:
        """Drop what waits for nothing (its client left) or too long (QUEUE_TIMEOUT_SECONDS, or the request's own
        deadline), without running it (called under the lock)."""
        now = time.monotonic()
        if now < self._next_expiry:
            return
        self._next_expiry = now + EXPIRY_INTERVAL

        def doomed(s: Sequence) -> bool:
            return s.cancelled.is_set() or (s.queue_deadline is not None and now > s.queue_deadline) or (
                s.deadline is not None and now > s.deadline)

        for sequence in self.waiting.remove(doomed):
            if sequence.cancelled.is_set():
                sequence.finish(None)
            elif sequence.deadline is not None and now > sequence.deadline:
                sequence.emit(RequestTimeout(round(sequence.deadline - sequence.queued_at, 3)))
            else:
                sequence.emit(QueueTimeout(now - sequence.queued_at, self.retry_after()))

    def _admit(self) -> None:
        """Start waiting sequences, clients in turn, while a slot is free (called under the lock)."""
        while len(self.running) < self.slots and (sequence := self.waiting.pop()) is not None:
            if sequence.cancelled.is_set():
                sequence.finish(None)
                continue
            try:
                self._place(sequence)
            except Exception as exc:  # this request's problem (e.g. a sampler llama.cpp refuses), not the loop's
                log.exception("could not start a sequence")
                self.idle.pop(sequence.slot, None)
                if sequence.slot >= 0 and sequence.slot not in self.free:
                    C.llama_memory_seq_rm(self.memory, sequence.slot, -1, -1)
                    self.free.append(sequence.slot)
                sequence.emit(exc)
                continue
            self.running.append(sequence)
            sequence.emit(STARTED)

    def _best_prefix(self, sequence: Sequence) -> tuple[int | None, int]:
        """The idle slot holding the longest reusable prefix of `sequence`'s prompt, and that prefix's length."""
        best: tuple[int | None, int] = (None, 0)
        for slot, cached in self.idle.items():
            shared = set(cached.boundaries)
            for point in sorted((b for b in sequence.boundaries if best[1] < b < len(sequence.tokens)
                                 and b <= len(cached.tokens) and b in shared), reverse=True):
                # The same tokens, cut into the same pieces below `point`: the cached KV is what evaluating the
                # prompt itself would have produced.
                if (cached.tokens[:point] == sequence.tokens[:point]
                        and [b for b in cached.boundaries if b < point] == [b for b in sequence.boundaries if b < point]):
                    best = (slot, point)
                    break
        return best

    def _place(self, sequence: Sequence) -> None:
        """A slot for `sequence`: the idle one with its longest prefix, else a free one, else the least recently
        used idle one (its cache is dropped)."""
        source, reuse = self._best_prefix(sequence)
        if source is not None:
            del self.idle[source]
            slot = source
        elif self.free:
            slot = self.free.pop()
        else:
            slot, _ = self.idle.popitem(last=False)
        C.llama_memory_seq_rm(self.memory, slot, reuse, -1)
        sequence.slot = slot
        sequence.evaluated = sequence.n_past = sequence.reused = reuse
        sequence.sampler = Sampler(sequence.params, sequence.seed, self.n_vocab, self.grammars, self.grammars.vocab)
        self.prompt_tokens_reused += reuse

    # --- evaluation --------------------------------------------------------------------------------

    def _fill(self, rows: list[tuple[int, int, int, bool]]) -> None:
        batch = self.batch
        batch.n_tokens = len(rows)
        for i, (token, position, slot, logits) in enumerate(rows):
            batch.token[i] = token
            batch.pos[i] = position
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot
            batch.logits[i] = logits
        status = C.llama_decode(self.ctx, batch)
        self.steps += 1
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")

    def _prefill(self) -> None:
        budget = PREFILL_BUDGET
        for sequence in [s for s in self.running if s.prefilling and not self._follows(s)]:
            while sequence.prefilling and budget > 0:
                start, end = sequence.next_chunk(PROMPT_CHUNK)
                last = len(sequence.tokens) - 1
                self._fill([(sequence.tokens[i], i, sequence.slot, i == last) for i in range(start, end)])
                sequence.evaluated = sequence.n_past = end
                budget -= end - start
                if not sequence.prefilling:
                    followers = self._fork(sequence)
                    for each in (sequence, *followers):
                        self._sample(each, end - start - 1)
                    self._deliver()  # its first token goes out now, not after the other prompts
            if budget <= 0:
                return

    def _follows(self, sequence: Sequence) -> bool:
        """True while `sequence` waits for its leader (running, in a slot) to evaluate their common prompt."""
        leader = sequence.leader
        return leader is not None and leader.slot >= 0 and leader.prefilling and leader in self.running

    def _fork(self, leader: Sequence) -> list[Sequence]:
        """The running sequences waiting on `leader`'s prompt, now given a copy of it. The copy is exact: the same
        tokens evaluated in the same pieces. Across KV streams llama.cpp copies the whole stream, which holds just
        the prompt at this point (its first generated token is not decoded yet), at the next llama_decode."""
        followers = [s for s in self.running if s.leader is leader and s.prefilling]
        for follower in followers:
            C.llama_memory_seq_cp(self.memory, leader.slot, follower.slot, -1, -1)
            follower.evaluated = follower.n_past = follower.reused = len(follower.tokens)
            self.prompt_tokens_reused += len(follower.tokens)
        return followers

    def _decode(self) -> None:
        # In slot order: llama.cpp splits a batch over per-sequence KV streams into as few parts as it can only
        # when the sequences come in order.
        generating = sorted((s for s in self.running if s.pending is not None), key=lambda s: s.slot)
        if not generating:
            return
        self._fill([(s.pending, s.n_past, s.slot, True) for s in generating])
        for row, sequence in enumerate(generating):
            sequence.n_past += 1
            self._sample(sequence, row)

    def _sample(self, sequence: Sequence, row: int) -> None:
        params = sequence.params
        banned = self.end_tokens if params.ignore_eos or sequence.produced < params.min_tokens else None
        try:
            token = sequence.sampler.sample(self.ctx, row, banned, sequence.closing)
        except Exception as exc:  # this sequence's sampler failed (e.g. its grammar allows nothing): it alone ends
            log.exception("sampling failed")
            self._retire(sequence, None, error=exc)
            return
        self._sampled(sequence, token, row)

    def _sampled(self, sequence: Sequence, token: int, row: int) -> None:
        sequence.pending = None
        if sequence.cancelled.is_set():
            self._retire(sequence, None)
            return
        if self.is_eog(token):
            self._retire(sequence, "stop")
            return
        sequence.produced += 1
        self.tokens_generated += 1
        if sequence.params.logprobs is not None:
            sequence.emit(self._logprobs(row, token, sequence.params.logprobs))
        piece = self.piece(token, token in sequence.params.preserve)
        if sequence.json is not None:
            sequence.json.feed(piece)
        if sequence.add_text(piece):
            self._retire(sequence, "stop", stopped=True)
        elif sequence.produced >= sequence.params.max_tokens:
            self._retire(sequence, "length")
        else:
            sequence.pending = token

    def _logprobs(self, row: int, token: int, k: int) -> TokenLogprobs:
        """The token's log probability and the k most likely tokens' from the model's logits for batch row `row`
        (before temperature, penalties, bias or grammar: the model's own distribution, as vLLM reports by default).
        Only for requests that ask: with the top 5 it costs about 0.5 ms a token here (0.94x the tokens/s;
        scripts/bench_structured.py), right after llama_decode has had every core."""
        logits = np.ctypeslib.as_array(C.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))
        peak = float(logits.max())
        total = peak + math.log(float(np.exp(logits - peak).sum()))
        top: tuple[tuple[int, float], ...] = ()
        if k:
            best = _top(logits, k, peak)
            top = tuple((int(i), float(logits[i]) - total) for i in best)
        return TokenLogprobs(token, float(logits[token]) - total, top)

    def _retire(self, sequence: Sequence, reason, *, stopped: bool = False, error: Exception | None = None) -> None:
        self.running.remove(sequence)
        self.drain.record(time.monotonic())
        if sequence.sampler is not None:
            sequence.sampler.close()
            sequence.sampler = None
        # Keep the evaluated prompt for the next request that starts the same way; generated tokens go.
        C.llama_memory_seq_rm(self.memory, sequence.slot, sequence.evaluated, -1)
        if sequence.evaluated:
            self.idle[sequence.slot] = _Cached(sequence.tokens[: sequence.evaluated], sequence.boundaries)
        else:
            self.free.append(sequence.slot)
        if error is not None:
            sequence.emit(error)
        else:
            sequence.finish(reason, stopped)

    def close(self) -> None:
        if self.batch is not None:
            C.llama_batch_free(self.batch)
            self.batch = None
