"""The embedded engine on the HTTP side: the client of the engine process (worker.py, supervisor.py).

The HTTP process runs no llama.cpp compute. It loads the model's vocabulary only (tens of milliseconds, a few MB):
`generate` renders the chat template and tokenizes in a helper thread (so a long prompt cannot stall the loop),
checks the context length, refuses what cannot fit or the queue has no room for, then sends the prompt's tokens
to the engine process, whose scheduler (scheduler.py) owns the llama.cpp context and runs up to `max_concurrent`
sequences together. The engine's per-step messages come back on the supervisor's thread and reach each request's
event loop through one `call_soon_threadsafe` per loop and step. A client that goes away sends a cancel: the
scheduler frees its slot at the next step, and a sequence still waiting is dropped before it runs.

When the engine process dies, the requests it was running end with EngineRestarted (503 `engine_restarted`, or
an error event on a stream); the ones still waiting are kept here and sent to the new process once it is ready.

Over 400 lines on purpose: the client side of one process boundary. The table of requests the engine process
holds, admission into it, the message handler, death and restart share one lock and one set of invariants (a
request is sent once, answered once, kept across a restart only while it has not started).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import json
import logging
import random
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from ..base import (
    Admission,
    ChatMessage,
    ContextLengthExceeded,
    EngineError,
    EngineNotReady,
    EngineOverloaded,
    EngineRestarted,
    FinishReason,
    GenerationRequest,
    InvalidPrompt,
    ModelInfo,
    PromptTooLong,
    TokenLogprob,
)
from .admission import DrainRate
from .native import compute_threads, cpu_quota, load_model, longest_piece
from .scheduler import TokenLogprobs
from .sequence import Finished, Started
from .supervisor import Supervisor

log = logging.getLogger(__name__)

BACKEND = "llama.cpp"
HASH_CHUNK = 1 << 20
# Used only when a GGUF file carries no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# GGUF general.file_type -> the quantization's usual name (llama.cpp's llama_ftype enum).
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
}
# Message boundaries (for exact prefix reuse) are worked out for chats up to this size; longer ones are
# evaluated whole (still in the same pieces every time), so repeatability never depends on these limits.
BOUNDARY_MESSAGES = 32
BOUNDARY_CHARS = 32_000


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _Request:
    """One sequence as the HTTP side knows it: where its items go, and what to send again after a restart."""

    __slots__ = ("id", "job", "fields", "loop", "out", "started", "sent", "cancelled")

    def __init__(self, id: int, job: int, fields: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
        self.id, self.job, self.fields, self.loop = id, job, fields, loop
        self.out: asyncio.Queue = asyncio.Queue()
        self.started = False  # left the engine's queue: a crash from here on ends it
        self.sent = False  # the current engine process has it
        self.cancelled = False


class LlamaGeneration:
    """Text pieces of one request as the engine produces them; `aclose()` cancels it."""

    def __init__(self, request: _Request, engine: "LlamaEngine") -> None:
        self._request = request
        self._engine = engine
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
        while isinstance(item, TokenLogprobs):
            self._logprob(item)
            item = await out.get()
        if isinstance(item, str):
            # Pieces that queued up while the consumer was busy leave as one: under load the HTTP layer writes
            # fewer, larger chunks instead of falling further behind.
            while not out.empty():
                following = out.get_nowait()
                if isinstance(following, TokenLogprobs):
                    self._logprob(following)
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

    def _logprob(self, item: TokenLogprobs) -> None:
        piece = self._engine.piece
        self.logprobs.append(TokenLogprob(piece(item.token), item.logprob,
                                          tuple((piece(token), logprob) for token, logprob in item.top)))

    def cancel(self) -> None:
        self._engine.cancel(self._request)

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._engine.cancel(self._request)


class LlamaEngine:
    """An Engine backed by one llama.cpp context, in a process of its own, holding up to `max_concurrent`
    sequences at once.

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
    ) -> None:
        self.model_path = Path(model_path)
        self.chat_template_file = chat_template_file  # CHAT_TEMPLATE_FILE: replaces the GGUF's own template
        self._template: str | None = None  # the chat template in use, once loaded
        self.n_ctx = n_ctx
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
        self._vocab: Any = None
        self._formatter: Any = None
        self._prefix_formatter: Any = None
        self._info: ModelInfo | None = None
        self._supervisor: Supervisor | None = None
        self._closed = False
        # The requests the engine process has or will have, by id; guarded by _lock (the event loops add and
        # cancel, the supervisor's thread delivers and handles deaths).
        self._lock = threading.Lock()
        self._requests: dict[int, _Request] = {}
        self._ids = itertools.count(1)
        self._jobs = itertools.count(1)
        self._waiting = 0  # requests not started yet
        self._admitted = 0  # places held by requests being prepared (admit() -> generate_many())
        self._max_prompt_chars = 0  # n_ctx x the longest piece: no longer prompt can fit (set at load)
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
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        sha256 = self._sha256 or file_sha256(self.model_path)
        vocab = load_model(self.model_path, vocab_only=True)
        meta = vocab.metadata()
        eos, bos = vocab.token_eos(), vocab.token_bos()
        template = (self.chat_template_file.read_text() if self.chat_template_file
                    else meta.get("tokenizer.chat_template") or CHATML_TEMPLATE)
        self._template = template
        eos_text, bos_text = vocab.token_get_text(eos) if eos != -1 else "", vocab.token_get_text(bos) if bos != -1 else ""
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos_text, bos_token=bos_text)
        self._prefix_formatter = Jinja2ChatFormatter(template=template, eos_token=eos_text, bos_token=bos_text,
                                                     add_generation_prompt=False)
        self._vocab = vocab
        self._max_prompt_chars = self.n_ctx * longest_piece(vocab)
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
        info = _model_info(self.model_path, sha256, meta, self.n_ctx, self._supervisor.ready_info.get("n_params", 0))
        if self.chat_template_file:  # another template answers differently: another revision (cache keys, fingerprint)
            template_sha = hashlib.sha256(template.encode()).hexdigest()
            info = replace(info, revision=hashlib.sha256(f"{sha256}:{template_sha}".encode()).hexdigest()[:12],
                           extra={**info.extra, "chat_template_file": str(self.chat_template_file),
                                  "chat_template_sha256": template_sha})
        self._info = replace(info, vocab_size=vocab.n_vocab())
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
        if self._vocab is not None:
            self._vocab.close()
            self._vocab = None

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

    def check_length(self, request: GenerationRequest) -> None:
        """Refuse, before tokenizing, a prompt with more characters than the context could hold (each character is
        at least a byte, and no token stands for more than the vocabulary's longest piece)."""
        if request.messages is not None:
            characters = sum(len(m.content) for m in request.messages)
        else:
            characters = len(request.prompt or "")
        if characters > self._max_prompt_chars:
            raise PromptTooLong(characters, self._max_prompt_chars, self.n_ctx, self._max_prompt_chars // self.n_ctx)

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
        base = params.seed if params.seed is not None else random.getrandbits(32)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        job = next(self._jobs)
        requests: list[_Request] = []
        for i in range(n):
            seed = base + i if params.seed is not None else (base if i == 0 else random.getrandbits(32))
            fields = {"tokens": tokens, "boundaries": boundaries, "params": params, "seed": seed,
                      "client": request.client, "queued_at": now, "deadline": request.deadline,
                      "queue_deadline": None if self.queue_timeout is None else now + self.queue_timeout}
            requests.append(_Request(next(self._ids), job, fields, loop))
        with self._lock:
            admission.detach()  # its places become these queued requests
            self._admitted -= admission.n
            if not self._requests:
                self._drain.busy(now)
            for each in requests:
                self._requests[each.id] = each
            self._waiting += n
            self._send_job(requests)
        return [LlamaGeneration(each, self) for each in requests]

    def retry_after(self) -> int:
        """Seconds an overloaded client should wait: until the queue ahead of it has drained, at the recent pace."""
        return self._drain.retry_after(self._waiting, time.monotonic())

    def _send_job(self, requests: list[_Request]) -> None:
        """Give one request's sequences to the engine process, if it is up (called under the lock); a restart
        sends them later."""
        assert self._supervisor is not None
        leader = requests[0].id
        message = [{**each.fields, "id": each.id, "leader": leader if each.id != leader else None}
                   for each in requests]
        if self._supervisor.send(("submit", message)):
            for each in requests:
                each.sent = True

    def cancel(self, request: _Request) -> None:
        with self._lock:
            if request.cancelled or request.id not in self._requests:
                return
            request.cancelled = True
            if request.sent and self._supervisor is not None and self._supervisor.send(("cancel", [request.id])):
                return
            # Not in any engine process (it is restarting): it ends here, without running.
            self._settle(request, Finished(None, 0, 0))
        self._deliver([(request, Finished(None, 0, 0))])

    def _settle(self, request: _Request, item: Any) -> None:
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
            jobs: dict[int, list[_Request]] = {}
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

    def _deliver(self, items: list[tuple[_Request, Any]]) -> None:
        """Hand items to their requests' event loops: one wake-up per loop, however many requests and pieces."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = collections.defaultdict(list)
        for request, item in items:
            by_loop[request.loop].append((request.out, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that loop has closed: nobody is listening any more
                for request, _ in items:
                    if request.loop is loop:
                        self.cancel(request)

    def prepare(self, request: GenerationRequest) -> list[int]:
        """The prompt's tokens: the chat template applied to `messages`, or the raw `prompt`."""
        return self._prepare(request)[0]

    def _render(self, formatter: Any, messages: Any, tools: Any = None) -> list[int]:
        rendered = formatter(messages=[_template_message(m) for m in messages], tools=tools)
        return self._vocab.tokenize(rendered.prompt.encode(), add_bos=not rendered.added_special, special=True)

    def render(self, messages: Any, *, add_generation_prompt: bool = True, tools: Any = None) -> list[int]:
        """The tokens of `messages` through the model's chat template (no context-length check); `tools`: OpenAI's
        tool list, for a template that writes tools into the prompt itself."""
        formatter = self._formatter if add_generation_prompt else self._prefix_formatter
        try:
            return self._render(formatter, messages, tools)
        except Exception as exc:  # a template's raise_exception() or any Jinja error
            raise InvalidPrompt(f"the model's chat template rejected the messages: {exc}") from None

    def chat_template(self) -> str | None:
        return self._template

    def special_token(self, text: str) -> int | None:
        """The id of the one token `text` is when read as a special token (a control token, or one of the
        template's own `<...>` tokens), which plain text never tokenizes to; None when there is no such token."""
        found = self._vocab.tokenize(text.encode(), add_bos=False, special=True)
        if len(found) != 1 or self._vocab.tokenize(text.encode(), add_bos=False, special=False) == found:
            return None
        return found[0]

    def _prepare(self, request: GenerationRequest) -> tuple[list[int], tuple[int, ...], int]:
        vocab = self._vocab
        boundaries: tuple[int, ...] = ()
        if request.messages is not None:
            tools = json.loads(request.tools) if request.tools else None
            tokens = self.render(request.messages, tools=tools)
            boundaries = self._boundaries(request.messages, tokens, tools)
            if request.prefill:
                tokens = tokens + vocab.tokenize(request.prefill.encode(), add_bos=False, special=False)
        else:
            tokens = vocab.tokenize((request.prompt or "").encode(), add_bos=True, special=False)
            if not tokens:  # an empty prompt for a model that adds no BOS: start from BOS, as OpenAI allows ""
                bos = vocab.token_bos()
                if bos < 0:
                    raise InvalidPrompt("the prompt is empty and this model has no beginning-of-sequence token", "prompt")
                tokens = [bos]
        n_vocab = vocab.n_vocab()
        unknown = [token for token, _ in request.params.logit_bias if not 0 <= token < n_vocab]
        if unknown:
            raise InvalidPrompt(f"logit_bias names token ids this model does not have: {unknown[:5]} "
                                f"(its vocabulary is 0 .. {n_vocab - 1})", "logit_bias")
        max_tokens = request.params.max_tokens
        if len(tokens) + max_tokens > self.n_ctx:
            if not request.params.fit_context or len(tokens) >= self.n_ctx:
                raise ContextLengthExceeded(len(tokens), max_tokens, self.n_ctx)
            max_tokens = self.n_ctx - len(tokens)
        return tokens, boundaries, max_tokens

    def _boundaries(self, messages: Any, tokens: list[int], tools: Any = None) -> tuple[int, ...]:
        """Where the prompt's tokens end a message (and where an earlier request's prompt, the same messages
        plus the assistant's cue, ended): the points at which a cached prefix may be reused exactly."""
        if len(messages) > BOUNDARY_MESSAGES or sum(len(m.content) for m in messages) > BOUNDARY_CHARS:
            return ()
        found = set()
        for k in range(1, len(messages)):
            for formatter in (self._prefix_formatter, self._formatter):
                try:
                    prefix = self._render(formatter, messages[:k], tools)
                except Exception:  # a template may refuse a partial conversation (e.g. one ending on the system)
                    continue
                if 0 < len(prefix) < len(tokens) and tokens[: len(prefix)] == prefix:
                    found.add(len(prefix))
        return tuple(sorted(found))

    def piece(self, token: int) -> bytes:
        return self._vocab.detokenize([token])

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = False) -> list[int]:
        """The model's token ids for `text` (`add_bos`: with the beginning-of-sequence token, if it has one)."""
        return self._vocab.tokenize(text.encode(), add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        """The text of `tokens`; ids the model does not have are a ValueError."""
        n_vocab = self._vocab.n_vocab()
        unknown = [t for t in tokens if not 0 <= t < n_vocab]
        if unknown:
            raise ValueError(f"token ids this model does not have: {unknown[:5]} (its vocabulary is 0 .. {n_vocab - 1})")
        return self._vocab.detokenize(tokens).decode("utf-8", errors="replace")

    def count_tokens(self, text: str) -> int:
        return len(self._vocab.tokenize(text.encode(), add_bos=False, special=False))


def _template_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates read it (Hugging Face's convention): tool calls with their arguments as objects,
    a tool result with the id of its call."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = json.loads(message.tool_calls)
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _put_all(batch: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)


def _model_info(path: Path, sha256: str, meta: dict[str, str], n_ctx: int, n_params: int) -> ModelInfo:
    arch = meta.get("general.architecture", "")
    file_type = meta.get("general.file_type")
    quantization = FILE_TYPES.get(int(file_type)) if file_type and file_type.isdigit() else None
    # The file's name is what operators chose and recognise; general.name is often a training-run label.
    name = path.stem
    basename = meta.get("general.basename")
    size_label = meta.get("general.size_label")
    description = meta.get("general.description") or " ".join(
        x for x in (f"{meta.get('general.name') or name}:", arch and f"{arch} architecture,", size_label and f"{size_label} parameters,",
                    quantization and f"{quantization} quantization,", "GGUF served by llama.cpp") if x
    )
    extra = {k: v for k, v in (("general_name", meta.get("general.name", "")), ("architecture", arch),
                               ("basename", basename or ""),
                               ("trained_context_length", meta.get(f"{arch}.context_length", "")),
                               ("license", meta.get("general.license", ""))) if v}
    return ModelInfo(
        name=name,
        revision=sha256[:12],
        backend=BACKEND,
        description=description,
        context_length=n_ctx,
        quantization=quantization,
        parameters=n_params or None,
        path=str(path),
        sha256=sha256,
        extra=extra,
    )
