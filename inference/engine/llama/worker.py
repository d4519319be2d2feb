"""The engine process: the only process that runs llama.cpp's compute.

`python -m inference.engine.llama.worker FD` is started by the supervisor (supervisor.py) with one end of a
socket pair as FD. It reads its configuration, loads the model and a context of `slots` x `n_ctx` tokens,
decodes a small warm-up batch (a CPU on which the model's extra buffer types crash dies here, before it is
ready, and the supervisor starts it again without them), says "ready", then runs the scheduler (scheduler.py) in
its main thread while a reader thread takes commands:

    ("submit", [sequence fields, ...])   one request's sequences, queued together (or refused together)
    ("cancel", [id, ...])                the client left
    ("abort",)                           end everything in flight with an error (the shutdown timeout)
    ("close",)  or end of file           finish: what is left fails, the process exits

and it sends, once per scheduler step (not per token per request), what the step produced:

    ("step", steps, tokens_generated, prompt_tokens_reused, [(id, item), ...])

items being text, TokenLogprobs, STARTED (left the queue), Finished, or an exception; after a sequence's text, the
tokens it has produced so far (an int) when the HTTP side asked to count them. SIGINT and SIGTERM are
ignored: the HTTP process decides when the engine ends (a Ctrl-C reaches the whole process group).
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from ..base import EngineError
from .native import crash, load_model
from .scheduler import Scheduler
from .sequence import Finished, Sequence

log = logging.getLogger("inference.engine")

HEARTBEAT = 0.25  # seconds: with steps but nothing to say (a long prompt being evaluated), progress goes out this often
WARM_UP_PROMPT = b"The capital of France is"
EXIT_LOOP_FAILED = 70  # EX_SOFTWARE: the scheduler's loop raised


class Worker:
    def __init__(self, conn: Connection, config: dict[str, Any]) -> None:
        from llama_cpp import llama_cpp

        self.conn = conn
        self.config = config
        self.send_lock = threading.Lock()
        self.sequences: dict[int, Sequence] = {}
        self._sent_steps = 0
        self._sent_at = 0.0
        extra_buffers = config["extra_buffers"]
        self.model = load_model(config["model_path"], extra_buffers=extra_buffers)
        slots, n_ctx = config["slots"], config["n_ctx"]
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx * slots
        params.n_batch = params.n_ubatch = 512
        params.n_seq_max = slots
        params.kv_unified = False  # a KV stream per slot: a sequence's cells never depend on the others (scheduler.py)
        params.n_threads = params.n_threads_batch = config["n_threads"]  # N_THREADS, resolved (native.compute_threads)
        params.no_perf = True
        # Measured here on 2 cores: flash attention (which "auto" leaves off on CPU) decodes 8 sequences at once
        # about 20% faster, and one about 10%.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        self.ctx = llama_cpp.llama_init_from_model(self.model.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {slots} x {n_ctx} tokens")
        if config["crash_test"] and extra_buffers:
            crash()
        self._warm_up()
        vocab = self.model.vocab
        self.scheduler = Scheduler(
            self.ctx, slots=slots, max_queued=config["max_queued"], n_vocab=self.model.n_vocab(), vocab=vocab,
            is_eog=lambda token: llama_cpp.llama_vocab_is_eog(vocab, token),
            piece=lambda token, special=False: self.model.detokenize([token], special=special), publish=self.publish,
        )
        self.scheduler.on_crash = self.crash_exit

    def _warm_up(self) -> None:
        """Decode a few tokens in slot 0 and forget them: a native fault of this CPU shows before "ready"."""
        from llama_cpp import llama_cpp

        tokens = self.model.tokenize(WARM_UP_PROMPT, add_bos=True, special=False)
        array = (llama_cpp.llama_token * len(tokens))(*tokens)
        if llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(array, len(tokens))) != 0:
            raise RuntimeError("llama_decode failed on the warm-up batch")
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.ctx), 0, -1, -1)

    def run(self) -> None:
        self.send(("ready", {"n_params": self.model.n_params()}))
        reader = threading.Thread(target=self.read, name="engine-commands", daemon=True)
        reader.start()
        self.scheduler.run()  # returns once stopped and everything it held has ended
        from llama_cpp import llama_cpp

        llama_cpp.llama_free(self.ctx)
        self.model.close()

    def crash_exit(self) -> None:
        """The scheduler's loop (or the command reader) raised: end the process at once, as a crash would, so that
        the supervisor ends what was running with engine_restarted and keeps what waited (the loop's own clean-up
        would fail it all)."""
        logging.shutdown()
        os._exit(EXIT_LOOP_FAILED)

    def read(self) -> None:
        try:
            self._read()
        except Exception:  # a bug here would leave the engine deaf to every command: die, and be restarted
            log.exception("the engine process's command reader failed")
            self.crash_exit()

    def _read(self) -> None:
        scheduler = self.scheduler
        while True:
            try:
                command = self.conn.recv()
            except (EOFError, OSError):
                command = ("close",)
            kind = command[0]
            if kind == "submit":
                self.submit(command[1])
            elif kind == "cancel":
                for id in command[1]:
                    sequence = self.sequences.get(id)
                    if sequence is not None:
                        sequence.cancelled.set()
            elif kind == "abort":
                scheduler.stop()
            elif kind == "close":
                scheduler.stop()
                return

    def submit(self, fields: list[dict[str, Any]]) -> None:
        sequences: list[Sequence] = []
        for each in fields:
            leader = each.pop("leader")
            sequence = Sequence(**each, leader=self.sequences.get(leader) if leader is not None else None)
            sequences.append(sequence)
            self.sequences[sequence.id] = sequence
        try:
            self.scheduler.submit(*sequences)
        except EngineError as exc:
            self.publish([(sequence, exc) for sequence in sequences])

    def publish(self, items: list[tuple[Sequence, Any]]) -> None:
        """Called by the scheduler once a step (and by stop/submit from the reader thread)."""
        scheduler = self.scheduler
        steps = scheduler.steps
        now = time.monotonic()
        if not items and (steps == self._sent_steps or now - self._sent_at < HEARTBEAT):
            return
        out = []
        for sequence, item in items:
            if isinstance(item, (Finished, BaseException)):
                self.sequences.pop(sequence.id, None)
                if isinstance(item, BaseException):
                    item = portable(item)
            out.append((sequence.id, item))
            if sequence.counting and isinstance(item, str):  # the tokens behind the text so far (an int item)
                out.append((sequence.id, sequence.produced))
        self.send(("step", steps, scheduler.tokens_generated, scheduler.prompt_tokens_reused, out))
        self._sent_steps, self._sent_at = steps, now

    def send(self, message: tuple) -> None:
        with self.send_lock:
            try:
                self.conn.send(message)
            except (BrokenPipeError, ConnectionResetError, OSError):
                pass  # the HTTP process is gone: the reader sees end of file and ends the loop


def portable(error: BaseException) -> BaseException:
    """`error` if it survives pickling, else a RuntimeError with its message (the HTTP side gets a reason)."""
    if isinstance(error, EngineError):
        return error
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = Connection(int(sys.argv[1]))
    config = conn.recv()
    from ...telemetry.logs import configure_stream

    configure_stream(config["log_level"], config["log_format"])  # the service's own format, JSON included
    try:
        worker = Worker(conn, config)
    except Exception as exc:
        log.exception("the engine could not start")
        try:
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        sys.exit(1)
    worker.run()


if __name__ == "__main__":
    main()
