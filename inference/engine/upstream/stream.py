"""Reading an upstream's OpenAI answer as the caller iterates: SSE lines when streaming, one JSON document otherwise;
text pieces, tool calls and reasoning as they arrive, usage and the end; a broken or stalled answer as our error."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from typing import Any, AsyncIterator

import orjson

from ..base import EngineNotReady, FinishReason, RequestTimeout, TokenLogprob, UpstreamError


def dumps(value: Any) -> bytes:
    """A request body for the upstream: orjson's, the json module's for an integer past 64 bits (a seed, a bound in
    a client's schema)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value).encode()


def loads(raw: bytes | str) -> Any:
    """An upstream's JSON: orjson's parser, the json module's for what only it reads (NaN and Infinity, which
    Python servers write for non-finite floats)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


@functools.cache
def aiohttp_module() -> Any:
    """aiohttp, imported on first use (the embedded engine's install may lack it); then one lookup."""
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - depends on the install
        raise UpstreamError(500, "missing_dependency",
                            "MODEL_BACKEND=openai needs aiohttp: pip install 'inference[upstream]'") from None
    return aiohttp


class UpstreamGeneration:
    """Text pieces read from the upstream's answer as the caller iterates."""

    def __init__(self, response: Any, stream: bool, timeout: float, deadline: float | None = None) -> None:
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.logprobs: list[TokenLogprob] = []
        self.tool_calls: list[dict[str, Any]] = []  # the upstream's, in OpenAI's shape (streamed ones assembled)
        self.reused_prompt_tokens = 0  # the upstream's prefix cache is its own business
        self.stop_sequence: str | None = None  # vLLM says which one matched (`stop_reason`); others do not
        self.reasoning = ""  # a reasoning model's reasoning_content (or reasoning), as far as it has come
        self._reasoning_sent = 0
        self._response = response
        self._timeout = timeout
        self._deadline = deadline
        self._started = time.monotonic()
        self._cancelled = False
        self._aborted = False
        self._expired = False
        # The request's deadline bounds the answer as it is read: one timer, which ends the read when it fires.
        self._timer = (asyncio.get_running_loop().call_later(max(deadline - self._started, 0.0), self._expire)
                       if deadline is not None else None)
        self._pieces = self._read_stream() if stream else self._read_whole()

    def __aiter__(self) -> "UpstreamGeneration":
        return self

    async def __anext__(self) -> str:
        aiohttp = aiohttp_module()
        try:
            return await self._pieces.__anext__()
        except StopAsyncIteration:
            self._stop_timer()
            self._response.release()
            self._raise_if_ended_here()
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, IndexError, TypeError) as exc:
            self._stop_timer()
            self._response.close()
            self._raise_if_ended_here()
            if self._cancelled:
                self.finish_reason = None
                raise StopAsyncIteration from None
            if isinstance(exc, asyncio.TimeoutError):
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    raise RequestTimeout(self._deadline - self._started) from None
                raise UpstreamError(504, "upstream_timeout", f"the upstream stalled for {self._timeout:g} s") from None
            raise UpstreamError(502, "upstream_error", f"the upstream's answer broke off: {exc!r}") from None

    def _raise_if_ended_here(self) -> None:
        """The read ended because this side ended it: the shutdown (abort) or the request's deadline (_expire)."""
        if self._aborted:
            raise EngineNotReady("the service is shutting down") from None
        if self._expired:
            raise RequestTimeout(self._deadline - self._started) from None  # type: ignore[operator]

    def take_reasoning(self) -> str:
        new, self._reasoning_sent = self.reasoning[self._reasoning_sent:], len(self.reasoning)
        return new

    def cancel(self) -> None:
        self._cancelled = True
        self._response.close()  # wakes a pending read, which then ends the iteration

    def abort(self) -> None:
        """End with an error (shutdown): the caller's stream gets an error event, not a silent end."""
        if self.finish_reason is None:
            self._aborted = True
            self.cancel()

    def _expire(self) -> None:
        """The request's deadline has passed: end with RequestTimeout (504, or an error event on a stream)."""
        self._timer = None
        if self.finish_reason is None:
            self._expired = True
            self.cancel()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def aclose(self) -> None:
        self._stop_timer()
        if not self._response.closed and self.finish_reason is None:
            self.cancel()
        await self._pieces.aclose()

    def _add_call(self, part: dict[str, Any]) -> None:
        """A streamed tool-call delta: a new call (its id, type, name), or more of a call's arguments."""
        index = part.get("index", len(self.tool_calls))
        while len(self.tool_calls) <= index:
            self.tool_calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        call, function = self.tool_calls[index], part.get("function") or {}
        call["id"] = part.get("id") or call["id"]
        call["type"] = part.get("type") or call["type"]
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""

    def _usage(self, usage: dict[str, Any] | None) -> None:
        if usage:
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)

    async def _read_whole(self) -> AsyncIterator[str]:
        data = loads(await self._response.read())
        choice = data["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        self.logprobs += _logprobs(choice.get("logprobs"))
        if "message" in choice:
            self.tool_calls = [_call(c) for c in choice["message"].get("tool_calls") or ()]
            self.reasoning = _reasoning(choice["message"])
        self._usage(data.get("usage"))
        if text:
            yield text
        self.stop_sequence = _stop_sequence(choice)
        self.finish_reason = _finish(choice.get("finish_reason"))

    async def _read_stream(self) -> AsyncIterator[str]:
        finish: FinishReason = "stop"
        async for raw in self._response.content:
            if not raw.startswith(b"data:"):
                continue
            payload = raw[5:].strip()
            if payload == b"[DONE]":
                break
            data = loads(payload)
            if "error" in data:
                message = (data["error"] or {}).get("message", "unknown error")
                raise UpstreamError(502, "upstream_error", f"the upstream failed mid-stream: {message}")
            self._usage(data.get("usage"))
            for choice in data.get("choices") or ():
                delta = choice.get("delta")
                text = delta.get("content") if delta is not None else choice.get("text")
                self.logprobs += _logprobs(choice.get("logprobs"))
                for part in (delta or {}).get("tool_calls") or ():
                    self._add_call(part)
                if reasoning := _reasoning(delta or {}):
                    self.reasoning += reasoning
                    if not text:
                        yield ""  # wakes the reader: take_reasoning() has something
                if text:
                    yield text
                if choice.get("finish_reason"):
                    finish = _finish(choice["finish_reason"])
                    self.stop_sequence = _stop_sequence(choice)
        if self._cancelled:
            return
        self.finish_reason = finish


def _stop_sequence(choice: dict[str, Any]) -> str | None:
    """vLLM's `stop_reason`: the stop string that ended the answer (an int is a stop token's id: not a string)."""
    reason = choice.get("stop_reason")
    return reason if isinstance(reason, str) else None


def _reasoning(message: dict[str, Any]) -> str:
    """A reasoning model's reasoning: `reasoning_content` (vLLM, llama.cpp's server, DeepSeek) or `reasoning`
    (Ollama, OpenRouter, newer vLLM)."""
    value = message.get("reasoning_content") or message.get("reasoning")
    return value if isinstance(value, str) else ""


def _finish(reason: Any) -> FinishReason:
    return "length" if reason == "length" else "stop"


def _call(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    return {"id": call.get("id") or "", "type": call.get("type") or "function",
            "function": {"name": function.get("name") or "", "arguments": function.get("arguments") or ""}}


def _logprobs(value: Any) -> list[TokenLogprob]:
    """An OpenAI logprobs object (chat's `content` list or the completions arrays) as TokenLogprob entries."""
    if not isinstance(value, dict):
        return []

    def exact(entry: dict[str, Any]) -> bytes:
        raw = entry.get("bytes")
        return bytes(raw) if isinstance(raw, list) else str(entry["token"]).encode()

    if "content" in value:
        return [TokenLogprob(exact(e), float(e["logprob"]),
                             tuple((exact(t), float(t["logprob"])) for t in e.get("top_logprobs") or ()))
                for e in value.get("content") or ()]
    tops = value.get("top_logprobs") or []
    return [TokenLogprob(str(token).encode(), float(logprob),
                         tuple(sorted(((str(t).encode(), float(lp)) for t, lp in (tops[i] or {}).items()),
                                      key=lambda pair: -pair[1])) if i < len(tops) else ())
            for i, (token, logprob) in enumerate(zip(value.get("tokens") or (), value.get("token_logprobs") or ()))]
