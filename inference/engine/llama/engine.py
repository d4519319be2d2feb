"""The embedded engine on the HTTP side: the client of the engine process (worker.py, supervisor.py).

The HTTP process runs no llama.cpp compute. It loads the model's vocabulary only (prompts.py): `generate` renders
the chat template and tokenizes in a helper thread (so a long prompt cannot stall the loop), checks the context
length, refuses what cannot fit or there is no room for, then sends the prompt's tokens to the engine process,
whose scheduler (scheduler.py) owns the llama.cpp context and runs up to `max_concurrent` sequences together. The
engine's per-step messages come back on the supervisor's thread and reach each request's event loop through one
`call_soon_threadsafe` per loop and step (generation.py turns them into the Generation a handler iterates). A
client that goes away sends a cancel: the scheduler frees its slot at the next step, and a sequence still waiting
is dropped before it runs.

When the engine process dies, the requests it was running end with EngineRestarted (503 `engine_restarted`, or
an error event on a stream); the ones still waiting are kept here and sent to the new process once it is ready.
The table of requests the engine process holds, admission into it, the message handler, death and restart share
one lock and one set of invariants (a request is sent once, answered once, kept across a restart only while it has
not started).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import logging
import random
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from ..base import (
    Admission,
    EngineError,
    EngineNotReady,
    EngineOverloaded,
    EngineRestarted,
    GenerationRequest,
    InvalidPrompt,
    ModelInfo,
)
from .admission import DrainRate
from .generation import EngineRequest, LlamaGeneration, put_all
from .models import file_sha256, model_info
from .native import compute_threads, cpu_quota
from .prompts import Prompts
from .sequence import Finished, Started
from .supervisor import Supervisor

log = logging.getLogger(__name__)


class LlamaEngine(Prompts):
    """An Engine backed by one llama.cpp context, in a process of its own, holding up to `max_concurrent`
    sequences at once; its prompts are the Prompts of its model (prompts.py).

    `n_ctx` is what one request may use (prompt + answer); each of the `max_concurrent` slots has a KV stream of
    that size, so the context holds `n_ctx` x `max_concurrent` tokens and an admitted request always fits.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        n_ctx: int = 2048,
        n_threads: int = 0,
        max_queued: int = 64,
        max_concurrent: int = 8,
        queue_timeout: float | None = None,
        sha256: str | None = None,
        extra_buffers: str = "auto",
        crash_test: bool = False,
        crash_loop_deaths: int = 3,
        crash_loop_seconds: float = 60.0,
        restart_retry_after: int = 5,
        log_format: str = "text",
        chat_template_file: Path | None = None,
        structured_dry_multiplier: float = 0.0,
        structured_closing_tokens: int = 64,
    ) -> None:
        super().__init__(n_ctx, chat_template_file)
        self.model_path = Path(model_path)
        # STRUCTURED_DRY_MULTIPLIER, STRUCTURED_CLOSING_TOKENS: how a grammar's answers are kept from looping and
        # brought to an end within max_tokens (SamplingParams.dry_multiplier, closing_reserve).
        self.structured = {"dry_multiplier": structured_dry_multiplier,
                           "closing_reserve": structured_closing_tokens}
        self.n_threads = n_threads
        self.max_queued = max_queued
        self.max_concurrent = max_concurrent
        self.queue_timeout = queue_timeout
        self.extra_buffers = extra_buffers  # LLAMA_EXTRA_BUFFERS: auto, on, off (native.py, supervisor.py)
        self.crash_test = crash_test  # TEST_ONLY_CRASH_WITH_EXTRA_BUFFERS
        self.crash_loop_deaths = crash_loop_deaths
        self.crash_loop_seconds = crash_loop_seconds
        self.restart_retry_after = restart_retry_after
        self.log_format = log_format  # LOG_FORMAT, for the engine process's own log lines
        self._sha256 = sha256
        self._info: ModelInfo | None = None
        self._supervisor: Supervisor | None = None
        self._closed = False
        # The requests the engine process has or will have, by id; guarded by _lock (the event loops add and
        # cancel, the supervisor's thread delivers and handles deaths).
        self._lock = threading.Lock()
        self._requests: dict[int, EngineRequest] = {}
        self._ids = itertools.count(1)
        self._jobs = itertools.count(1)
        self._waiting = 0  # requests not started yet
        self._admitted = 0  # places held by requests being prepared (admit() -> generate_many())
        self._drain = DrainRate()
        # What the engine reports once per step; the _base_ counters hold what processes that died had reached.
        self._steps = self._tokens = self._reused = 0
        self._base_steps = self._base_tokens = self._base_reused = 0
        # Called with the cause ("SIGSEGV", "SIGKILL", "exit") each time the engine process dies (the metric).
        self.on_restart: Callable[[str], None] | None = None

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise EngineNotReady("the model is still loading")
        return self._info

    @property
    def loaded(self) -> bool:
        return self._info is not None

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def progress(self) -> int:
        """Steps the engine has taken (llama_decode calls): the watchdog's measure of it moving."""
        return self._base_steps + self._steps

    @property
    def busy(self) -> bool:
        return bool(self._requests)

    @property
    def tokens_generated(self) -> int:
        return self._base_tokens + self._tokens

    @property
    def prompt_tokens_reused(self) -> int:
        return self._base_reused + self._reused

    @property
    def pid(self) -> int | None:
        """The engine process's pid (None before it starts)."""
        return self._supervisor.pid if self._supervisor is not None else None

    @property
    def health(self) -> tuple[str, str | None] | None:
        """None while the engine process serves; else ("restarting" | "failed", why)."""
        supervisor = self._supervisor
        if supervisor is None or supervisor.state in ("starting", "ready", "closing", "stopped"):
            return None
        if supervisor.state == "failed":
            return "failed", supervisor.reason
        return "restarting", supervisor.reason

    @property
    def restarts(self) -> dict[str, int]:
        return dict(self._supervisor.restarts) if self._supervisor is not None else {}

    def restart(self, why: str) -> bool:
        """Kill the engine process (it is stuck: `why`) so that the supervisor starts a new one; running requests end
        with EngineRestarted, waiting ones are kept. False when there is no running process to kill."""
        return self._supervisor is not None and self._supervisor.kill("stalled", f"was killed: {why}")

    def abort(self) -> None:
        """End every request in flight with an error (shutdown timeout) and refuse new ones."""
        self._closed = True
        if self._supervisor is not None and not self._supervisor.abort():
            self._fail_all(EngineNotReady("the service is shutting down"))

    def load(self) -> None:
        sha256 = self._sha256 or file_sha256(self.model_path)
        meta = self.load_vocabulary(self.model_path)
        threads = self.n_threads
        if not threads:  # N_THREADS=0: what this process may really use (a container's quota, not the host's cores)
            threads, why = compute_threads(cpu_quota())
            log.info("N_THREADS=0 -> %d: %s", threads, why)
        self._supervisor = Supervisor(
            {"model_path": self.model_path, "n_ctx": self.n_ctx, "slots": self.max_concurrent,
             "n_threads": threads, "max_queued": self.max_queued, "crash_test": self.crash_test,
             "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel()),
             "log_format": self.log_format},
            extra_buffers=self.extra_buffers, crash_loop_deaths=self.crash_loop_deaths,
            crash_loop_seconds=self.crash_loop_seconds, on_message=self._on_message, on_death=self._on_death,
            on_ready=self._on_ready, on_failed=self._on_failed, on_restart=self._restarted,
        )
        self._supervisor.start()
        info = model_info(self.model_path, sha256, meta, self.n_ctx, self._supervisor.ready_info.get("n_params", 0))
        if self.chat_template_file:  # another template answers differently: another revision (cache keys, fingerprint)
            template_sha = hashlib.sha256((self._template or "").encode()).hexdigest()
            info = replace(info, revision=hashlib.sha256(f"{sha256}:{template_sha}".encode()).hexdigest()[:12],
                           extra={**info.extra, "chat_template_file": str(self.chat_template_file),
                                  "chat_template_sha256": template_sha})
        self._info = replace(info, vocab_size=self._vocab.n_vocab())
        log.info("loaded %s (%s, revision %s): %d sequences at once, %d tokens of context each, in engine process %d",
                 self._info.name, self._info.quantization, self._info.revision, self.max_concurrent, self.n_ctx,
                 self._supervisor.pid)

    async def close(self) -> None:
        await asyncio.to_thread(self.shutdown)

    def shutdown(self) -> None:
        """Refuse new work, end the engine process (what it holds fails with an error) and free the vocabulary."""
        self._closed = True
        if self._supervisor is not None:
            self._supervisor.stop()
        self._fail_all(EngineNotReady("the service is shutting down"))
        self.close_vocabulary()

    # --- request side (event loop) -------------------------------------------------------------

    async def generate(self, request: GenerationRequest, admission: Admission | None = None) -> LlamaGeneration:
        return (await self.generate_many(request, 1, admission))[0]

    def admit(self, request: GenerationRequest, n: int = 1) -> Admission:
        """Hold `n` places (a free slot, else a place in the queue) for `request`, about to be prepared, or refuse
        it at once: a prompt too long for the context (PromptTooLong), no room (EngineOverloaded). What a burst into
        an idle engine cannot fit is refused before any of it is rendered or tokenized."""
        if request.relay is not None:
            raise InvalidPrompt("the embedded engine cannot pass a request on (UPSTREAM_PASSTHROUGH needs an upstream)")
        self.check_length(request)
        supervisor = self._supervisor
        if supervisor is None or self._closed:
            raise EngineNotReady("the model is not loaded" if not self._closed else "the service is shutting down")
        if supervisor.state == "failed":
            raise EngineNotReady(supervisor.reason or "the engine failed")
        with self._lock:
            # Room is the free slots plus the queue: every request held here (running, waiting, or admitted and
            # being prepared) counts against both together, so a burst into an idle engine gets all of it.
            held = len(self._requests) + self._admitted
            if held + n > max(self.max_queued + self.max_concurrent, n):
                raise EngineOverloaded(self._waiting + self._admitted, self.retry_after())
            self._admitted += n
        return Admission(n, lambda: self._unadmit(n))

    def _unadmit(self, n: int) -> None:
        with self._lock:
            self._admitted -= n

    async def generate_many(self, request: GenerationRequest, n: int,
                            admission: Admission | None = None) -> list[LlamaGeneration]:
        """`n` answers to one prompt: the first evaluates it, the others start from a copy of its KV cache."""
        if admission is None:
            admission = self.admit(request, n)
        try:
            tokens, boundaries, max_tokens = await asyncio.to_thread(self._prepare, request)
            return self._queue(request, n, tokens, boundaries, max_tokens, admission)
        finally:
            admission.release()  # no-op once queued

    def _queue(self, request: GenerationRequest, n: int, tokens: list[int], boundaries: tuple[int, ...],
               max_tokens: int, admission: Admission) -> list[LlamaGeneration]:
        if self._closed or self._supervisor is None:
            raise EngineNotReady("the service is shutting down")
        params = request.params if max_tokens == request.params.max_tokens else replace(request.params, max_tokens=max_tokens)
        if params.grammar is not None:
            params = replace(params, **self.structured)
        base = params.seed if params.seed is not None else random.getrandbits(32)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        job = next(self._jobs)
        requests: list[EngineRequest] = []
        for i in range(n):
            seed = base + i if params.seed is not None else (base if i == 0 else random.getrandbits(32))
            fields = {"tokens": tokens, "boundaries": boundaries, "params": params, "seed": seed,
                      "client": request.client, "counting": request.count_as_it_goes, "queued_at": now,
                      "deadline": request.deadline,
                      "queue_deadline": None if self.queue_timeout is None else now + self.queue_timeout}
            requests.append(EngineRequest(next(self._ids), job, fields, loop))
        with self._lock:
            admission.detach()  # its places become these queued requests
            self._admitted -= admission.n
            if not self._requests:
                self._drain.busy(now)
            for each in requests:
                self._requests[each.id] = each
            self._waiting += n
            self._send_job(requests)
        return [LlamaGeneration(each, self.cancel, self.piece) for each in requests]

    def retry_after(self) -> int:
        """Seconds an overloaded client should wait: until the queue ahead of it has drained, at the recent pace."""
        return self._drain.retry_after(self._waiting, time.monotonic())

    def _send_job(self, requests: list[EngineRequest]) -> None:
        """Give one request's sequences to the engine process, if it is up (called under the lock); a restart
        sends them later."""
        assert self._supervisor is not None
        leader = requests[0].id
        message = [{**each.fields, "id": each.id, "leader": leader if each.id != leader else None}
                   for each in requests]
        if self._supervisor.send(("submit", message)):
            for each in requests:
                each.sent = True

    def cancel(self, request: EngineRequest) -> None:
        with self._lock:
            if request.cancelled or request.id not in self._requests:
                return
            request.cancelled = True
            if request.sent and self._supervisor is not None and self._supervisor.send(("cancel", [request.id])):
                return
            # Not in any engine process (it is restarting): it ends here, without running.
            self._settle(request, Finished(None, 0, 0))
        self._deliver([(request, Finished(None, 0, 0))])

    def _settle(self, request: EngineRequest, item: Any) -> None:
        """`request` has ended with `item` (called under the lock)."""
        del self._requests[request.id]
        now = time.monotonic()
        if not request.started:
            self._waiting -= 1
        else:  # a slot freed: the pace Retry-After is worked out from
            self._drain.record(now)
        if not self._requests:
            self._drain.idle(now)

    # --- engine side (the supervisor's thread) -------------------------------------------------

    def _on_message(self, message: tuple) -> None:
        _, steps, tokens, reused, items = message
        self._steps, self._tokens, self._reused = steps, tokens, reused
        out = []
        with self._lock:
            for id, item in items:
                request = self._requests.get(id)
                if request is None:
                    continue
                if isinstance(item, Started):
                    request.started = True
                    self._waiting -= 1
                    continue
                if isinstance(item, (Finished, BaseException)):
                    self._settle(request, item)
                out.append((request, item))
        self._deliver(out)

    def _on_death(self, how: str) -> tuple[int, int]:
        """The engine process died: what it was running ends with an error; what waited is kept for the next.
        Returns how many requests ended and how many are kept."""
        self._base_steps += self._steps
        self._base_tokens += self._tokens
        self._base_reused += self._reused
        self._steps = self._tokens = self._reused = 0
        out = []
        with self._lock:
            for request in list(self._requests.values()):
                request.sent = False
                if request.started:
                    error = EngineRestarted(how, self.restart_retry_after)
                    self._settle(request, error)
                    out.append((request, error))
                elif request.cancelled:
                    self._settle(request, Finished(None, 0, 0))
                    out.append((request, Finished(None, 0, 0)))
            kept = len(self._requests)
        self._deliver(out)
        return sum(isinstance(item, EngineRestarted) for _, item in out), kept

    def _on_ready(self) -> None:
        """A new engine process is ready: send it what waited, in the order it arrived."""
        with self._lock:
            jobs: dict[int, list[EngineRequest]] = {}
            for request in sorted(self._requests.values(), key=lambda r: r.id):
                if not request.sent:
                    jobs.setdefault(request.job, []).append(request)
            for requests in jobs.values():
                self._send_job(requests)
        log.warning("the engine process is back (pid %s): %d waiting requests sent to it",
                    self.pid, sum(map(len, jobs.values())))

    def _on_failed(self, reason: str) -> None:
        self._fail_all(EngineNotReady(reason))

    def _restarted(self, cause: str) -> None:
        if self.on_restart is not None:
            self.on_restart(cause)

    def _fail_all(self, error: EngineError) -> None:
        with self._lock:
            out = [(request, error) for request in self._requests.values()]
            for request, _ in out:
                self._settle(request, error)
        self._deliver(out)

    def _deliver(self, items: list[tuple[EngineRequest, Any]]) -> None:
        """Hand items to their requests' event loops: one wake-up per loop, however many requests and pieces."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = collections.defaultdict(list)
        for request, item in items:
            by_loop[request.loop].append((request.out, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(put_all, batch)
            except RuntimeError:  # that loop has closed: nobody is listening any more
                for request, _ in items:
                    if request.loop is loop:
                        self.cancel(request)

