"""Loading a GGUF model into llama.cpp, and whether ggml's extra buffer types are safe on this CPU.

Extra buffer types are ggml's CPU-specific weight layouts (AMX tiles on Intel Xeon Sapphire Rapids and later,
repacked blocks elsewhere). llama-cpp-python 0.3.36 built with native CPU flags places the weights in the AMX
buffer type on an AMX CPU and segfaults in the first llama_decode (llama.cpp #20824, open; Ollama #17006). The
same model with `use_extra_bufts = False` decodes correctly. LLAMA_EXTRA_BUFFERS decides: `on`, `off`, or `auto`:
the engine process (worker.py) warms up with them, and when it dies doing so the supervisor starts it again
without them.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

CGROUP_ROOT = Path("/sys/fs/cgroup")


def load_model(path: Path, *, extra_buffers: bool = True, vocab_only: bool = False) -> Any:
    """llama-cpp-python's model wrapper (tokenizer, metadata, the native model) for the GGUF file at `path`."""
    from llama_cpp import _logger, llama_cpp
    from llama_cpp._internals import LlamaModel

    _logger.set_verbose(False)  # llama.cpp's own log: errors only (what Llama(verbose=False) did)
    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = extra_buffers
    params.vocab_only = vocab_only
    # verbose=True only skips llama-cpp-python's redirection of the process's stdout/stderr file descriptors to
    # /dev/null around the load (not thread-safe: other threads' log lines would vanish); llama.cpp's log still
    # goes through the callback set above.
    return LlamaModel(path_model=str(path), params=params, verbose=True)


def cpu_quota(root: Path = CGROUP_ROOT, membership: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPUs this process's cgroup may use per period (`docker run --cpus`, a Kubernetes CPU limit): cgroup v2's
    cpu.max, or v1's cpu.cfs_quota_us / cpu.cfs_period_us. None when there is no quota or it cannot be read."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        path = path.lstrip("/")
        if controllers == "":  # v2: one unified hierarchy
            for folder in (root / path, root):
                try:
                    quota, period = (folder / "cpu.max").read_text().split()
                except (OSError, ValueError):
                    continue
                return None if quota == "max" else int(quota) / int(period)
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own hierarchy
            for folder in (root / controllers / path, root / "cpu" / path, root / controllers, root / "cpu"):
                try:
                    quota = int((folder / "cpu.cfs_quota_us").read_text())
                    period = int((folder / "cpu.cfs_period_us").read_text())
                except (OSError, ValueError):
                    continue
                return None if quota <= 0 or period <= 0 else quota / period
    return None


def compute_threads(quota: float | None = None, affinity: int | None = None) -> tuple[int, str]:
    """Threads for llama.cpp when N_THREADS is 0, and why: the CPUs in this process's affinity mask (llama.cpp's own
    default is half of them; generation is compute-bound, so all is faster: 40 -> 70 tokens/s on 2 cores), or fewer
    when a cgroup quota allows fewer (whole CPUs, at least one: a thread more than the quota makes every step wait
    for the throttled one)."""
    affinity = len(os.sched_getaffinity(0)) if affinity is None else affinity
    if quota is not None and quota < affinity:
        threads = max(1, int(quota))
        return threads, f"the cgroup CPU quota allows {quota:g} of the {affinity} CPUs in this process's affinity mask"
    return affinity, f"the {affinity} CPUs in this process's affinity mask" + (
        f" (the cgroup CPU quota allows {quota:g})" if quota is not None else "")


def system_info() -> str:
    """llama.cpp's build and CPU features, e.g. "CPU : SSE3 = 1 | ... | AMX_INT8 = 1 | ..."."""
    from llama_cpp import llama_cpp

    return llama_cpp.llama_print_system_info().decode(errors="replace")


def extra_buffer_hazard(info: str | None = None) -> str | None:
    """The CPU feature whose extra buffer type is known to crash llama.cpp, if this build uses it; else None."""
    info = system_info() if info is None else info
    features = {part.split("=")[0].strip(): part.split("=")[-1].strip() for part in info.split("|") if "=" in part}
    return "AMX" if features.get("AMX_INT8") == "1" else None


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


def longest_piece(model: Any) -> int:
    """The most bytes any one token of `model`'s vocabulary stands for (special tokens' text included): a prompt of
    B bytes is at least B / longest_piece tokens, which bounds what may be worth tokenizing at all."""
    import ctypes

    import llama_cpp

    size = 256
    buffer = ctypes.create_string_buffer(size)
    longest = 1
    for token in range(model.n_vocab()):
        n = llama_cpp.llama_token_to_piece(model.vocab, token, buffer, size, 0, True)
        longest = max(longest, abs(n))  # negative: the piece needs -n bytes (longer than the buffer)
    return longest
