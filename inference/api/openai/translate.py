"""OpenAI requests into the engine's terms: parse (the field fates, then the schema), then translate into a
GenerationRequest (messages with the service's system prompt, tool calls planned into a grammar, sampling params,
the fields an upstream gets as they came)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from opentelemetry import trace

from ...config import Settings
from ...engine.base import ChatMessage, GenerationRequest, SamplingParams
from ...serving.structured import StructuredOutput, parse_response_format
from ...serving.tool_syntax import NativeTools, ToolSyntax
from ...serving.tools import ToolPlan, plan_tools, render_history, template_tools
from ...web.errors import HTTPError
from ...web.http import Request
from ...web.state import state
from ...web.validation import from_json
from .schemas import (
    FIELDS,
    MAX_LOGIT_BIAS,
    MAX_MESSAGES,
    UNKNOWN,
    ChatCompletionMessage,
    ChatCompletionRequest,
    CompletionRequest,
    Fate,
    SamplingFields,
)

DEFAULT_TEMPERATURE = 1.0  # OpenAI's
ROLES = {"developer": "system"}
Overrides = Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class Translated:
    """A request in the engine's terms, with what its answer is read back by."""

    generation: GenerationRequest
    structured: StructuredOutput | None = None  # the schema the answer must match
    plan: ToolPlan | None = None  # the functions it may call (the embedded engine's tool calls)
    system: str | None = None  # the system prompt the service added, if it did (part of the cache key)


def parse_chat(raw: Any, settings: Settings, overrides: Overrides
               ) -> tuple[ChatCompletionRequest, dict[str, Any], list[dict[str, Any]]]:
    """The request, the fields to forward to an upstream, and each message's. Refusals first (they say why); then
    the embedded engine takes no field it does not know, at any depth."""
    embedded = settings.embedded
    forwarded = fields_fate(raw, FIELDS["chat"], embedded)
    forwarded_by_message = message_fates(raw, embedded)
    body = from_json(ChatCompletionRequest, raw, overrides=overrides, allow_unknown=not embedded)
    if len(body.messages) > MAX_MESSAGES:
        raise HTTPError(422, "validation_error", f"messages: must have at most {MAX_MESSAGES} items", field="messages")
    return body, forwarded, forwarded_by_message


def parse_completion(raw: Any, settings: Settings, overrides: Overrides) -> tuple[CompletionRequest, dict[str, Any]]:
    forwarded = fields_fate(raw, FIELDS["completion"], settings.embedded)
    return from_json(CompletionRequest, raw, overrides=overrides, allow_unknown=not settings.embedded), forwarded


def translate_chat(raw: Any, body: ChatCompletionRequest, forwarded: dict[str, Any],
                   forwarded_by_message: list[dict[str, Any]], settings: Settings,
                   native: NativeTools | None = None) -> Translated:
    """`native`: the embedded model's chat template writes tools and calls itself (tool_syntax.py)."""
    embedded = settings.embedded
    messages, system = chat_messages(body.messages, forwarded_by_message, settings,
                                     native.syntax if native is not None else None)
    structured = parse_response_format(body.response_format, enforce=embedded)
    plan, tools, grammar = None, None, structured.sampling() if structured is not None else {}
    if not embedded:  # the upstream decides whether and how to call, and enforces what it supports
        forwarded.update({key: raw[key] for key in ("tools", "tool_choice") if raw.get(key) is not None})
    elif (plan := plan_tools(body.tools, body.tool_choice, enforce=True, native=native,
                             parallel=body.parallel_tool_calls is not False)) is not None:
        if structured is not None:
            raise HTTPError(422, "validation_error", "response_format: not with tool calls (the call's "
                            "arguments already follow the function's schema)", field="response_format")
        structured, grammar = plan.structured, plan.sampling()
        if plan.instruction is not None:
            messages = _with_instruction(messages, plan.instruction)
        else:
            tools = template_tools(body.tools)
    if body.top_logprobs is not None and not body.logprobs:
        raise HTTPError(422, "validation_error", "top_logprobs: needs logprobs: true", field="top_logprobs")
    prefill = None
    if bool(body.continue_final_message) == (body.add_generation_prompt is not False):
        raise HTTPError(422, "validation_error", "add_generation_prompt: false with continue_final_message: true, "
                        "and only then", field="add_generation_prompt")
    if body.continue_final_message:
        last = body.messages[-1]
        if last.role != "assistant" or last.tool_calls:
            raise HTTPError(422, "validation_error", "messages: with continue_final_message the last message must be "
                            "the assistant's text, which the answer continues", field="messages")
        if embedded:  # an upstream gets the messages and the flag as they came
            prefill, messages = messages[-1].content, messages[:-1]
    params = sampling(body, body.max_completion_tokens or body.max_tokens, grammar,
                      (body.top_logprobs or 0) if body.logprobs else None, forwarded, settings)
    return Translated(GenerationRequest(params, messages=messages, stream=bool(body.stream), tools=tools,
                                        prefill=prefill, count_as_it_goes=body.continuous_usage),
                      structured, plan, system)


def translate_completion(body: CompletionRequest, forwarded: dict[str, Any], settings: Settings) -> Translated:
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    structured = parse_response_format(body.response_format, enforce=settings.embedded)
    params = sampling(body, body.max_tokens or 16, structured.sampling() if structured is not None else {},
                      body.logprobs, forwarded, settings)  # OpenAI's max_tokens: 16
    return Translated(GenerationRequest(params, prompt=prompt, stream=bool(body.stream),
                                        count_as_it_goes=body.continuous_usage), structured)


def sampling(body: SamplingFields, max_tokens: int | None, grammar: Mapping[str, Any],
             logprobs: int | None, forwarded: dict[str, Any], settings: Settings) -> SamplingParams:
    """The sampling fields both endpoints share; no max_tokens: as many as the context has room for. `grammar`:
    the fields that carry a response format or tool calls (StructuredOutput.sampling, ToolPlan.sampling)."""
    if body.ignore_eos or body.min_tokens:
        name = "ignore_eos" if body.ignore_eos else "min_tokens"
        if grammar:
            raise HTTPError(422, "validation_error", f"{name}: not with response_format or tools (a structured answer "
                            "ends where its document does)", field=name)
        if body.min_tokens and max_tokens is not None and body.min_tokens > max_tokens:
            raise HTTPError(422, "validation_error", f"min_tokens: must be at most max_tokens ({max_tokens})",
                            field="min_tokens")
    return SamplingParams(
        forwarded=json.dumps(forwarded) if forwarded else None,
        min_tokens=body.min_tokens or 0,
        ignore_eos=bool(body.ignore_eos),
        logprobs=logprobs,
        max_tokens=max_tokens or settings.max_tokens_limit,
        stop=body.stop_sequences(),
        seed=body.seed,
        logit_bias=_logit_bias(body.logit_bias),
        fit_context=max_tokens is None,
        **grammar,
        **effective(body),
    )


def effective(body: SamplingFields) -> dict[str, float]:
    """The sampling values a request means, OpenAI's defaults filled in."""
    return {"temperature": DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "frequency_penalty": body.frequency_penalty or 0.0, "presence_penalty": body.presence_penalty or 0.0,
            "repetition_penalty": 1.0 if body.repetition_penalty is None else body.repetition_penalty}


def fields_fate(raw: Any, fates: dict[str, Fate], embedded: bool, where: str = "",
                unknown: Fate = UNKNOWN) -> dict[str, Any]:
    """Refuse (400 naming it) each field whose fate here is "refused" and whose value asks for something; return
    the fields to forward to an upstream as they came (schemas.FIELDS). `unknown`: the fate of any other field."""
    forwarded: dict[str, Any] = {}
    if not isinstance(raw, dict):
        return forwarded
    for name, value in raw.items():
        fate = fates.get(name, unknown)
        mode = fate.embedded if embedded else fate.gateway
        if mode == "refused" and fate.asks(value):
            raise HTTPError(400, "unsupported_parameter", f"{where}{name}: {fate.why}", field=f"{where}{name}")
        if mode == "forwarded":
            forwarded[name] = value
    return forwarded


def typed_fate(value: Any, fates: Mapping[str, Fate], fields: Mapping[str, Mapping[str, Fate]], where: str,
               noun: str, default: str | None = None) -> str:
    """The `type` of one of a request's typed objects (a content block, an input item, a tool; `noun` says which),
    `default` if it has none: a 422 unless it is an object of a type with a fate here, a 400 naming it if that
    fate is "refused", and a 400 naming any field of it this server does not know (`fields`, by type: schemas'
    field_fates), or one it knows whose value asks for what cannot be done."""
    kind = value.get("type", default) if isinstance(value, dict) else None
    fate = fates.get(kind) if isinstance(kind, str) else None
    if fate is None:
        used = [name for name, f in fates.items() if f.embedded == "used"]
        expected = used[0] if len(used) == 1 else f"{', '.join(used[:-1])} or {used[-1]}"
        raise HTTPError(422, "validation_error", f"{where}.type: must be {expected}, not {json.dumps(kind)}",
                        field=f"{where}.type")
    if fate.embedded == "refused":
        raise HTTPError(400, "unsupported_parameter", f"{where}: {kind} {noun}s are not supported ({fate.why})",
                        field=f"{where}.type")
    known = fields[kind]
    for name, field_value in value.items():
        field_fate = known.get(name)
        if field_fate is None:
            raise HTTPError(400, "unsupported_parameter", f"{where}.{name}: not a field of a {kind} {noun} this "
                            "server reads", field=f"{where}.{name}")
        if field_fate.embedded == "refused" and field_fate.asks(field_value):
            raise HTTPError(400, "unsupported_parameter", f"{where}.{name}: {field_fate.why}", field=f"{where}.{name}")
    return kind


def message_fates(raw: Any, embedded: bool) -> list[dict[str, Any]]:
    """The fates of the fields of a request's `messages`: a 400 naming one that cannot be honoured, else each
    message's fields to forward to an upstream."""
    messages = raw.get("messages") if isinstance(raw, dict) else None
    return [fields_fate(message, FIELDS["message"], embedded, where=f"messages[{i}].")
            for i, message in enumerate(messages if isinstance(messages, list) else ())]


def note_caller(request: Request, body: SamplingFields) -> None:
    """Who the end user is (`user`, else `safety_identifier`) into the request log and the server span; a chat's
    `prompt_cache_key` and `metadata` onto the span."""
    span = trace.get_current_span()
    note_user(request, body.user or getattr(body, "safety_identifier", None))
    if getattr(body, "prompt_cache_key", None):
        span.set_attribute("inference.prompt_cache_key", body.prompt_cache_key)  # type: ignore[attr-defined]
    for key, value in (getattr(body, "metadata", None) or {}).items():
        span.set_attribute(f"inference.metadata.{key}", value)


def note_user(request: Request, user: str | None) -> None:
    """The end user (any dialect's name for them) into the request log and onto the server span."""
    if user:
        state(request.scope).user = user[:256]
        trace.get_current_span().set_attribute("user.id", user[:256])


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
                  settings: Settings, syntax: ToolSyntax | None = None) -> tuple[tuple[ChatMessage, ...], str | None]:
    """A request's messages as the engine takes them, and the system prompt the service added (None if none).

    The embedded model gets SYSTEM_PROMPT when a chat brings no system message, as Ollama gives a model its default
    one: small models answer far better with it. An upstream's model has its own defaults. `forwarded`: each
    message's fields for an upstream (message_fates). `syntax`: the embedded template writes tool calls and
    results itself."""
    converted = tuple(_chat_message(message, settings.embedded, fields, syntax)
                      for message, fields in zip(messages, forwarded))
    system = added_system_prompt(messages, settings)
    return ((ChatMessage("system", system), *converted) if system is not None else converted), system


def added_system_prompt(messages: list[ChatCompletionMessage], settings: Settings) -> str | None:
    """The system prompt chat_messages adds to these messages: SYSTEM_PROMPT for the embedded model when none of them
    is a system (or developer) message, else None. Known before translating: the cache key holds it."""
    if settings.chat_system_prompt and settings.embedded and not any(
            ROLES.get(m.role, m.role) == "system" for m in messages):
        return settings.system_prompt
    return None


def _chat_message(message: ChatCompletionMessage, embedded: bool, forwarded: dict[str, Any],
                  syntax: ToolSyntax | None) -> ChatMessage:
    text = _text(message)
    if not embedded:  # as they came: the upstream renders names, tool turns and the rest itself
        calls = None if message.tool_calls is None else json.dumps(message.tool_calls)
        return ChatMessage(ROLES.get(message.role, message.role), text, tool_calls=calls,  # type: ignore[arg-type]
                           tool_call_id=message.tool_call_id, forwarded=json.dumps(forwarded) if forwarded else None)
    if syntax is not None and (message.tool_calls or message.role == "tool"):  # the template writes them
        return _template_turn(message, text, syntax)
    history = render_history({"role": message.role, "tool_calls": message.tool_calls, "content": text,
                              "tool_call_id": message.tool_call_id})
    if history is not None:
        return ChatMessage(*history)  # type: ignore[arg-type]
    if message.name:
        text = f"{message.name}: {text}"
    return ChatMessage(ROLES.get(message.role, message.role), text)  # type: ignore[arg-type]


def _template_turn(message: ChatCompletionMessage, text: str, syntax: ToolSyntax) -> ChatMessage:
    """A tool call or result for a template that writes them: calls with their arguments as objects (Hugging
    Face's convention), ids as the template accepts them."""
    if message.role == "tool":
        return ChatMessage("tool", text, tool_call_id=syntax.history_id(message.tool_call_id or ""))
    calls = []
    for call in message.tool_calls or ():
        call = call if isinstance(call, dict) else {}
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        arguments = function.get("arguments")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            pass  # as it came: the template writes it as a string
        calls.append({"id": syntax.history_id(str(call.get("id") or "")), "type": "function",
                      "function": {"name": function.get("name"), "arguments": arguments}})
    return ChatMessage("assistant", text, tool_calls=json.dumps(calls))


def _text(message: ChatCompletionMessage) -> str:
    """The message's text: its content (a string or text parts, joined), else an assistant's refusal."""
    content = message.content
    if isinstance(content, list):
        return "".join(part.text for part in content)
    return content or message.refusal or ""


def _with_instruction(messages: tuple[ChatMessage, ...], instruction: str) -> tuple[ChatMessage, ...]:
    """The tool instruction joins the system message (or becomes one)."""
    if messages and messages[0].role == "system":
        return (ChatMessage("system", f"{messages[0].content}\n\n{instruction}"),) + messages[1:]
    return (ChatMessage("system", instruction),) + messages
