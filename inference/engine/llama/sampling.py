"""SamplingParams -> a native llama.cpp sampler chain, one per sequence.

llama_sampler_sample reads the sequence's logits row inside llama.cpp and returns the token: nothing of the
vocabulary-sized logits vector crosses into Python on the hot path.

A grammar (structured output) is an llguidance matcher (serving/structured.py makes the grammar), not part of
the chain. As llama.cpp's own common sampler does, the token is sampled without it, then only that token is
checked (`validate_tokens`, microseconds); only when the grammar rejects it does llguidance compute the mask of
allowed tokens (natively, into a bitmask: ~20 us for this vocabulary), which numpy applies to the top candidates,
or to the whole vocabulary when it allows none of them, and the token is drawn again. One sequence's grammar is
its own: the others in the batch never wait on it.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import math
import threading
import warnings
from typing import Any

import numpy as np
from llama_cpp import llama_cpp as C

from ..base import SamplingParams

# llama.cpp's sampling defaults (also llama-cpp-python's server's): they keep small models coherent.
TOP_K = 40
MIN_P = 0.05
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data
PENALTY_LAST_N = 64  # llama.cpp's default window for the penalties: the last 64 generated tokens
# DRY (llama.cpp's defaults but the window, which is the answer so far, and the sequence breakers: none, so that a
# repeated item of a JSON array counts as a repeat, quotes and all).
DRY_BASE = 1.75
DRY_ALLOWED_LENGTH = 2
DRY_LAST_N = 1024  # generated tokens looked back over
CLOSERS = frozenset('"}]')  # what a token that closes JSON is made of (and spaces)
MATCHERS_KEPT = 64  # compiled grammars kept per engine process (LRU); each sequence gets a copy


class Grammars:
    """The engine process's llguidance side: the tokenizer (built once from the vocabulary, ~0.2 s, at the first
    grammar) and the compiled grammars, by grammar text (LRU); a sequence gets a copy of one, which is cheap."""

    def __init__(self, vocab: Any, n_vocab: int) -> None:
        self.vocab = vocab
        self.n_vocab = n_vocab
        self._tokenizer: Any = None
        self._compiled: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    @property
    def eos(self) -> int:
        """The token that ends a grammar's answer (the vocabulary's end of sequence), once a matcher exists."""
        return self._tokenizer.eos_token

    @functools.cached_property
    def closers(self) -> dict[str, np.ndarray]:
        """The tokens whose text only closes JSON (quotes, braces, brackets; spaces around), by what they close
        first ('"', '}', ']'): a closing answer's moves. Read from the vocabulary once, at the first closing (~50 ms
        for 50k tokens)."""
        buffer = ctypes.create_string_buffer(64)
        found: dict[str, list[int]] = {closer: [] for closer in CLOSERS}
        for token in range(self.n_vocab):
            size = C.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False)
            text = buffer.raw[:size].decode("utf-8", errors="replace").strip() if size > 0 else ""
            if text and set(text) <= CLOSERS:
                found[text[0]].append(token)
        return {closer: np.array(tokens, dtype=np.int32) for closer, tokens in found.items()}

    def matcher(self, grammar: str) -> Any:
        """A fresh matcher for `grammar`; ValueError when llguidance refuses it."""
        from llguidance import LLMatcher

        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
                return compiled.deep_copy()
            if self._tokenizer is None:
                from llguidance.llamacpp import lltokenizer_from_vocab

                with warnings.catch_warnings():  # llguidance calls a llama_cpp function its newer versions rename
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self._tokenizer = lltokenizer_from_vocab(self.vocab, n_vocab=self.n_vocab)
            compiled = LLMatcher(self._tokenizer, grammar, log_level=0)
            if compiled.is_error():
                raise ValueError(f"the grammar engine refused the response format: {compiled.get_error()}")
            self._compiled[grammar] = compiled
            if len(self._compiled) > MATCHERS_KEPT:
                self._compiled.popitem(last=False)
            return compiled.deep_copy()


class Sampler:
    """A sampler chain for one sequence; `close()` frees it (the scheduler does, exactly once)."""

    def __init__(self, params: SamplingParams, seed: int, n_vocab: int, grammars: Grammars | None = None,
                 vocab: Any = None) -> None:
        self._chain = self._filters = self._final = None
        self._matcher: Any = None
        self._n_vocab = n_vocab
        if params.grammar is None:
            self._chain = _chain()
            _add_filters(self._chain, params, n_vocab, vocab)
            _add_final(self._chain, params, seed)
            return
        if grammars is None:
            raise ValueError("a grammar needs the engine's grammars")
        self._grammars = grammars
        self._matcher = grammars.matcher(params.grammar)
        self._eos = grammars.eos
        # With a grammar: the filters (which narrow the candidates to the top ones) and the final draw are kept
        # apart, so the grammar can be applied between them to a few candidates instead of the whole vocabulary.
        self._filters, self._final = _chain(), _chain()
        _add_filters(self._filters, params, n_vocab, vocab, narrow=True)
        _add_final(self._final, params, seed)
        self._n_vocab = n_vocab
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._candidates = np.zeros(n_vocab, dtype=TOKEN_DATA)
        self._mask = np.zeros((n_vocab + 31) // 32, dtype=np.int32)

    def sample(self, ctx: C.llama_context_p, index: int, banned: np.ndarray | None = None,
               closing: str | None = None) -> int:
        """The next token from the logits of batch row `index` (recorded as accepted by the samplers); `banned`:
        token ids it may not be (their logits are set to -inf in place, as vLLM's min_tokens does); `closing`: the
        token budget is nearly spent, so the grammar's end, else the likeliest token the grammar allows that closes
        the innermost open thing (`closing` says which: '"', '}', ']')."""
        if banned is not None and banned.size:
            np.ctypeslib.as_array(C.llama_get_logits_ith(ctx, index), shape=(self._n_vocab,))[banned] = -math.inf
        if self._matcher is None:
            return C.llama_sampler_sample(self._chain, ctx, index)
        logits = np.ctypeslib.as_array(C.llama_get_logits_ith(ctx, index), shape=(self._n_vocab,))
        if closing is not None and (token := self._closer(logits, closing)) is not None:
            return token
        token = self._draw(self._narrowed(logits))
        if not self._allowed(token):
            # The grammar's mask on the top candidates only; on the whole vocabulary when it allows none of them.
            matcher = self._matcher
            matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
            array = self._narrowed(logits)
            if not self._masked(array):
                array = self._filled(logits)
                self._masked(array)
                C.llama_sampler_apply(self._filters, ctypes.byref(array))
            token = self._draw(array)
            if not self._allowed(token):
                raise RuntimeError(f"the response format's grammar allows no token here ({matcher.get_error()})")
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"the response format's grammar refused token {token}: {self._matcher.get_error()}")
        for sampler in (self._filters, self._final):
            C.llama_sampler_accept(sampler, token)
        return token

    def _closer(self, logits: np.ndarray, closing: str) -> int | None:
        """The grammar's end when it allows it, else the likeliest token it allows that starts with `closing`
        (accepted); None when it allows none: the answer needs more than closing here (a string's least length, a
        required property, a number's digits)."""
        matcher = self._matcher
        if matcher.is_accepting():
            token = self._eos
        else:
            closers = self._grammars.closers.get(closing)
            if closers is None or not closers.size:
                return None
            matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
            allowed = closers[((self._mask[closers >> 5] >> (closers & 31)) & 1) == 1]
            if not allowed.size:
                return None
            token = int(allowed[np.argmax(logits[allowed])])
        if not matcher.consume_token(token):
            raise RuntimeError(f"the response format's grammar refused token {token}: {matcher.get_error()}")
        for sampler in (self._filters, self._final):
            C.llama_sampler_accept(sampler, token)
        return token

    def _masked(self, array: C.llama_token_data_array) -> bool:
        """Set the logits of the candidates the mask forbids to -inf (vectorized: no Python loop over the
        candidates); whether any is left."""
        # The candidates where the samplers left them (they narrow and sort in place).
        raw = ctypes.cast(array.data, ctypes.POINTER(ctypes.c_uint8))
        candidates = np.ctypeslib.as_array(raw, shape=(array.size * TOKEN_DATA.itemsize,)).view(TOKEN_DATA)
        ids = candidates["id"]
        allowed = (self._mask[ids >> 5] >> (ids & 31)) & 1
        candidates["logit"][allowed == 0] = -math.inf
        array.sorted = False  # forbidden ones are -inf now: a sorted order no longer holds
        return bool(allowed.any())

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
        if token == self._eos:  # llguidance's own end: allowed once the answer is complete (validate_tokens says no)
            return bool(self._matcher.is_accepting())
        return self._matcher.validate_tokens([token]) == 1

    def close(self) -> None:
        self._matcher = None
        for name in ("_chain", "_filters", "_final"):
            sampler = getattr(self, name)
            if sampler is not None:
                C.llama_sampler_free(sampler)
                setattr(self, name, None)


def _chain() -> Any:
    return C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())


def _add_filters(chain: Any, params: SamplingParams, n_vocab: int, vocab: Any = None, *, narrow: bool = False) -> None:
    """Penalties, DRY, logit bias and the top-k/top-p/min-p cut (for greedy decoding only with `narrow`: the greedy
    choice among the top 40 is the greedy choice, unless a grammar rejects all of them)."""
    if params.frequency_penalty or params.presence_penalty or params.repetition_penalty != 1.0:
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_penalties(
            n_vocab, PENALTY_LAST_N, params.repetition_penalty, params.frequency_penalty, params.presence_penalty))
    if params.dry_multiplier > 0 and vocab is not None:
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_dry(
            vocab, params.dry_multiplier, DRY_BASE, DRY_ALLOWED_LENGTH, DRY_LAST_N, None, 0))
    if params.logit_bias:
        biases = (C.llama_logit_bias * len(params.logit_bias))(
            *(C.llama_logit_bias(token, bias) for token, bias in params.logit_bias))
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_logit_bias(n_vocab, len(biases), biases))
    if params.temperature > 0 or narrow:
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_k(params.top_k or TOP_K))
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
