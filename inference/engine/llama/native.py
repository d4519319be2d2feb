"""Loading a GGUF model into llama.cpp, and whether ggml's extra buffer types are safe on this CPU.

Extra buffer types are ggml's CPU-specific weight layouts (AMX tiles on Intel Xeon Sapphire Rapids and later,
repacked blocks elsewhere). llama-cpp-python 0.3.36 built with native CPU flags places the weights in the AMX
buffer type on an AMX CPU and segfaults in the first llama_decode (llama.cpp #20824, open; Ollama #17006). The
same model with `use_extra_bufts = False` decodes correctly. LLAMA_EXTRA_BUFFERS decides: `on`, `off`, or `auto`,
which runs a self-test in a child process (load, decode one small batch) where the hazard exists, and serves
without extra buffers when the child dies.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EXTRA_BUFFER_MODES = ("auto", "on", "off")
SELF_TEST_TIMEOUT = 120.0  # seconds; a self-test that hangs counts as a failure
SELF_TEST_PROMPT = b"The capital of France is"


def load_model(path: Path, *, extra_buffers: bool = True, vocab_only: bool = False) -> Any:
    """llama-cpp-python's model wrapper (tokenizer, metadata, the native model) for the GGUF file at `path`."""
    from llama_cpp import _logger, llama_cpp
    from llama_cpp._internals import LlamaModel

    _logger.set_verbose(False)  # llama.cpp's own log: errors only (what Llama(verbose=False) did)
    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = extra_buffers
    params.vocab_only = vocab_only
    return LlamaModel(path_model=str(path), params=params, verbose=False)


def system_info() -> str:
    """llama.cpp's build and CPU features, e.g. "CPU : SSE3 = 1 | ... | AMX_INT8 = 1 | ..."."""
    from llama_cpp import llama_cpp

    return llama_cpp.llama_print_system_info().decode(errors="replace")


def extra_buffer_hazard(info: str | None = None) -> str | None:
    """The CPU feature whose extra buffer type is known to crash llama.cpp, if this build uses it; else None."""
    info = system_info() if info is None else info
    features = {part.split("=")[0].strip(): part.split("=")[-1].strip() for part in info.split("|") if "=" in part}
    return "AMX" if features.get("AMX_INT8") == "1" else None


def use_extra_buffers(mode: str, model_path: Path, *, crash_test: bool = False) -> bool:
    """Whether to load the model with extra buffer types. `auto` pays for a self-test (a child process loads the
    model with them and decodes a small batch, about a second) only where a known hazard exists, or where the
    test-only crash setting asks for one; when the child dies, the answer is no, with one warning saying why."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    hazard = extra_buffer_hazard()
    if hazard is None and not crash_test:
        return True
    feature = hazard or "TEST_ONLY_CRASH_WITH_EXTRA_BUFFERS"
    started = time.monotonic()
    outcome = self_test(model_path, crash_test=crash_test)
    took = time.monotonic() - started
    if outcome is None:
        log.info("extra buffer types (%s) passed the self-test in %.1f s: using them", feature, took)
        return True
    log.warning("serving without llama.cpp's extra buffer types: with them (%s on this CPU) a test decode %s "
                "(known llama.cpp fault, #20824); LLAMA_EXTRA_BUFFERS=on forces them, =off skips this test (%.1f s)",
                feature, outcome, took)
    return False


def self_test(model_path: Path, *, crash_test: bool = False) -> str | None:
    """Load `model_path` with extra buffer types and decode a small batch in a child process: None when it works,
    else what happened to the child ("died of SIGSEGV", "exited with status 1", "hung")."""
    command = [sys.executable, "-m", "inference.engine.llama.native", str(model_path)]
    if crash_test:
        command.append("--crash")
    try:
        result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, timeout=SELF_TEST_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"did not finish within {SELF_TEST_TIMEOUT:g} s"
    if result.returncode == 0:
        return None
    return describe_exit(result.returncode)


def describe_exit(status: int) -> str:
    """A process's exit status in words: "died of SIGSEGV (Segmentation fault)", "exited with status 3"."""
    if status < 0:
        try:
            sig = signal.Signals(-status)
            return f"died of {sig.name} ({signal.strsignal(sig) or 'signal'})"
        except ValueError:
            return f"died of signal {-status}"
    return f"exited with status {status}"


def crash() -> None:
    """Dereference NULL: the kind of native fault the self-test and the supervisor must survive (test only)."""
    import ctypes

    ctypes.string_at(0)


def _decode_once(model_path: Path, crash_test: bool) -> None:
    from llama_cpp import llama_cpp

    model = load_model(model_path, extra_buffers=True)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 64, 64, 64
    params.n_threads = params.n_threads_batch = len(os.sched_getaffinity(0))
    ctx = llama_cpp.llama_init_from_model(model.model, params)
    if not ctx:
        raise SystemExit(2)
    tokens = model.tokenize(SELF_TEST_PROMPT, add_bos=True, special=False)
    array = (llama_cpp.llama_token * len(tokens))(*tokens)  # kept alive until the decode
    batch = llama_cpp.llama_batch_get_one(array, len(tokens))
    if crash_test:
        crash()
    if llama_cpp.llama_decode(ctx, batch) != 0:
        raise SystemExit(3)
    llama_cpp.llama_free(ctx)
    model.close()


if __name__ == "__main__":
    _decode_once(Path(sys.argv[1]), "--crash" in sys.argv[2:])
