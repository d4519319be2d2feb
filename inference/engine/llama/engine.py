"""The embedded engine: llama-cpp-python running a GGUF file in one dedicated worker thread.

The event loop never runs model code. `generate` renders and tokenizes the prompt in a helper thread
(so a long prompt cannot stall the loop), then puts a job on a bounded queue. The worker thread owns the
llama.cpp context, generates one token at a time and hands each decoded piece back to the loop with
`call_soon_threadsafe`; between tokens it checks the job's cancel flag, so a client that goes away frees
the model within one token.
"""

from __future__ import annotations

import asyncio
import codecs
import hashlib
import logging
import os
import queue
import random
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .base import (
    ContextLengthExceeded,
    EngineNotReady,
    EngineOverloaded,
    FinishReason,
    GenerationRequest,
    InvalidPrompt,
    ModelInfo,
    SamplingParams,
)

log = logging.getLogger(__name__)

BACKEND = "llama.cpp"
# llama.cpp's sampling defaults (also llama-cpp-python's server's): they keep small models coherent.
TOP_K = 40
MIN_P = 0.05
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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class _Finished:
    finish_reason: FinishReason | None
    completion_tokens: int


@dataclass
class _Job:
    tokens: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the loop has closed (shutdown): nobody is listening any more
            self.cancelled.set()


class LlamaGeneration:
    """Text pieces of one request as the worker produces them; `aclose()` cancels the job."""

    def __init__(self, job: _Job, prompt_tokens: int) -> None:
        self._job = job
        self._done = False
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None

    def __aiter__(self) -> "LlamaGeneration":
        return self

    async def __anext__(self) -> str:
        if self._done:
            raise StopAsyncIteration
        item = await self._job.out.get()
        if isinstance(item, str):
            return item
        self._done = True
        if isinstance(item, _Finished):
            self.finish_reason = item.finish_reason
            self.completion_tokens = item.completion_tokens
            raise StopAsyncIteration
        raise item

    def cancel(self) -> None:
        self._job.cancelled.set()

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._job.cancelled.set()


class LlamaEngine:
    """An Engine backed by one llama.cpp context. One request generates at a time; the rest wait in order."""

    def __init__(
        self,
        model_path: Path,
        *,
        n_ctx: int = 2048,
        n_threads: int = 0,
        max_queued: int = 64,
        sha256: str | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self._sha256 = sha256
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queued)
        self._llm: Any = None
        self._formatter: Any = None
        self._eog: Any = None
        self._info: ModelInfo | None = None
        self._worker: threading.Thread | None = None
        self._closed = False
        self.tokens_generated = 0  # written only by the worker thread

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
        return self._jobs.qsize()

    def load(self) -> None:
        from llama_cpp import Llama, llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        sha256 = self._sha256 or file_sha256(self.model_path)
        # llama.cpp's own default is half the cores; generation is compute-bound, so all of them is faster
        # (measured: 40 -> 70 tokens/s on 2 cores) and the event loop still answers between tokens.
        threads = self.n_threads or len(os.sched_getaffinity(0))
        llm = Llama(
            model_path=str(self.model_path), n_ctx=self.n_ctx, n_threads=threads, n_threads_batch=threads,
            verbose=False,
        )
        meta = llm.metadata
        model = llm._model  # llama-cpp-python has no public accessor for the vocab or parameter count
        eos, bos = llm.token_eos(), llm.token_bos()
        self._formatter = Jinja2ChatFormatter(
            template=meta.get("tokenizer.chat_template") or CHATML_TEMPLATE,
            eos_token=model.token_get_text(eos) if eos != -1 else "",
            bos_token=model.token_get_text(bos) if bos != -1 else "",
        )
        self._eog = lambda token: llama_cpp.llama_vocab_is_eog(model.vocab, token)
        self._llm = llm
        self._info = _model_info(self.model_path, sha256, meta, llm.n_ctx(), model.n_params())
        self._worker = threading.Thread(target=self._work, name="llama-worker", daemon=True)
        self._worker.start()
        log.info("loaded %s (%s, revision %s)", self._info.name, self._info.quantization, self._info.revision)

    async def close(self) -> None:
        await asyncio.to_thread(self.shutdown)

    def shutdown(self) -> None:
        """Refuse new work, fail what is queued, stop the worker (after its current token) and free the model."""
        self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit(EngineNotReady("the service is shutting down"))
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join(timeout=10)
            self._worker = None

    # --- request side (event loop) -------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> LlamaGeneration:
        if self._llm is None or self._closed:
            raise EngineNotReady("the model is not loaded" if not self._closed else "the service is shutting down")
        if self._jobs.full():
            raise EngineOverloaded(self._jobs.qsize())
        tokens, max_tokens = await asyncio.to_thread(self._prepare, request)
        params = request.params if max_tokens == request.params.max_tokens else replace(request.params, max_tokens=max_tokens)
        job = _Job(tokens, params, asyncio.get_running_loop())
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise EngineOverloaded(self._jobs.qsize()) from None
        return LlamaGeneration(job, len(tokens))

    def prepare(self, request: GenerationRequest) -> list[int]:
        """The prompt's tokens: the chat template applied to `messages`, or the raw `prompt`."""
        return self._prepare(request)[0]

    def _prepare(self, request: GenerationRequest) -> tuple[list[int], int]:
        llm = self._llm
        if request.messages is not None:
            try:
                rendered = self._formatter(messages=[{"role": m.role, "content": m.content} for m in request.messages])
            except Exception as exc:  # a template's raise_exception() or any Jinja error
                raise InvalidPrompt(f"the model's chat template rejected the messages: {exc}") from None
            tokens = llm.tokenize(rendered.prompt.encode(), add_bos=not rendered.added_special, special=True)
        else:
            tokens = llm.tokenize((request.prompt or "").encode(), add_bos=True, special=False)
            if not tokens:  # an empty prompt for a model that adds no BOS: start from BOS, as OpenAI allows ""
                bos = llm.token_bos()
                if bos < 0:
                    raise InvalidPrompt("the prompt is empty and this model has no beginning-of-sequence token", "prompt")
                tokens = [bos]
        max_tokens = request.params.max_tokens
        if len(tokens) + max_tokens > self.n_ctx:
            if not request.params.fit_context or len(tokens) >= self.n_ctx:
                raise ContextLengthExceeded(len(tokens), max_tokens, self.n_ctx)
            max_tokens = self.n_ctx - len(tokens)
        return tokens, max_tokens

    def count_tokens(self, text: str) -> int:
        return len(self._llm.tokenize(text.encode(), add_bos=False, special=False))

    # --- worker thread -------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():
                job.emit(_Finished(None, 0))
                continue
            try:
                job.emit(self._run(job))
            except Exception as exc:
                log.exception("generation failed")
                job.emit(exc)

    def _run(self, job: _Job) -> _Finished:
        llm, params = self._llm, job.params
        llm.set_seed(params.seed if params.seed is not None else random.getrandbits(32))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = [s for s in params.stop if s]
        held = ""  # decoded text not yet sent because it may be the start of a stop sequence
        produced = 0
        finish: FinishReason | None = "length"
        stopped = False
        # Reusing the previous prompt's KV cache evaluates only the new suffix, in batches of another shape;
        # llama.cpp's logits then differ in the last bits and temperature 0 stops being repeatable. Evaluating
        # every prompt whole keeps identical requests identical (and cacheable), for a small prompt-time cost.
        llm.reset()
        tokens = llm.generate(
            job.tokens, temp=params.temperature, top_p=params.top_p, top_k=TOP_K, min_p=MIN_P, repeat_penalty=1.0
        )
        for token in tokens:
            if job.cancelled.is_set():
                finish = None
                break
            if self._eog(token):
                finish = "stop"
                break
            produced += 1
            self.tokens_generated += 1
            held += decoder.decode(llm.detokenize([token]))
            if stops:
                cut = _find_stop(held, stops)
                if cut is not None:
                    held, finish, stopped = held[:cut], "stop", True
                    break
                keep = _partial_stop(held, stops)
                ready, held = held[: len(held) - keep], held[len(held) - keep :]
            else:
                ready, held = held, ""
            if ready:
                job.emit(ready)
            if produced >= params.max_tokens:
                break
        tokens.close()
        if finish is not None:
            if not stopped:  # bytes of an unfinished character belong to the answer unless a stop cut it
                held += decoder.decode(b"", final=True)
            if held:
                job.emit(held)
        return _Finished(finish, produced)


def _find_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _partial_stop(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could still grow into a stop sequence."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


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
