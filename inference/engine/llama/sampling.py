"""SamplingParams -> a native llama.cpp sampler chain, one per sequence.

llama_sampler_sample reads the sequence's logits row inside llama.cpp and returns the token: nothing of the
vocabulary-sized logits vector crosses into Python on the hot path.

A grammar (structured output) is not in the chain: checking every one of the vocabulary's tokens against it each
step halved the speed here. As llama.cpp's own common sampler does, the token is sampled without it, then only
that token is checked; only when the grammar rejects it is the grammar applied to the whole vocabulary and the
token sampled again from what it allows.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import numpy as np
from llama_cpp import llama_cpp as C

from ..base import SamplingParams

# llama.cpp's sampling defaults (also llama-cpp-python's server's): they keep small models coherent.
TOP_K = 40
MIN_P = 0.05
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data
PENALTY_LAST_N = 64  # llama.cpp's default window for the penalties: the last 64 generated tokens


class Sampler:
    """A sampler chain for one sequence; `close()` frees it (the scheduler does, exactly once)."""

    def __init__(self, params: SamplingParams, seed: int, n_vocab: int, vocab: Any = None) -> None:
        self._chain = self._filters = self._final = self._grammar = None
        if params.grammar is None:
            self._chain = _chain()
            _add_filters(self._chain, params, n_vocab)
            _add_final(self._chain, params, seed)
            return
        # With a grammar: the filters (which narrow the candidates to the top ones) and the final draw are kept
        # apart, so the grammar can be applied between them to a few candidates instead of the whole vocabulary.
        self._filters, self._final = _chain(), _chain()
        _add_filters(self._filters, params, n_vocab, narrow=True)
        _add_final(self._final, params, seed)
        self._grammar = C.llama_sampler_init_grammar(vocab, params.grammar.encode(), b"root")
        if not self._grammar:
            self.close()
            raise ValueError("llama.cpp could not parse the response format's grammar")
        self._n_vocab = n_vocab
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._candidates = np.zeros(n_vocab, dtype=TOKEN_DATA)
        self._one = np.zeros(1, dtype=TOKEN_DATA)

    def sample(self, ctx: C.llama_context_p, index: int) -> int:
        """The next token from the logits of batch row `index` (recorded as accepted by the samplers)."""
        if self._grammar is None:
            return C.llama_sampler_sample(self._chain, ctx, index)
        logits = np.ctypeslib.as_array(C.llama_get_logits_ith(ctx, index), shape=(self._n_vocab,))
        token = self._draw(self._narrowed(logits))
        if not self._allowed(token):
            # The grammar on the top candidates only; on the whole vocabulary when it allows none of them.
            array = self._narrowed(logits)
            C.llama_sampler_apply(self._grammar, ctypes.byref(array))
            array.sorted = False  # the grammar set rejected logits to -inf: the top-k order no longer holds
            if not any(math.isfinite(array.data[i].logit) for i in range(array.size)):
                array = self._filled(logits)
                C.llama_sampler_apply(self._grammar, ctypes.byref(array))
                C.llama_sampler_apply(self._filters, ctypes.byref(array))
            token = self._draw(array)
            # Accepting a token the grammar forbids aborts the whole process inside llama.cpp: never do it.
            if not self._allowed(token):
                raise RuntimeError("the response format's grammar allows no token here")
        for sampler in (self._grammar, self._filters, self._final):
            C.llama_sampler_accept(sampler, token)
        return token

    def _filled(self, logits: np.ndarray) -> C.llama_token_data_array:
        candidates = self._candidates  # the samplers sort it in place: refilled every time
        candidates["id"] = self._ids
        candidates["logit"] = logits
        candidates["p"] = 0.0
        return _token_data_array(candidates)

    def _narrowed(self, logits: np.ndarray) -> C.llama_token_data_array:
        array = self._filled(logits)
        C.llama_sampler_apply(self._filters, ctypes.byref(array))
        return array

    def _draw(self, array: C.llama_token_data_array) -> int:
        C.llama_sampler_apply(self._final, ctypes.byref(array))
        return int(array.data[array.selected].id)

    def _allowed(self, token: int) -> bool:
        one = self._one
        one["id"], one["logit"], one["p"] = token, 1.0, 0.0
        array = _token_data_array(one)
        C.llama_sampler_apply(self._grammar, ctypes.byref(array))
        return bool(np.isfinite(one["logit"][0]))

    def close(self) -> None:
        for name in ("_chain", "_filters", "_final", "_grammar"):
            sampler = getattr(self, name)
            if sampler is not None:
                C.llama_sampler_free(sampler)
                setattr(self, name, None)


def _chain() -> Any:
    return C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())


def _add_filters(chain: Any, params: SamplingParams, n_vocab: int, *, narrow: bool = False) -> None:
    """Penalties, logit bias and the top-k/top-p/min-p cut (for greedy decoding only with `narrow`: the greedy
    choice among the top 40 is the greedy choice, unless a grammar rejects all of them)."""
    if params.frequency_penalty or params.presence_penalty or params.repetition_penalty != 1.0:
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_penalties(
            n_vocab, PENALTY_LAST_N, params.repetition_penalty, params.frequency_penalty, params.presence_penalty))
    if params.logit_bias:
        biases = (C.llama_logit_bias * len(params.logit_bias))(
            *(C.llama_logit_bias(token, bias) for token, bias in params.logit_bias))
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_logit_bias(n_vocab, len(biases), biases))
    if params.temperature > 0 or narrow:
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_k(TOP_K))
    if params.temperature > 0:
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_p(params.top_p, 1))
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_min_p(MIN_P, 1))


def _add_final(chain: Any, params: SamplingParams, seed: int) -> None:
    if params.temperature <= 0:
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_greedy())
    else:
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_temp(params.temperature))
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_dist(seed & 0xFFFFFFFF))


def _token_data_array(candidates: np.ndarray) -> C.llama_token_data_array:
    return C.llama_token_data_array(
        data=candidates.ctypes.data_as(C.llama_token_data_p), size=len(candidates), selected=-1, sorted=False)
