"""The embedded engine: llama.cpp through llama-cpp-python's low-level API, with continuous batching.

engine.py     the Engine protocol on the asyncio side (the HTTP process): admit, send to the engine process, the
              table of requests it holds, its deaths and restarts
prompts.py    the vocabulary and chat template on the HTTP side: render, tokenize, message boundaries, length checks
generation.py one request on the HTTP side: what was sent for it, the Generation fed by the engine's messages
supervisor.py starts, watches and restarts the engine process; worker.py is that process (owns llama.cpp)
scheduler.py  the step loop in its own thread: admit, reuse prefixes, evaluate prompts, decode, sample, retire
sequence.py   one request's state: tokens, position, its sampler, stop matching, UTF-8 assembly, cancel flag
sampling.py   SamplingParams -> a native llama_sampler chain (no logits copied into Python)
admission.py  the fair queue (clients in turn) and the Retry-After pace; native.py model loading, extra buffers
models.py     the default model: find, fetch, verify; a GGUF's metadata as ModelInfo (needs no llama.cpp: the
              upstream-only image pulls nothing but imports it, so this package's __init__ imports nothing)
"""
