"""OpenAI answers: a whole chat or text completion, or its SSE stream (a chunk per piece, tool calls as
`tool_calls` deltas, usage if asked, [DONE]); a tool call is read back from the answer here, and a structured answer
checked against its schema."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any, AsyncIterator

from ...engine.base import EngineError, Generation, TokenLogprob
from ...serving.generation import http_error_of
from ...web.errors import HTTPError
from ...web.http import SSE_DONE, StreamOutcome, dump_json, sse
from . import dialect
from .translate import Translated

LOGPROB_FLOOR = -9999.0  # OpenAI's value for "impossible": JSON has no -Infinity


class Meta:
    """The fields every object of one response repeats."""

    __slots__ = ("id", "model", "created", "fingerprint")

    def __init__(self, prefix: str, model: str, revision: str) -> None:
        self.id = f"{prefix}-{secrets.token_hex(16)}"
        self.model = model
        self.created = int(time.time())
        self.fingerprint = f"fp_{revision}"

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}


def whole(generations: list[Generation], texts: list[str], meta: Meta, translated: Translated) -> dict[str, Any]:
    """A chat completion or a text completion, every choice finished."""
    chat = translated.generation.messages is not None
    structured, plan = translated.structured, translated.plan
    logprobs = translated.generation.params.logprobs is not None
    choices = []
    for index, (generation, text) in enumerate(zip(generations, texts)):
        finish = generation.finish_reason
        if plan is not None:  # the grammar's calls, or its answer's text
            content, calls = plan.read(text)
            plan.check(text, calls, finish)
        else:  # an upstream's calls (with whatever text came before them)
            if structured is not None:
                structured.check(text, finish)
            content, calls = (text or None) if generation.tool_calls else text, generation.tool_calls
        if calls:
            choice = {"index": index, "message": {"role": "assistant", "content": content, "refusal": None,
                                                  "tool_calls": calls}}
            finish = "tool_calls" if finish == "stop" else finish
        elif chat:
            choice = {"index": index, "message": {"role": "assistant", "content": content, "refusal": None}}
        else:
            choice = {"index": index, "text": text}
        if chat and generation.reasoning:  # an upstream reasoning model's
            choice["message"]["reasoning_content"] = generation.reasoning
        choice.update(logprobs=_logprobs(generation.logprobs, chat) if logprobs else None, finish_reason=finish)
        choices.append(choice)
    return {**meta.head("chat.completion" if chat else "text_completion"), "choices": choices,
            "usage": usage(generations)}


def read(generation: Generation, text: str, translated: Translated) -> tuple[str | None, list[dict[str, Any]]]:
    """(text, OpenAI tool_calls) of a finished answer, for the dialects that render calls their own way: the plan's
    calls (checked), or an upstream's; a structured answer checked against its schema."""
    plan = translated.plan
    if plan is None:
        if translated.structured is not None:
            translated.structured.check(text, generation.finish_reason)
        return text, generation.tool_calls
    content, calls = plan.read(text)
    plan.check(text, calls, generation.finish_reason)
    return content, calls


def usage(generations: list[Generation]) -> dict[str, int]:
    """OpenAI's usage: the prompt once, every choice's tokens."""
    prompt, completion = generations[0].prompt_tokens, sum(g.completion_tokens for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _token_text(token: bytes) -> str:
    # A token may hold part of a character; its bytes are exact, its text shows such bytes escaped (as OpenAI does).
    return token.decode("utf-8", errors="backslashreplace")


def _logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def _logprobs(entries: list[TokenLogprob], chat: bool, offset: int = 0) -> dict[str, Any]:
    """OpenAI's logprobs object: chat's `content` list, or the legacy completions arrays (`text_offset` counting
    from `offset`, the characters sent before these tokens)."""
    if chat:
        return {"content": [{"token": _token_text(e.token), "logprob": _logprob(e.logprob), "bytes": list(e.token),
                             "top_logprobs": [{"token": _token_text(t), "logprob": _logprob(lp), "bytes": list(t)}
                                              for t, lp in e.top]} for e in entries],
                "refusal": None}
    tokens, offsets = [], []
    for entry in entries:
        text = _token_text(entry.token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [_logprob(e.logprob) for e in entries],
            # The sampled token is always among them (OpenAI: "up to logprobs + 1 elements").
            "top_logprobs": [{_token_text(e.token): _logprob(e.logprob),
                              **{_token_text(t): _logprob(lp) for t, lp in e.top}} for e in entries],
            "text_offset": offsets}


class _Choice:
    """What one choice of a stream has sent so far."""

    __slots__ = ("prefix", "text", "call_id", "sent_logprobs", "offset")

    def __init__(self, prefix: bytes, keep_text: bool, call_id: str) -> None:
        self.prefix = prefix
        self.text: list[str] | None = [] if keep_text else None
        self.call_id = call_id
        self.sent_logprobs = 0
        self.offset = 0


async def stream(generations: list[Generation], meta: Meta, translated: Translated, include_usage: bool,
                 outcome: StreamOutcome, continuous: bool = False) -> AsyncIterator[bytes]:
    """OpenAI's SSE stream: a chunk per piece (of each choice, with its `index`), a last chunk per choice with its
    finish_reason, usage if asked, [DONE]. `continuous` (vLLM's continuous_usage_stats, with include_usage): every
    chunk carries the usage so far.

    Every chunk repeats the same head; it is encoded once and each piece only adds its own JSON string.
    """
    chat = translated.generation.messages is not None
    structured, plan = translated.structured, translated.plan
    logprobs = translated.generation.params.logprobs is not None
    head = meta.head("chat.completion.chunk" if chat else "text_completion")
    continuous = continuous and include_usage
    if include_usage and not continuous:
        head["usage"] = None
    opening = b"data: " + dump_json(head)[:-1] + b',"choices":[{"index":'
    piece_open = b'"delta":{"content":' if chat else b'"text":'
    piece_close = b'},"logprobs":null,"finish_reason":null}' if chat else b',"logprobs":null,"finish_reason":null}'
    no_logprobs = b',"logprobs":null,"finish_reason":null}'

    def end() -> bytes:
        """What closes a chunk after its choice: the usage so far when asked for in every chunk."""
        if continuous:
            return b'],"usage":' + dump_json(usage(generations)) + b"}\n\n"
        return b"]}\n\n"
    choices = [_Choice(opening + str(i).encode() + b",", structured is not None or plan is not None,
                       plan.new_call_id() if plan is not None else "") for i in range(len(generations))]
    readers = [plan.text_reader() for _ in generations] if plan is not None else None

    def logprobs_of(index: int) -> bytes:
        """The logprobs field for the tokens of choice `index` not sent yet."""
        if not logprobs:
            return b'"logprobs":null'
        choice, entries = choices[index], generations[index].logprobs
        new, choice.sent_logprobs = entries[choice.sent_logprobs:], len(entries)
        body = _logprobs(new, chat, choice.offset)
        if not chat:
            choice.offset += sum(len(t) for t in body["tokens"])
        return b'"logprobs":' + dump_json(body)

    def tool_delta(index: int, call: dict[str, Any]) -> bytes:
        return (choices[index].prefix + b'"delta":{"tool_calls":[' + dump_json(call) + b']},' + logprobs_of(index)
                + b',"finish_reason":null}' + end())

    try:
        for index, choice in enumerate(choices):
            if chat:
                yield choice.prefix + b'"delta":{"role":"assistant","content":""}' + no_logprobs + end()
            if plan is not None and plan.single is not None:
                # One function: its name now, its arguments as they are generated, as OpenAI streams them.
                yield tool_delta(index, {"index": 0, "id": choice.call_id, "type": "function",
                                         "function": {"name": plan.single, "arguments": ""}})
        async for index, piece in _merged(generations):
            choice, generation = choices[index], generations[index]
            if chat and (reasoning := generation.take_reasoning()):  # an upstream reasoning model's, as it comes
                yield (choice.prefix + b'"delta":{"reasoning_content":' + dump_json(reasoning) + b"}" + no_logprobs
                       + end())
            if piece == "":
                continue
            if piece is not None:
                if choice.text is not None:
                    choice.text.append(piece)
                if plan is None:
                    if logprobs:
                        yield (choice.prefix + piece_open + dump_json(piece) + (b"}," if chat else b",")
                               + logprobs_of(index) + b',"finish_reason":null}' + end())
                    else:
                        yield choice.prefix + piece_open + dump_json(piece) + piece_close + end()
                elif plan.single is not None:
                    yield tool_delta(index, {"index": 0, "function": {"arguments": piece}})
                elif readers is not None and (reader := readers[index]) and (text := reader.feed(piece)):
                    yield choice.prefix + piece_open + dump_json(text) + piece_close + end()  # the answer's text
                continue
            if generation.finish_reason is None:
                return  # cancelled: the client is gone
            finish = generation.finish_reason
            text = "".join(choice.text or ())
            if plan is not None and plan.single is None:
                content, calls = plan.read(text)  # whole, once the answer is complete
                plan.check(text, calls, finish)
                reader = readers[index] if readers is not None else None
                if content and reader is not None and content[reader.sent:]:  # text after the calls, or held back
                    yield choice.prefix + piece_open + dump_json(content[reader.sent:]) + piece_close + end()
                for number, call in enumerate(calls):
                    yield tool_delta(index, {"index": number, **call})
                if calls:
                    finish = "tool_calls" if finish == "stop" else finish
            elif plan is not None:
                plan.check(text, [], finish)
                finish = "tool_calls" if finish == "stop" else finish
            elif structured is not None:
                structured.check(text, finish)
            if plan is None and generation.tool_calls:  # an upstream's calls: whole, once they are complete
                for number, call in enumerate(generation.tool_calls):
                    yield tool_delta(index, {"index": number, **call})
                finish = "tool_calls" if finish == "stop" else finish
            last = b'"delta":{}' if chat else b'"text":""'
            yield (choice.prefix + last + b"," + logprobs_of(index) + b',"finish_reason":' + dump_json(finish)
                   + b"}" + end())
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(generations)})
        outcome.complete = True
        yield SSE_DONE
    except (EngineError, HTTPError) as exc:
        error = http_error_of(exc)
        yield sse(dialect.body(error))
    finally:
        for generation in generations:
            await generation.aclose()


async def _merged(generations: list[Generation]) -> AsyncIterator[tuple[int, str | None]]:
    """(choice index, piece) as each choice produces them; (index, None) when that choice has ended."""
    if len(generations) == 1:
        async for piece in generations[0]:
            yield 0, piece
        yield 0, None
        return
    pending = {asyncio.ensure_future(anext(generation)): index for index, generation in enumerate(generations)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                index = pending.pop(task)
                try:
                    piece = task.result()
                except StopAsyncIteration:
                    yield index, None
                    continue
                yield index, piece
                pending[asyncio.ensure_future(anext(generations[index]))] = index
    finally:
        for task in pending:
            task.cancel()
