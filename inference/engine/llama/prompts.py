"""The model's vocabulary and chat template on the HTTP side: the embedded engine's prompts are rendered and
tokenized here (the engine process gets token ids), checked against the context, and cut at message boundaries
so that a cached prefix is reused exactly. Loads the vocabulary only (tens of milliseconds, a few MB)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..base import (
    ChatMessage,
    ContextLengthExceeded,
    GenerationRequest,
    InvalidPrompt,
    PromptTooLong,
)
from .native import load_model, longest_piece

# Used only when a GGUF file carries no chat template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Message boundaries (for exact prefix reuse) are worked out for chats up to this size; longer ones are
# evaluated whole (still in the same pieces every time), so repeatability never depends on these limits.
BOUNDARY_MESSAGES = 32
BOUNDARY_CHARS = 32_000




class Prompts:
    """What the vocabulary and the chat template answer: the Tokenizer protocol (engine/base.py), a request's
    prompt tokens and boundaries, and the length checks before any of it."""

    def __init__(self, n_ctx: int, chat_template_file: Path | None = None) -> None:
        self.n_ctx = n_ctx
        self.chat_template_file = chat_template_file  # CHAT_TEMPLATE_FILE: replaces the GGUF's own template
        self._template: str | None = None  # the chat template in use, once loaded
        self._vocab: Any = None
        self._formatter: Any = None
        self._prefix_formatter: Any = None
        self._max_prompt_chars = 0  # n_ctx x the longest piece: no longer prompt can fit (set at load)

    def load_vocabulary(self, model_path: Path) -> dict[str, str]:
        """Load the model's vocabulary and chat template; returns the GGUF's metadata."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        vocab = load_model(model_path, vocab_only=True)
        meta = vocab.metadata()
        eos, bos = vocab.token_eos(), vocab.token_bos()
        template = (self.chat_template_file.read_text() if self.chat_template_file
                    else meta.get("tokenizer.chat_template") or CHATML_TEMPLATE)
        self._template = template
        eos_text, bos_text = vocab.token_get_text(eos) if eos != -1 else "", vocab.token_get_text(bos) if bos != -1 else ""
        self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos_text, bos_token=bos_text)
        self._prefix_formatter = Jinja2ChatFormatter(template=template, eos_token=eos_text, bos_token=bos_text,
                                                     add_generation_prompt=False)
        self._vocab = vocab
        self._max_prompt_chars = self.n_ctx * longest_piece(vocab)
        return meta

    def close_vocabulary(self) -> None:
        if self._vocab is not None:
            self._vocab.close()
            self._vocab = None

    def check_length(self, request: GenerationRequest) -> None:
        """Refuse, before tokenizing, a prompt with more characters than the context could hold (each character is
        at least a byte, and no token stands for more than the vocabulary's longest piece)."""
        if request.messages is not None:
            characters = sum(len(m.content) for m in request.messages)
        else:
            characters = len(request.prompt or "")
        if characters > self._max_prompt_chars:
            raise PromptTooLong(characters, self._max_prompt_chars, self.n_ctx, self._max_prompt_chars // self.n_ctx)

    def prepare(self, request: GenerationRequest) -> list[int]:
        """The prompt's tokens: the chat template applied to `messages`, or the raw `prompt`."""
        return self._prepare(request)[0]

    def _render(self, formatter: Any, messages: Any, tools: Any = None) -> list[int]:
        rendered = formatter(messages=[_template_message(m) for m in messages], tools=tools)
        return self._vocab.tokenize(rendered.prompt.encode(), add_bos=not rendered.added_special, special=True)

    def render(self, messages: Any, *, add_generation_prompt: bool = True, tools: Any = None) -> list[int]:
        """The tokens of `messages` through the model's chat template (no context-length check); `tools`: OpenAI's
        tool list, for a template that writes tools into the prompt itself."""
        formatter = self._formatter if add_generation_prompt else self._prefix_formatter
        try:
            return self._render(formatter, messages, tools)
        except Exception as exc:  # a template's raise_exception() or any Jinja error
            raise InvalidPrompt(f"the model's chat template rejected the messages: {exc}") from None

    def chat_template(self) -> str | None:
        return self._template

    def special_token(self, text: str) -> int | None:
        """The id of the one token `text` is when read as a special token (a control token, or one of the
        template's own `<...>` tokens), which plain text never tokenizes to; None when there is no such token."""
        found = self._vocab.tokenize(text.encode(), add_bos=False, special=True)
        if len(found) != 1 or self._vocab.tokenize(text.encode(), add_bos=False, special=False) == found:
            return None
        return found[0]

    def _prepare(self, request: GenerationRequest) -> tuple[list[int], tuple[int, ...], int]:
        vocab = self._vocab
        boundaries: tuple[int, ...] = ()
        if request.messages is not None:
            tools = json.loads(request.tools) if request.tools else None
            tokens = self.render(request.messages, tools=tools)
            boundaries = self._boundaries(request.messages, tokens, tools)
            if request.prefill:
                tokens = tokens + vocab.tokenize(request.prefill.encode(), add_bos=False, special=False)
        else:
            tokens = vocab.tokenize((request.prompt or "").encode(), add_bos=True, special=False)
            if not tokens:  # an empty prompt for a model that adds no BOS: start from BOS, as OpenAI allows ""
                bos = vocab.token_bos()
                if bos < 0:
                    raise InvalidPrompt("the prompt is empty and this model has no beginning-of-sequence token", "prompt")
                tokens = [bos]
        n_vocab = vocab.n_vocab()
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

    def _boundaries(self, messages: Any, tokens: list[int], tools: Any = None) -> tuple[int, ...]:
        """Where the prompt's tokens end a message (and where an earlier request's prompt, the same messages
        plus the assistant's cue, ended): the points at which a cached prefix may be reused exactly."""
        if len(messages) > BOUNDARY_MESSAGES or sum(len(m.content) for m in messages) > BOUNDARY_CHARS:
            return ()
        found = set()
        for k in range(1, len(messages)):
            for formatter in (self._prefix_formatter, self._formatter):
                try:
                    prefix = self._render(formatter, messages[:k], tools)
                except Exception:  # a template may refuse a partial conversation (e.g. one ending on the system)
                    continue
                if 0 < len(prefix) < len(tokens) and tokens[: len(prefix)] == prefix:
                    found.add(len(prefix))
        return tuple(sorted(found))

    def piece(self, token: int) -> bytes:
        return self._vocab.detokenize([token])

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = False) -> list[int]:
        """The model's token ids for `text` (`add_bos`: with the beginning-of-sequence token, if it has one)."""
        return self._vocab.tokenize(text.encode(), add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        """The text of `tokens`; ids the model does not have are a ValueError."""
        n_vocab = self._vocab.n_vocab()
        unknown = [t for t in tokens if not 0 <= t < n_vocab]
        if unknown:
            raise ValueError(f"token ids this model does not have: {unknown[:5]} (its vocabulary is 0 .. {n_vocab - 1})")
        return self._vocab.detokenize(tokens).decode("utf-8", errors="replace")

    def count_tokens(self, text: str) -> int:
        return len(self._vocab.tokenize(text.encode(), add_bos=False, special=False))


def _template_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates read it (Hugging Face's convention): tool calls with their arguments as objects,
    a tool result with the id of its call."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = json.loads(message.tool_calls)
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out
