"""The OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions (streaming or not)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import replace
from typing import Any, AsyncIterator, Awaitable, Callable

from opentelemetry import trace

from ...config import Settings
from ...engine.base import ChatMessage, EngineError, Generation, GenerationRequest, SamplingParams, TokenLogprob
from ...web.errors import HTTPError
from ...web.http import (
    SSE_DONE,
    ClientDisconnected,
    Request,
    Response,
    StreamingResponse,
    StreamOutcome,
    dump_json,
    json_response,
    sse,
)
from ...serving.cache import labelled_errors
from ...web.identity import client_id
from ...middleware.metrics import PROMPT_KEY, USER_KEY
from .schemas import (
    ChatCompletion,
    ChatCompletionMessage,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    FIELDS,
    MAX_LOGIT_BIAS,
    MAX_MESSAGES,
    UNKNOWN,
    Fate,
    Model,
    ModelList,
    SamplingFields,
    refused_values,
)
from ...web.router import Route
from ...serving.lifecycle import Service, complete_all, http_error_of
from ...serving.structured import StructuredOutput, parse_response_format
from ...serving.tools import ToolPlan, new_call_id, plan_tools, render_history
from ...web.validation import from_json, plain

OWNED_BY = "inference"
DEFAULT_TEMPERATURE = 1.0  # OpenAI's
ROLES = {"developer": "system"}


def routes(service: Service) -> list[Route]:
    settings = service.settings
    limit = {"max_tokens": {"le": settings.max_tokens_limit}, "max_completion_tokens": {"le": settings.max_tokens_limit},
             "n": {"le": settings.max_choices}}
    created = int(time.time())

    def model_id() -> str:
        return service.model_id

    def model_object() -> dict[str, Any]:
        return {"id": model_id(), "object": "model", "created": created, "owned_by": OWNED_BY}

    def check_model(name: str) -> None:
        if not service.engine.loaded:
            return  # service.generate answers 503 model_not_ready
        if name != model_id():
            raise HTTPError(404, "model_not_found", f"The model '{name}' does not exist; this server serves "
                            f"'{model_id()}' (GET /v1/models)", field="model")

    async def list_models(request: Request) -> Response:
        data = [model_object()] if service.engine.loaded else []
        return json_response({"object": "list", "data": data})

    async def retrieve_model(request: Request) -> Response:
        name = request.path_params["model"]
        if not service.engine.loaded or name != model_id():
            raise HTTPError(404, "model_not_found", f"The model '{name}' does not exist", field="model")
        return json_response(model_object())

    embedded = settings.embedded  # else an upstream enforces schemas itself
    # The embedded engine: fields it refuses may only have the values that ask for nothing (in the document too).
    chat_limit = {**limit, **(refused_values("chat", ChatCompletionRequest) if embedded else {})}
    completion_limit = {**limit, **(refused_values("completion", CompletionRequest) if embedded else {})}

    def sampling(body: SamplingFields, max_tokens: int | None, structured: StructuredOutput | None,
                 logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            logprobs=logprobs,
            grammar=structured.grammar if structured is not None else None,
            response_format=None if structured is None or embedded else json.dumps(body.response_format),
            max_tokens=max_tokens or settings.max_tokens_limit,
            stop=body.stop_sequences(),
            seed=body.seed,
            logit_bias=_logit_bias(body.logit_bias),
            fit_context=max_tokens is None,
            **_effective(body),
        )

    def cached(
        request: Request, raw: Any, body: SamplingFields, produce: Callable[[], Awaitable[Response]],
        system: str | None = None,
    ) -> Awaitable[Response]:
        info = service.model()
        # Every field the client sent, known ones normalized, unset sampling fields as the values they mean.
        normalized = {**(raw if isinstance(raw, dict) else {}), **plain(body), **_effective(body)}
        material = {"endpoint": request.scope["route"], "model": model_id(), "revision": info.revision,
                    "body": normalized}
        if system is not None:  # the default system message the service added
            material["system_prompt"] = system
        deterministic = body.temperature == 0 or body.seed is not None
        return service.respond(request, material, deterministic, produce)

    async def answer(request: Request, body: SamplingFields, generation_request: GenerationRequest,
                     structured: StructuredOutput | None, plan: ToolPlan | None = None) -> Response:
        """Generate, then answer as a chat completion or a text completion, streamed or whole."""
        chat = generation_request.messages is not None
        if settings.log_prompts:
            request.scope[PROMPT_KEY] = (
                [{"role": m.role, "content": m.content} for m in generation_request.messages]
                if generation_request.messages is not None else generation_request.prompt
            )
        generations = await service.generate_many(
            generation_request, body.n or 1, client=client_id(request.scope, settings.trusted_proxies),
            scope=request.scope,
        )
        meta = _Meta("chatcmpl" if chat else "cmpl", model_id(), service.engine.info.revision)
        logprobs = generation_request.params.logprobs is not None
        if body.stream:
            outcome = StreamOutcome()
            chunks = _stream(generations, meta, chat, body.include_usage, outcome, structured, plan, logprobs)

            def cancel() -> None:
                for generation in generations:
                    generation.cancel()

            return StreamingResponse(chunks, on_disconnect=cancel, outcome=outcome)
        texts = await complete_all(generations, request.receive)
        if texts is None:
            raise ClientDisconnected()
        choices = []
        for index, (generation, text) in enumerate(zip(generations, texts)):
            if structured is not None:
                structured.check(text, generation.finish_reason)
            finish = generation.finish_reason
            calls = plan.calls(text) if plan is not None else generation.tool_calls
            if calls:  # the grammar's call, or the upstream's calls (with whatever text came before them)
                content = None if plan is not None else text or None
                choice = {"index": index, "message": {"role": "assistant", "content": content, "refusal": None,
                                                      "tool_calls": calls}}
                finish = "tool_calls" if finish == "stop" else finish
            elif chat:
                choice = {"index": index, "message": {"role": "assistant", "content": text, "refusal": None}}
            else:
                choice = {"index": index, "text": text}
            if chat and generation.reasoning:  # an upstream reasoning model's
                choice["message"]["reasoning_content"] = generation.reasoning
            choice.update(logprobs=_logprobs(generation.logprobs, chat) if logprobs else None, finish_reason=finish)
            choices.append(choice)
        return json_response({**meta.head("chat.completion" if chat else "text_completion"),
                              "choices": choices, "usage": _usage(generations)})

    async def chat_completions(request: Request) -> Response:
        raw = await request.json(settings.max_body_bytes, settings.body_timeout_seconds)
        # Refusals first (they say why); then the embedded engine takes no field it does not know, at any depth.
        forwarded = _fields_fate(raw, FIELDS["chat"], embedded)
        forwarded_by_message = message_fates(raw, embedded)
        body = from_json(ChatCompletionRequest, raw, overrides=chat_limit, allow_unknown=not embedded)
        if len(body.messages) > MAX_MESSAGES:
            raise HTTPError(422, "validation_error", f"messages: must have at most {MAX_MESSAGES} items",
                            field="messages")
        _record(request, body)
        check_model(body.model)
        messages, system = chat_messages(body.messages, forwarded_by_message, settings)
        structured = parse_response_format(body.response_format, enforce=embedded)
        plan = None
        if not embedded:  # the upstream decides whether and how to call, and enforces what it supports
            forwarded.update({key: raw[key] for key in ("tools", "tool_choice") if raw.get(key) is not None})
        elif (plan := plan_tools(body.tools, body.tool_choice, enforce=True)) is not None:
            if structured is not None:
                raise HTTPError(422, "validation_error", "response_format: not with tool calls (the call's "
                                "arguments already follow the function's schema)", field="response_format")
            structured = plan.structured
            messages = _with_instruction(messages, plan.instruction)
        if body.top_logprobs is not None and not body.logprobs:
            raise HTTPError(422, "validation_error", "top_logprobs: needs logprobs: true", field="top_logprobs")
        params = replace(sampling(body, body.max_completion_tokens or body.max_tokens, structured,
                                  (body.top_logprobs or 0) if body.logprobs else None),
                         forwarded=json.dumps(forwarded) if forwarded else None)
        generation_request = GenerationRequest(params, messages=messages, stream=bool(body.stream))
        return await cached(request, raw, body, lambda: answer(request, body, generation_request, structured, plan),
                            system=system)

    async def completions(request: Request) -> Response:
        raw = await request.json(settings.max_body_bytes, settings.body_timeout_seconds)
        forwarded = _fields_fate(raw, FIELDS["completion"], embedded)
        body = from_json(CompletionRequest, raw, overrides=completion_limit, allow_unknown=not embedded)
        _record(request, body)
        check_model(body.model)
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        structured = parse_response_format(body.response_format, enforce=embedded)
        params = replace(sampling(body, body.max_tokens or 16, structured, body.logprobs),  # OpenAI's default: 16
                         forwarded=json.dumps(forwarded) if forwarded else None)
        generation_request = GenerationRequest(params, prompt=prompt, stream=bool(body.stream))
        return await cached(request, raw, body, lambda: answer(request, body, generation_request, structured))

    errors = (400, 401, 404, 409, 413, 429, 502, 503, 504)
    return [
        Route("GET", "/v1/models", list_models, summary="OpenAI: list models", response_schema=ModelList,
              links={"RetrieveModel": ("GET /v1/models/{model}",
                                       {"parameters": {"model": "$response.body#/data/0/id"}})}),
        Route("GET", "/v1/models/{model}", retrieve_model, summary="OpenAI: retrieve a model",
              response_schema=Model, errors=(404,)),
        Route("POST", "/v1/chat/completions", labelled_errors(chat_completions),
              summary="OpenAI: chat completion (stream: SSE)", request_schema=ChatCompletionRequest,
              response_schema=ChatCompletion, errors=errors, streams=True, overrides=chat_limit,
              allow_unknown_fields=not embedded, limited=True),
        Route("POST", "/v1/completions", labelled_errors(completions), summary="OpenAI: text completion (stream: SSE)",
              request_schema=CompletionRequest, response_schema=Completion, errors=errors, streams=True,
              overrides=completion_limit, allow_unknown_fields=not embedded, limited=True),
    ]


def _effective(body: SamplingFields) -> dict[str, float]:
    """The sampling values a request means, OpenAI's defaults filled in."""
    return {"temperature": DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "frequency_penalty": body.frequency_penalty or 0.0, "presence_penalty": body.presence_penalty or 0.0,
            "repetition_penalty": 1.0 if body.repetition_penalty is None else body.repetition_penalty}


def _fields_fate(raw: Any, fates: dict[str, Fate], embedded: bool, where: str = "") -> dict[str, Any]:
    """Refuse (400 naming it) each field whose fate here is "refused" and whose value asks for something; return
    the fields to forward to an upstream as they came (openai_schemas.FIELDS)."""
    forwarded: dict[str, Any] = {}
    if not isinstance(raw, dict):
        return forwarded
    for name, value in raw.items():
        fate = fates.get(name, UNKNOWN)
        mode = fate.embedded if embedded else fate.gateway
        if mode == "refused" and fate.asks(value):
            raise HTTPError(400, "unsupported_parameter", f"{where}{name}: {fate.why}", field=f"{where}{name}")
        if mode == "forwarded":
            forwarded[name] = value
    return forwarded


def message_fates(raw: Any, embedded: bool) -> list[dict[str, Any]]:
    """The fates of the fields of a request's `messages`: a 400 naming one that cannot be honoured, else each
    message's fields to forward to an upstream."""
    messages = raw.get("messages") if isinstance(raw, dict) else None
    return [_fields_fate(message, FIELDS["message"], embedded, where=f"messages[{i}].")
            for i, message in enumerate(messages if isinstance(messages, list) else ())]


def _record(request: Request, body: SamplingFields) -> None:
    """Who the end user is (`user`, else `safety_identifier`) into the request log and the server span; a chat's
    `prompt_cache_key` and `metadata` onto the span."""
    span = trace.get_current_span()
    user = body.user or getattr(body, "safety_identifier", None)
    if user:
        request.scope[USER_KEY] = user[:256]
        span.set_attribute("user.id", user[:256])
    if getattr(body, "prompt_cache_key", None):
        span.set_attribute("inference.prompt_cache_key", body.prompt_cache_key)  # type: ignore[attr-defined]
    for key, value in (getattr(body, "metadata", None) or {}).items():
        span.set_attribute(f"inference.metadata.{key}", value)


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} object as (id, bias) pairs; anything else is a 400 naming the field."""
    if value is None:
        return ()

    def refuse(why: str) -> HTTPError:
        return HTTPError(422, "validation_error", f"logit_bias: {why}", field="logit_bias")

    if not isinstance(value, dict):
        raise refuse("must be an object of token id -> bias")
    if len(value) > MAX_LOGIT_BIAS:
        raise refuse(f"at most {MAX_LOGIT_BIAS} entries")
    pairs = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise refuse(f"keys must be token ids (non-negative integers as strings), not {key!r}")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise refuse(f"the bias of token {key} must be a number from -100 to 100")
        pairs.append((int(key), float(bias)))
    return tuple(sorted(pairs))


def chat_messages(messages: list[ChatCompletionMessage], forwarded: list[dict[str, Any]],
                  settings: Settings) -> tuple[tuple[ChatMessage, ...], str | None]:
    """A request's messages as the engine takes them, and the system prompt the service added (None if none).

    The embedded model gets SYSTEM_PROMPT when a chat brings no system message, as Ollama gives a model its default
    one: small models answer far better with it. An upstream's model has its own defaults. `forwarded`: each
    message's fields for an upstream (message_fates)."""
    embedded = settings.embedded
    converted = [_chat_message(message, embedded, fields) for message, fields in zip(messages, forwarded)]
    if settings.chat_system_prompt and embedded and not any(m.role == "system" for m in converted):
        return (ChatMessage("system", settings.system_prompt), *converted), settings.system_prompt
    return tuple(converted), None


def _chat_message(message: ChatCompletionMessage, embedded: bool, forwarded: dict[str, Any]) -> ChatMessage:
    text = _text(message)
    if not embedded:  # as they came: the upstream renders names, tool turns and the rest itself
        calls = None if message.tool_calls is None else json.dumps(message.tool_calls)
        return ChatMessage(ROLES.get(message.role, message.role), text, tool_calls=calls,  # type: ignore[arg-type]
                           tool_call_id=message.tool_call_id, forwarded=json.dumps(forwarded) if forwarded else None)
    history = render_history({"role": message.role, "tool_calls": message.tool_calls, "content": text,
                              "tool_call_id": message.tool_call_id})
    if history is not None:
        return ChatMessage(*history)  # type: ignore[arg-type]
    if message.name:
        text = f"{message.name}: {text}"
    return ChatMessage(ROLES.get(message.role, message.role), text)  # type: ignore[arg-type]


def _text(message: ChatCompletionMessage) -> str:
    """The message's text: its content (a string or text parts, joined), else an assistant's refusal."""
    content = message.content
    if isinstance(content, list):
        return "".join(part.text for part in content)
    return content or message.refusal or ""


def _usage(generations: list[Generation]) -> dict[str, int]:
    """OpenAI's usage: the prompt once, every choice's tokens."""
    prompt, completion = generations[0].prompt_tokens, sum(g.completion_tokens for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


LOGPROB_FLOOR = -9999.0  # OpenAI's value for "impossible": JSON has no -Infinity


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


class _Meta:
    """The fields every object of one response repeats."""

    __slots__ = ("id", "model", "created", "fingerprint")

    def __init__(self, prefix: str, model: str, revision: str) -> None:
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.model = model
        self.created = int(time.time())
        self.fingerprint = f"fp_{revision}"

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}


def _with_instruction(messages: tuple[ChatMessage, ...], instruction: str) -> tuple[ChatMessage, ...]:
    """The tool instruction joins the system message (or becomes one)."""
    if messages and messages[0].role == "system":
        return (ChatMessage("system", f"{messages[0].content}\n\n{instruction}"),) + messages[1:]
    return (ChatMessage("system", instruction),) + messages


class _Choice:
    """What one choice of a stream has sent so far."""

    __slots__ = ("prefix", "text", "call_id", "sent_logprobs", "offset")

    def __init__(self, prefix: bytes, keep_text: bool, call_id: str) -> None:
        self.prefix = prefix
        self.text: list[str] | None = [] if keep_text else None
        self.call_id = call_id
        self.sent_logprobs = 0
        self.offset = 0


async def _stream(
    generations: list[Generation], meta: _Meta, chat: bool, include_usage: bool, outcome: StreamOutcome,
    structured: StructuredOutput | None = None, plan: ToolPlan | None = None, logprobs: bool = False,
) -> AsyncIterator[bytes]:
    """OpenAI's SSE stream: a chunk per piece (of each choice, with its `index`), a last chunk per choice with its
    finish_reason, usage if asked, [DONE].

    Every chunk repeats the same head; it is encoded once and each piece only adds its own JSON string.
    """
    head = meta.head("chat.completion.chunk" if chat else "text_completion")
    if include_usage:
        head["usage"] = None
    opening = b"data: " + dump_json(head)[:-1] + b',"choices":[{"index":'
    piece_open = b'"delta":{"content":' if chat else b'"text":'
    piece_close = b'},"logprobs":null,"finish_reason":null}]}\n\n' if chat else b',"logprobs":null,"finish_reason":null}]}\n\n'
    no_logprobs = b',"logprobs":null,"finish_reason":null}]}\n\n'
    choices = [_Choice(opening + str(i).encode() + b",", structured is not None or plan is not None,
                       new_call_id() if plan is not None else "") for i in range(len(generations))]

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
                + b',"finish_reason":null}]}\n\n')

    try:
        for index, choice in enumerate(choices):
            if chat:
                yield choice.prefix + b'"delta":{"role":"assistant","content":""}' + no_logprobs
            if plan is not None and plan.single is not None:
                # One function: its name now, its arguments as they are generated, as OpenAI streams them.
                yield tool_delta(index, {"index": 0, "id": choice.call_id, "type": "function",
                                         "function": {"name": plan.single, "arguments": ""}})
        async for index, piece in _merged(generations):
            choice, generation = choices[index], generations[index]
            if chat and (reasoning := generation.take_reasoning()):  # an upstream reasoning model's, as it comes
                yield choice.prefix + b'"delta":{"reasoning_content":' + dump_json(reasoning) + b"}" + no_logprobs
            if piece == "":
                continue
            if piece is not None:
                if choice.text is not None:
                    choice.text.append(piece)
                if plan is None:
                    if logprobs:
                        yield (choice.prefix + piece_open + dump_json(piece) + (b"}," if chat else b",")
                               + logprobs_of(index) + b',"finish_reason":null}]}\n\n')
                    else:
                        yield choice.prefix + piece_open + dump_json(piece) + piece_close
                elif plan.single is not None:
                    yield tool_delta(index, {"index": 0, "function": {"arguments": piece}})
                continue
            if generation.finish_reason is None:
                return  # cancelled: the client is gone
            finish = generation.finish_reason
            text = "".join(choice.text or ())
            if structured is not None:
                structured.check(text, finish)
            if plan is not None:
                if plan.single is None:  # which function: known once the whole answer is there
                    (call,) = plan.calls(text)
                    yield tool_delta(index, {"index": 0, **call, "id": choice.call_id})
                finish = "tool_calls" if finish == "stop" else finish
            elif generation.tool_calls:  # an upstream's calls: whole, once they are complete
                for number, call in enumerate(generation.tool_calls):
                    yield tool_delta(index, {"index": number, **call})
                finish = "tool_calls" if finish == "stop" else finish
            last = b'"delta":{}' if chat else b'"text":""'
            yield (choice.prefix + last + b"," + logprobs_of(index) + b',"finish_reason":' + dump_json(finish)
                   + b"}]}\n\n")
        if include_usage:
            yield sse({**head, "choices": [], "usage": _usage(generations)})
        outcome.complete = True
        yield SSE_DONE
    except (EngineError, HTTPError) as exc:
        error = http_error_of(exc)
        yield sse(error.openai_body())
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
