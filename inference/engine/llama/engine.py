"""The embedded engine on the asyncio side: load the model, render and tokenize prompts, admit them, stream back.

The event loop never runs model code. `generate` renders the chat template and tokenizes in a helper thread (so
a long prompt cannot stall the loop), then hands the sequence to the scheduler (scheduler.py), whose thread owns
the llama.cpp context and runs up to `max_concurrent` sequences together; pieces come back through
`call_soon_threadsafe`. A client that goes away sets its sequence's cancel flag: the scheduler frees its slot at
the next step, and a sequence still waiting is dropped before it runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from ..base import (
    ContextLengthExceeded,
    EngineNotReady,
    EngineOverloaded,
    FinishReason,
    GenerationRequest,
    InvalidPrompt,
    ModelInfo,
    TokenLogprob,
)
from .native import crash, load_model, use_extra_buffers
from .scheduler import Scheduler, TokenLogprobs
from .sequence import Finished, Sequence

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
SWITCH_INTERVAL = 0.0005  # seconds
BOUNDARY_MESSAGES = 32
BOUNDARY_CHARS = 32_000


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class LlamaGeneration:
    """Text pieces of one request as the worker produces them; `aclose()` cancels the job."""

    def __init__(self, sequence: Sequence, piece: Callable[[int], bytes]) -> None:
        self._sequence = sequence
        self._piece = piece
        self._done = False
        self._held: Any = None  # the item after a run of pieces, taken from the queue while joining them
        self.prompt_tokens = len(sequence.tokens)
        self.completion_tokens = 0
        self.reused_prompt_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.logprobs: list[TokenLogprob] = []

    def __aiter__(self) -> "LlamaGeneration":
        return self

    async def __anext__(self) -> str:
        if self._done:
            raise StopAsyncIteration
        out = self._sequence.out
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
            raise StopAsyncIteration
        raise item

    def _logprob(self, item: TokenLogprobs) -> None:
        piece = self._piece
        self.logprobs.append(TokenLogprob(piece(item.token), item.logprob,
                                          tuple((piece(token), logprob) for token, logprob in item.top)))

    def cancel(self) -> None:
        self._sequence.cancelled.set()

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._sequence.cancelled.set()


class LlamaEngine:
    """An Engine backed by one llama.cpp context holding up to `max_concurrent` sequences at once.

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
    ) -> None:
        self.model_path = Path(model_path)
        self.extra_buffers = extra_buffers  # LLAMA_EXTRA_BUFFERS: auto, on, off (native.py)
        self.crash_test = crash_test  # TEST_ONLY_CRASH_WITH_EXTRA_BUFFERS
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.max_queued = max_queued
        self.max_concurrent = max_concurrent
        self.queue_timeout = queue_timeout
        self._sha256 = sha256
        self._llm: Any = None
        self._ctx: Any = None
        self._formatter: Any = None
        self._prefix_formatter: Any = None
        self._info: ModelInfo | None = None
        self._scheduler: Scheduler | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

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
        return self._scheduler.queue_depth if self._scheduler is not None else 0

    @property
    def progress(self) -> int:
        """Steps the engine has taken (llama_decode calls): the watchdog's measure of it moving."""
        return self._scheduler.steps if self._scheduler is not None else 0

    @property
    def busy(self) -> bool:
        return self._scheduler is not None and self._scheduler.busy

    def abort(self) -> None:
        """End every request in flight with an error (shutdown timeout) and refuse new ones."""
        self._closed = True
        if self._scheduler is not None:
            self._scheduler.stop()

    @property
    def tokens_generated(self) -> int:
        return self._scheduler.tokens_generated if self._scheduler is not None else 0

    @property
    def prompt_tokens_reused(self) -> int:
        return self._scheduler.prompt_tokens_reused if self._scheduler is not None else 0

    def load(self) -> None:
        from llama_cpp import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        sha256 = self._sha256 or file_sha256(self.model_path)
        extra_buffers = use_extra_buffers(self.extra_buffers, self.model_path, crash_test=self.crash_test)
        # llama.cpp's own default is half the cores; generation is compute-bound, so all of them is faster
        # (measured: 40 -> 70 tokens/s on 2 cores) and the event loop still answers between tokens.
        threads = self.n_threads or len(os.sched_getaffinity(0))
        llm = load_model(self.model_path, extra_buffers=extra_buffers)
        if self.crash_test and extra_buffers:
            crash()
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx * self.max_concurrent
        params.n_batch = params.n_ubatch = 512
        params.n_seq_max = self.max_concurrent
        params.kv_unified = False  # a KV stream per slot: a sequence's cells never depend on the others (scheduler.py)
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        # Measured here on 2 cores: flash attention (which "auto" leaves off on CPU) decodes 8 sequences at once
        # about 20% faster, and one about 10%.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        ctx = llama_cpp.llama_init_from_model(llm.model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {self.max_concurrent} x {self.n_ctx} tokens")
        meta = llm.metadata()
        model = llm
        eos, bos = llm.token_eos(), llm.token_bos()
        template = meta.get("tokenizer.chat_template") or CHATML_TEMPLATE
        eos_text, bos_text = model.token_get_text(eos) if eos != -1 else "", model.token_get_text(bos) if bos != -1 else ""
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos_text, bos_token=bos_text)
        self._prefix_formatter = Jinja2ChatFormatter(template=template, eos_token=eos_text, bos_token=bos_text,
                                                     add_generation_prompt=False)
        vocab = model.vocab
        self._llm, self._ctx = llm, ctx
        self._scheduler = Scheduler(
            ctx, slots=self.max_concurrent, max_queued=self.max_queued, n_vocab=model.n_vocab(), vocab=vocab,
            is_eog=lambda token: llama_cpp.llama_vocab_is_eog(vocab, token),
            piece=self._piece,
        )
        self._info = replace(_model_info(self.model_path, sha256, meta, self.n_ctx, model.n_params()),
                             vocab_size=model.n_vocab())
        # The scheduler thread needs the GIL for a moment between two llama_decode calls; with Python's default
        # 5 ms switch interval it could wait that long for the event loop thread to let go, every step.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        self._thread = threading.Thread(target=self._scheduler.run, name="llama-scheduler", daemon=True)
        self._thread.start()
        log.info("loaded %s (%s, revision %s): %d sequences at once, %d tokens of context each", self._info.name,
                 self._info.quantization, self._info.revision, self.max_concurrent, self.n_ctx)

    async def close(self) -> None:
        await asyncio.to_thread(self.shutdown)

    def shutdown(self) -> None:
        """Refuse new work, fail what is queued, cancel what runs (within a step) and free the model."""
        from llama_cpp import llama_cpp

        self._closed = True
        if self._scheduler is not None:
            self._scheduler.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    # --- request side (event loop) -------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> LlamaGeneration:
        return (await self.generate_many(request, 1))[0]

    async def generate_many(self, request: GenerationRequest, n: int) -> list[LlamaGeneration]:
        """`n` answers to one prompt: the first evaluates it, the others start from a copy of its KV cache."""
        scheduler = self._scheduler
        if scheduler is None or self._closed:
            raise EngineNotReady("the model is not loaded" if not self._closed else "the service is shutting down")
        # Refused before any rendering or tokenizing: overload must cost almost nothing.
        if scheduler.queue_depth >= self.max_queued:
            raise EngineOverloaded(scheduler.queue_depth, scheduler.retry_after())
        tokens, boundaries, max_tokens = await asyncio.to_thread(self._prepare, request)
        params = request.params if max_tokens == request.params.max_tokens else replace(request.params, max_tokens=max_tokens)
        base = params.seed if params.seed is not None else random.getrandbits(32)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        admission = {"client": request.client, "queued_at": now, "deadline": request.deadline,
                     "queue_deadline": None if self.queue_timeout is None else now + self.queue_timeout}
        sequences: list[Sequence] = []
        for i in range(n):
            seed = base + i if params.seed is not None else (base if i == 0 else random.getrandbits(32))
            sequences.append(Sequence(tokens, boundaries, params, seed, loop, leader=sequences[0] if i else None,
                                      **admission))
        scheduler.submit(*sequences)
        return [LlamaGeneration(sequence, self._piece) for sequence in sequences]

    def prepare(self, request: GenerationRequest) -> list[int]:
        """The prompt's tokens: the chat template applied to `messages`, or the raw `prompt`."""
        return self._prepare(request)[0]

    def _render(self, formatter: Any, messages: Any) -> list[int]:
        rendered = formatter(messages=[{"role": m.role, "content": m.content} for m in messages])
        return self._llm.tokenize(rendered.prompt.encode(), add_bos=not rendered.added_special, special=True)

    def render(self, messages: Any, *, add_generation_prompt: bool = True) -> list[int]:
        """The tokens of `messages` through the model's chat template (no context-length check)."""
        formatter = self._formatter if add_generation_prompt else self._prefix_formatter
        try:
            return self._render(formatter, messages)
        except Exception as exc:  # a template's raise_exception() or any Jinja error
            raise InvalidPrompt(f"the model's chat template rejected the messages: {exc}") from None

    def _prepare(self, request: GenerationRequest) -> tuple[list[int], tuple[int, ...], int]:
        llm = self._llm
        boundaries: tuple[int, ...] = ()
        if request.messages is not None:
            tokens = self.render(request.messages)
            boundaries = self._boundaries(request.messages, tokens)
        else:
            tokens = llm.tokenize((request.prompt or "").encode(), add_bos=True, special=False)
            if not tokens:  # an empty prompt for a model that adds no BOS: start from BOS, as OpenAI allows ""
                bos = llm.token_bos()
                if bos < 0:
                    raise InvalidPrompt("the prompt is empty and this model has no beginning-of-sequence token", "prompt")
                tokens = [bos]
        n_vocab = self._llm.n_vocab()
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

    def _boundaries(self, messages: Any, tokens: list[int]) -> tuple[int, ...]:
        """Where the prompt's tokens end a message (and where an earlier request's prompt, the same messages
        plus the assistant's cue, ended): the points at which a cached prefix may be reused exactly."""
        if len(messages) > BOUNDARY_MESSAGES or sum(len(m.content) for m in messages) > BOUNDARY_CHARS:
            return ()
        found = set()
        for k in range(1, len(messages)):
            for formatter in (self._prefix_formatter, self._formatter):
                try:
                    prefix = self._render(formatter, messages[:k])
                except Exception:  # a template may refuse a partial conversation (e.g. one ending on the system)
                    continue
                if 0 < len(prefix) < len(tokens) and tokens[: len(prefix)] == prefix:
                    found.add(len(prefix))
        return tuple(sorted(found))

    def _piece(self, token: int) -> bytes:
        return self._llm.detokenize([token])

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = False) -> list[int]:
        """The model's token ids for `text` (`add_bos`: with the beginning-of-sequence token, if it has one)."""
        return self._llm.tokenize(text.encode(), add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        """The text of `tokens`; ids the model does not have are a ValueError."""
        n_vocab = self._llm.n_vocab()
        unknown = [t for t in tokens if not 0 <= t < n_vocab]
        if unknown:
            raise ValueError(f"token ids this model does not have: {unknown[:5]} (its vocabulary is 0 .. {n_vocab - 1})")
        return self._llm.detokenize(tokens).decode("utf-8", errors="replace")

    def count_tokens(self, text: str) -> int:
        return len(self._llm.tokenize(text.encode(), add_bos=False, special=False))


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
