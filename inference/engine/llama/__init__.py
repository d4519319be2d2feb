"""The embedded engine: llama.cpp through llama-cpp-python's low-level API, with continuous batching.

engine.py     the Engine protocol on the asyncio side: load, render and tokenize, admit, hand pieces back
scheduler.py  the step loop in its own thread: admit, reuse prefixes, evaluate prompts, decode, sample, retire
sequence.py   one request's state: tokens, position, its sampler, stop matching, UTF-8 assembly, cancel flag
sampling.py   SamplingParams -> a native llama_sampler chain (no logits copied into Python)
"""

from .engine import BACKEND, LlamaEngine, file_sha256

__all__ = ["BACKEND", "LlamaEngine", "file_sha256"]
