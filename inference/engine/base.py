"""The Engine protocol: what the HTTP layer needs from anything that generates text.

An engine turns a GenerationRequest into a Generation: an async iterator of text pieces, produced as the
model emits tokens, whose `finish_reason` and token counts are known once it is exhausted. Closing a
Generation early (client gone) cancels the work behind it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    # Tool-call turns: as the client sent them for an upstream; for the embedded engine when its chat template writes
    # tool calls itself (in Hugging Face's convention: arguments as objects), else they come rendered as text.
    tool_calls: str | None = None  # the assistant's calls, as JSON
    tool_call_id: str | None = None  # a `tool` turn's call
    # For an upstream: the message's other fields as the client sent them (`name`, ...), as JSON.
    forwarded: str | None = None


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int | None = None  # sample from the k most likely tokens only (None: llama.cpp's default, 40)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # OpenAI's penalties on tokens already generated (-2 .. 2; 0 = off) and the common extension
    # repetition_penalty (llama.cpp's repeat penalty; 1 = off).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # OpenAI's logit_bias: (token id, -100 .. 100) added to that token's logit; -100 bans it, 100 forces it.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Structured output: an llguidance grammar the embedded engine samples under, and the request's response_format
    # as JSON for an upstream (which enforces it itself).
    grammar: str | None = None
    response_format: str | None = None
    # For an upstream: the request's fields it gets as they came (tools and tool_choice, which it decides and
    # formats itself; `user`, `metadata`, `reasoning_effort`, fields this service does not know...), as JSON.
    forwarded: str | None = None
    # True: lower max_tokens to what the context has room for, instead of refusing (OpenAI's default
    # when a request names no max_tokens).
    fit_context: bool = False
    # Log probabilities: None, not asked (nothing is computed); k >= 0: each generated token's log probability
    # and the k most likely alternatives at its position.
    logprobs: int | None = None
    # Special tokens whose text the answer shows (a template's tool-call opener, which the answer is read by);
    # others, such as the end of turn, show no text.
    preserve: tuple[int, ...] = ()
    # vLLM's extensions for fixed-length answers (benchmarks): the model's end-of-generation tokens are masked for
    # the first `min_tokens` tokens (stop sequences do not end it before them either), or until `max_tokens` with
    # `ignore_eos`. Not with a grammar, whose end is the document's.
    min_tokens: int = 0
    ignore_eos: bool = False
    # Under a grammar only (structured output, tool calls), set by the embedded engine from its settings:
    # llama.cpp's DRY sampler against repeated sequences (0 = off), and closing: with this many tokens left (beyond
    # what the open strings, objects and arrays need to close), each step takes the grammar's end, else a token that
    # closes something, when the grammar allows one (0 = off).
    dry_multiplier: float = 0.0
    closing_reserve: int = 0


@dataclass(frozen=True)
class Relay:
    """A request passed on as it came (UPSTREAM_PASSTHROUGH) to an upstream that speaks the client's API: `body`
    posted to `path` under the upstream's base URL; the answer comes back as the upstream wrote it (its text is the
    generation's pieces), its usage read on the way. Only an engine that forwards takes one."""

    path: str  # "messages", "responses"
    body: bytes


@dataclass(frozen=True)
class GenerationRequest:
    """Either `messages` (rendered with the model's chat template) or a raw `prompt`, never both (or, for an
    upstream, a `relay`)."""

    params: SamplingParams
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    # OpenAI's tool list as JSON, for the embedded engine's chat template when it writes tools into the prompt.
    tools: str | None = None
    # The start of the assistant's answer (a prefill: vLLM's continue_final_message, Anthropic's trailing assistant
    # turn): written after the chat template's assistant cue, and the answer continues it.
    prefill: str | None = None
    # A hint: the caller wants the pieces as they come. A remote engine may fetch the whole answer at once.
    stream: bool = True
    # Who asked (API key or address): the embedded engine's queue takes clients in turn.
    client: str = ""
    # time.monotonic() by which the answer must be complete (REQUEST_TIMEOUT_SECONDS, or less if the client asks):
    # past it, a waiting request is dropped and a running one stopped with RequestTimeout. None: no limit.
    deadline: float | None = None
    # Instead of messages or a prompt: the client's own request, for an upstream that speaks its API (Relay).
    relay: Relay | None = None
    # The caller reads `completion_tokens` while the answer streams (usage in every chunk: vLLM's
    # stream_options.continuous_usage_stats), not only at its end.
    count_as_it_goes: bool = False

    def for_caller(self, client: str, deadline: float | None) -> "GenerationRequest":
        """This request for `client`, due by `deadline` (dataclasses.replace, at a third of its cost: every
        request goes through here)."""
        copy = object.__new__(GenerationRequest)
        copy.__dict__.update(self.__dict__, client=client, deadline=deadline)
        return copy


@dataclass(frozen=True)
class ModelInfo:
    name: str
    revision: str
    backend: str
    description: str = ""
    context_length: int | None = None
    quantization: str | None = None
    parameters: int | None = None
    path: str | None = None
    sha256: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    vocab_size: int | None = None  # token ids are 0 .. vocab_size - 1 (None: not known, e.g. an upstream's)


class EngineError(Exception):
    """Base class of the errors an engine reports to the HTTP layer."""

    def __reduce__(self) -> tuple:
        # Across the engine process's pipe: the message and attributes as they are, whatever __init__ takes.
        return (_rebuild_error, (type(self), str(self), self.__dict__))


def _rebuild_error(cls: type[EngineError], message: str, state: dict) -> EngineError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class ContextLengthExceeded(EngineError):
    def __init__(self, prompt_tokens: int, max_tokens: int, n_ctx: int) -> None:
        super().__init__(
            f"prompt is {prompt_tokens} tokens and max_tokens is {max_tokens}, but the model's context holds "
            f"{n_ctx} tokens; shorten the prompt or lower max_tokens"
        )
        self.prompt_tokens, self.max_tokens, self.n_ctx = prompt_tokens, max_tokens, n_ctx


class PromptTooLong(ContextLengthExceeded):
    """Refused before tokenizing: the prompt has more characters than the context could hold even if every token
    stood for the longest piece in the vocabulary."""

    def __init__(self, characters: int, limit: int, n_ctx: int, longest: int) -> None:
        EngineError.__init__(
            self, f"the prompt is {characters} characters; the model's context of {n_ctx} tokens holds at most "
                  f"{limit} (no token stands for more than {longest} bytes); shorten the prompt")
        self.prompt_tokens, self.max_tokens, self.n_ctx = None, None, n_ctx
        self.characters, self.limit = characters, limit


class InvalidPrompt(EngineError):
    """The request cannot be turned into a prompt (e.g. the chat template rejects the messages)."""

    def __init__(self, message: str, field: str = "messages") -> None:
        super().__init__(message)
        self.field = field


class EngineOverloaded(EngineError):
    """Too many requests are already waiting; the caller should retry later."""

    def __init__(self, waiting: int, retry_after: int = 1) -> None:
        super().__init__(f"{waiting} requests are already waiting for the model; retry shortly")
        self.retry_after = retry_after


class QueueTimeout(EngineError):
    """The request waited longer than QUEUE_TIMEOUT_SECONDS for a free slot and was dropped without running."""

    def __init__(self, waited: float, retry_after: int = 1) -> None:
        super().__init__(f"waited {waited:.1f} s for a free sequence slot without getting one; retry shortly")
        self.retry_after = retry_after


class RequestTimeout(EngineError):
    """The request's deadline passed before its answer was complete."""

    def __init__(self, limit: float) -> None:
        super().__init__(f"the answer was not complete within the request's time limit of {limit:g} s")


class EngineNotReady(EngineError):
    """The model is not loaded (yet, or any more)."""


class EngineRestarted(EngineError):
    """The engine process died while this request was running; it is being restarted (requests that had not
    started yet are kept and run on the new one)."""

    def __init__(self, cause: str, retry_after: int = 5) -> None:
        super().__init__(f"the engine process {cause} while this request was running; it is being restarted, "
                         "retry shortly")
        self.retry_after = retry_after


class UpstreamError(EngineError):
    """A remote engine failed or refused; carries the HTTP status to answer with (502, 504, or the upstream's 4xx)."""

    def __init__(
        self, status: int, code: str, message: str, field: str | None = None, retry_after: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.field, self.retry_after = status, code, field, retry_after


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token, its log probability under the model, and the most likely tokens at its position."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


class Generation(Protocol):
    prompt_tokens: int
    # Final once iteration ends; with GenerationRequest.count_as_it_goes also the tokens of the text yielded so far.
    completion_tokens: int
    finish_reason: FinishReason | None
    # With SamplingParams.logprobs: one entry per generated token, appended as the tokens are generated (an
    # entry may arrive before the text it belongs to, which can be held back while it may start a stop sequence).
    logprobs: list[TokenLogprob]
    # An upstream reasoning model's reasoning (its `reasoning_content`), as far as it has come; "" otherwise. While
    # it streams, iteration yields "" for each new part of it, so that a stream can pass it on at once.
    reasoning: str
    # An upstream's tool calls in OpenAI's shape, complete once iteration ends ([] for the embedded engine, whose
    # calls the service's own grammar produces).
    tool_calls: list[dict[str, Any]]
    # Prompt tokens taken from a cached prefix instead of evaluated (0 where nothing is cached).
    reused_prompt_tokens: int
    # The stop sequence that ended the answer (finish_reason "stop"), None when the model ended it or the engine
    # cannot tell (an upstream's).
    stop_sequence: str | None

    def __aiter__(self) -> AsyncIterator[str]: ...

    def take_reasoning(self) -> str:
        """The reasoning that arrived since the last call."""

    def cancel(self) -> None:
        """Ask the engine to stop; iteration then ends soon with finish_reason None."""

    async def aclose(self) -> None:
        """Cancel if still running and stop iterating at once."""


class Admission:
    """Places held in an engine's queue for a request that is not queued yet (`Engine.admit`): taken before any
    work a refusal would waste (rendering, tokenizing, a token-budget round trip), given to `generate`, which turns
    them into queued requests, or released if the request ends before that. Releasing twice is harmless."""

    __slots__ = ("n", "_release")

    def __init__(self, n: int, release: Callable[[], None] | None = None) -> None:
        self.n = n
        self._release = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def detach(self) -> None:
        """The places became queued requests (the engine counts them from here): nothing left to release."""
        self._release = None


class Engine(Protocol):
    @property
    def info(self) -> ModelInfo: ...

    @property
    def loaded(self) -> bool: ...

    def load(self) -> None:
        """Load the model; blocking, called once from a worker thread at start-up."""

    def admit(self, request: GenerationRequest, n: int = 1) -> Admission:
        """Hold `n` places in the queue for `request`, or refuse it at once (EngineOverloaded, EngineNotReady,
        PromptTooLong): no I/O, no tokenizing, so a refusal costs nothing."""

    async def generate(self, request: GenerationRequest, admission: Admission | None = None) -> Generation:
        """Validate and queue `request` (in the places `admission` holds, else admitting it first); raises
        EngineError subclasses before any token is produced."""

    async def generate_many(self, request: GenerationRequest, n: int,
                            admission: Admission | None = None) -> list[Generation]:
        """`n` independent answers to one prompt (OpenAI's `n`), all queued or none; choice i of a seeded
        request uses seed + i."""

    async def close(self) -> None:
        """Stop accepting work, cancel what is queued and release the model."""

    @property
    def queue_depth(self) -> int:
        """Requests accepted but not yet generating."""

    # What the service watches and steers: the watchdog, readiness, the restart metric, shutdown.
    on_restart: Callable[[str], None] | None  # told the cause each time the engine had to be started again

    @property
    def progress(self) -> int | None:
        """Steps the engine has taken; None: it cannot tell (no watchdog runs then)."""

    @property
    def busy(self) -> bool:
        """Work is in flight (the watchdog judges only then)."""

    @property
    def health(self) -> tuple[str, str | None] | None:
        """None while it serves; else ("restarting" | "failed", why)."""

    def restart(self, why: str) -> bool:
        """Replace a stuck engine (what runs fails, what waits is kept); False when it cannot be replaced."""

    def abort(self) -> None:
        """End every request in flight with an error (the shutdown timeout) and refuse new ones."""


@runtime_checkable
class Tokenizer(Protocol):
    """An engine that has the model's own tokenizer here (the embedded one; an upstream's stays upstream)."""

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = False) -> list[int]: ...

    def detokenize(self, tokens: list[int]) -> str: ...

    def render(self, messages: Any, *, add_generation_prompt: bool = True, tools: Any = None) -> list[int]: ...

    def special_token(self, text: str) -> int | None: ...

    def chat_template(self) -> str | None:
        """The chat template in use (the GGUF's, or CHAT_TEMPLATE_FILE's), once loaded."""
