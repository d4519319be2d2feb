"""Anthropic answers: a whole Message, or its SSE event sequence (message_start, ping, a content block per text and
per tool call with their deltas, message_delta with the stop reason and usage, message_stop); tool calls are read
back here as OpenAI's render does (the same plan), then written as tool_use blocks."""

from __future__ import annotations

import json
import secrets
from typing import Any, AsyncIterator

from ...engine.base import EngineError, Generation
from ...serving.generation import http_error_of
from ...web.errors import HTTPError
from ...web.http import StreamOutcome, sse
from ..openai.render import read
from ..openai.translate import Translated
from . import dialect


def new_id() -> str:
    return f"msg_{secrets.token_hex(12)}"


def stop_reason(generation: Generation, calls: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence."""
    if generation.finish_reason == "length":
        return "max_tokens", None
    if calls:
        return "tool_use", None
    if generation.stop_sequence is not None:
        return "stop_sequence", generation.stop_sequence
    return "end_turn", None


def tool_use(call: dict[str, Any]) -> dict[str, Any]:
    function = call["function"]
    try:
        arguments = json.loads(function["arguments"] or "{}")
    except ValueError:  # an upstream's, cut short
        arguments = {}
    return {"type": "tool_use", "id": call["id"], "name": function["name"],
            "input": arguments if isinstance(arguments, dict) else {}}


def whole(generation: Generation, text: str, message_id: str, model: str, translated: Translated) -> dict[str, Any]:
    content, calls = read(generation, text, translated)
    blocks = ([{"type": "text", "text": content}] if content or not calls else []) + [tool_use(c) for c in calls]
    reason, sequence = stop_reason(generation, calls)
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": blocks,
            "stop_reason": reason, "stop_sequence": sequence,
            "usage": {"input_tokens": generation.prompt_tokens, "output_tokens": generation.completion_tokens}}


async def stream(generation: Generation, message_id: str, model: str, translated: Translated,
                 outcome: StreamOutcome) -> AsyncIterator[bytes]:
    """Anthropic's event sequence. Text streams as text_delta events as it is generated (for an answer that may be
    a call, as far as it is surely text); each call is a tool_use block whose input arrives as one
    input_json_delta once the answer is complete."""
    plan = translated.plan
    reader = plan.text_reader() if plan is not None else None
    single = plan.single if plan is not None else None
    pieces: list[str] = []
    index = 0
    text_open = False

    def block_start(block: dict[str, Any]) -> bytes:
        return sse({"type": "content_block_start", "index": index, "content_block": block}, "content_block_start")

    def delta(body: dict[str, Any]) -> bytes:
        return sse({"type": "content_block_delta", "index": index, "delta": body}, "content_block_delta")

    def block_stop() -> bytes:
        return sse({"type": "content_block_stop", "index": index}, "content_block_stop")

    try:
        yield sse({"type": "message_start", "message": {
            "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": generation.prompt_tokens, "output_tokens": 0}}}, "message_start")
        yield sse({"type": "ping"}, "ping")
        if single is not None:  # one function: its block now, its input as it is generated
            call_id = plan.new_call_id()  # type: ignore[union-attr]
            yield block_start({"type": "tool_use", "id": call_id, "name": single, "input": {}})
        async for piece in generation:
            if not piece:
                continue
            pieces.append(piece)
            if single is not None:
                yield delta({"type": "input_json_delta", "partial_json": piece})
                continue
            text = piece if plan is None else reader.feed(piece) if reader is not None else ""
            if text:
                if not text_open:
                    yield block_start({"type": "text", "text": ""})
                    text_open = True
                yield delta({"type": "text_delta", "text": text})
        if generation.finish_reason is None:
            return  # cancelled: the client is gone
        text = "".join(pieces)
        if single is not None:
            plan.check(text, [], generation.finish_reason)  # type: ignore[union-attr]
            calls = [{"id": call_id, "type": "function", "function": {"name": single, "arguments": text}}]
            yield block_stop()
        else:
            content, calls = read(generation, text, translated)
            rest = (content or "")[reader.sent:] if reader is not None else ""
            if rest or (not text_open and not calls):  # text after the calls, or an empty answer's one block
                if not text_open:
                    yield block_start({"type": "text", "text": ""})
                    text_open = True
                if rest:
                    yield delta({"type": "text_delta", "text": rest})
            if text_open:
                yield block_stop()
                index += 1
            for call in calls:
                block = tool_use(call)
                yield block_start({**block, "input": {}})
                yield delta({"type": "input_json_delta", "partial_json": json.dumps(block["input"])})
                yield block_stop()
                index += 1
        reason, sequence = stop_reason(generation, calls)
        yield sse({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                   "usage": {"input_tokens": generation.prompt_tokens,
                             "output_tokens": generation.completion_tokens}}, "message_delta")
        outcome.complete = True
        yield sse({"type": "message_stop"}, "message_stop")
    except (EngineError, HTTPError) as exc:
        yield sse(dialect.body(http_error_of(exc)), "error")
    finally:
        await generation.aclose()
