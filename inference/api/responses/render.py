"""Responses answers: a whole response object, or its typed SSE events (response.created, response.in_progress, an
output item per message and per function call with their parts and deltas, then response.completed or
response.incomplete), each with its sequence_number, as the SDK's `responses.stream()` accumulates them. Tool calls
are read back as OpenAI's render does (the same plan), then written as function_call items. `keep` stores the
finished response (store: true) before the client hears it is complete, so a follow-up can never miss it."""

from __future__ import annotations

import time
from typing import Any, AsyncIterator, Awaitable, Callable

from ...engine.base import EngineError, Generation
from ...serving.generation import http_error_of
from ...web.errors import HTTPError
from ...web.http import StreamOutcome, sse
from ..openai.render import read
from ..openai.translate import Translated
from .schemas import ResponsesRequest
from .translate import new_id

Keep = Callable[[dict[str, Any]], Awaitable[bool]]  # store a finished response; whether it was kept


def base(response_id: str, body: ResponsesRequest, model: str, store: bool) -> dict[str, Any]:
    """The response object before any output: the request's settings as it was asked (OpenAI's defaults filled
    in), status in_progress."""
    text_format = (body.text or {}).get("format") or {"type": "text"}
    return {
        "id": response_id, "object": "response", "created_at": int(time.time()), "status": "in_progress",
        "background": False, "completed_at": None, "error": None, "incomplete_details": None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "max_tool_calls": None,
        "model": model, "output": [], "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id, "reasoning": {"effort": None, "summary": None},
        "service_tier": "default", "store": store,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "text": {"format": text_format, "verbosity": "medium"},
        "tool_choice": body.tool_choice or "auto", "tools": list(body.tools or ()),
        "top_p": 1.0 if body.top_p is None else body.top_p, "truncation": "disabled", "usage": None,
        "user": body.user, "metadata": dict(body.metadata or {}),
    }


def _status(generation: Generation) -> str:
    return "incomplete" if generation.finish_reason == "length" else "completed"


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [_part(text)] if status != "in_progress" else []}


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(call: dict[str, Any], status: str = "completed", item_id: str | None = None) -> dict[str, Any]:
    function = call["function"]
    return {"id": item_id or new_id("fc"), "type": "function_call", "status": status, "call_id": call["id"],
            "name": function["name"], "arguments": function.get("arguments") or ""}


def finished(response: dict[str, Any], output: list[dict[str, Any]], generation: Generation) -> dict[str, Any]:
    status = _status(generation)
    prompt, completion = generation.prompt_tokens, generation.completion_tokens
    return {**response, "status": status, "completed_at": int(time.time()), "output": output,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "usage": {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": prompt + completion}}


async def whole(generation: Generation, text: str, response: dict[str, Any], translated: Translated,
                keep: Keep) -> dict[str, Any]:
    content, calls = read(generation, text, translated)
    output = ([message_item(new_id("msg"), content or "", _status(generation))] if content or not calls else [])
    output += [call_item(call) for call in calls]
    final = finished(response, output, generation)
    if final["store"]:
        final["store"] = await keep(final)
    return final


async def stream(generation: Generation, response: dict[str, Any], translated: Translated, keep: Keep,
                 outcome: StreamOutcome) -> AsyncIterator[bytes]:
    """The typed events. Text streams as output_text deltas as it is generated (for an answer that may be a call,
    as far as it is surely text); a single function's arguments stream as they are generated; other calls come
    whole once the answer is complete."""
    plan = translated.plan
    reader = plan.text_reader() if plan is not None else None
    single = plan.single if plan is not None else None
    sequence = 0
    output: list[dict[str, Any]] = []
    pieces: list[str] = []
    message_id: str | None = None  # the message item, once text has begun

    def event(kind: str, **fields: Any) -> bytes:
        nonlocal sequence
        sequence += 1
        return sse({"type": kind, **fields, "sequence_number": sequence - 1}, kind)

    def open_message() -> list[bytes]:
        nonlocal message_id
        message_id = new_id("msg")
        return [event("response.output_item.added", output_index=len(output),
                      item=message_item(message_id, "", "in_progress")),
                event("response.content_part.added", item_id=message_id, output_index=len(output), content_index=0,
                      part=_part(""))]

    def text_delta(text: str) -> bytes:
        return event("response.output_text.delta", item_id=message_id, output_index=len(output), content_index=0,
                     delta=text, logprobs=[])

    def call_events(item: dict[str, Any], streamed: bool) -> list[bytes]:
        """A call's events after its arguments: whole unless they were streamed."""
        index = len(output)
        out = [] if streamed else [
            event("response.output_item.added", output_index=index, item={**item, "status": "in_progress",
                                                                           "arguments": ""}),
            event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                  delta=item["arguments"])]
        out += [event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                      name=item["name"], arguments=item["arguments"]),
                event("response.output_item.done", output_index=index, item=item)]
        output.append(item)
        return out

    try:
        yield event("response.created", response=response)
        yield event("response.in_progress", response=response)
        if single is not None:  # one function: its item now, its arguments as they are generated
            call = {"id": plan.new_call_id(), "function": {"name": single, "arguments": ""}}  # type: ignore[union-attr]
            pending = call_item(call, "in_progress")
            yield event("response.output_item.added", output_index=0, item=pending)
        async for piece in generation:
            if not piece:
                continue
            pieces.append(piece)
            if single is not None:
                yield event("response.function_call_arguments.delta", item_id=pending["id"], output_index=0,
                            delta=piece)
                continue
            text = piece if plan is None else reader.feed(piece) if reader is not None else ""
            if text:
                if message_id is None:
                    for opened in open_message():
                        yield opened
                yield text_delta(text)
        if generation.finish_reason is None:
            return  # cancelled: the client is gone
        text = "".join(pieces)
        if single is not None:
            plan.check(text, [], generation.finish_reason)  # type: ignore[union-attr]
            for sent in call_events({**pending, "status": _status(generation), "arguments": text}, streamed=True):
                yield sent
        else:
            content, calls = read(generation, text, translated)
            rest = (content or "")[reader.sent:] if reader is not None else ""
            if message_id is not None or rest or not calls:  # the answer's text (or an empty answer's message)
                if message_id is None:
                    for opened in open_message():
                        yield opened
                if rest:
                    yield text_delta(rest)
                item = message_item(message_id, content or "", _status(generation))  # type: ignore[arg-type]
                index = len(output)
                yield event("response.output_text.done", item_id=message_id, output_index=index, content_index=0,
                            text=content or "", logprobs=[])
                yield event("response.content_part.done", item_id=message_id, output_index=index, content_index=0,
                            part=item["content"][0])
                yield event("response.output_item.done", output_index=index, item=item)
                output.append(item)
            for call in calls:
                for sent in call_events(call_item(call), streamed=False):
                    yield sent
        final = finished(response, output, generation)
        if final["store"]:
            final["store"] = await keep(final)
        outcome.complete = True
        yield event("response.completed" if final["status"] == "completed" else "response.incomplete",
                    response=final)
    except (EngineError, HTTPError) as exc:
        error = http_error_of(exc)
        yield event("error", code=error.code, message=error.message, param=error.field)
        yield event("response.failed", response={**response, "status": "failed", "output": output,
                                                 "error": {"code": error.code, "message": error.message}})
    finally:
        await generation.aclose()
