"""SamplingParams -> a native llama.cpp sampler chain, one per sequence.

llama_sampler_sample reads the sequence's logits row inside llama.cpp and returns the token: nothing of the
vocabulary-sized logits vector crosses into Python on the hot path.
"""

from __future__ import annotations

from llama_cpp import llama_cpp as C

from ..base import SamplingParams

# llama.cpp's sampling defaults (also llama-cpp-python's server's): they keep small models coherent.
TOP_K = 40
MIN_P = 0.05
PENALTY_LAST_N = 64  # llama.cpp's default window for the penalties: the last 64 generated tokens


class Sampler:
    """A sampler chain for one sequence; `close()` frees it (the scheduler does, exactly once)."""

    def __init__(self, params: SamplingParams, seed: int, n_vocab: int) -> None:
        chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        if params.frequency_penalty or params.presence_penalty or params.repetition_penalty != 1.0:
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_penalties(
                n_vocab, PENALTY_LAST_N, params.repetition_penalty, params.frequency_penalty, params.presence_penalty))
        if params.logit_bias:
            biases = (C.llama_logit_bias * len(params.logit_bias))(
                *(C.llama_logit_bias(token, bias) for token, bias in params.logit_bias))
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_logit_bias(n_vocab, len(biases), biases))
        if params.temperature <= 0:
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_greedy())
        else:
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_k(TOP_K))
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_p(params.top_p, 1))
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_min_p(MIN_P, 1))
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_temp(params.temperature))
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        self._chain = chain

    def sample(self, ctx: C.llama_context_p, index: int) -> int:
        """The next token from the logits of batch row `index` (the chain also records it as accepted)."""
        return C.llama_sampler_sample(self._chain, ctx, index)

    def close(self) -> None:
        if self._chain is not None:
            C.llama_sampler_free(self._chain)
            self._chain = None
