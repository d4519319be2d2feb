"""The upstream engine: generation forwarded to an OpenAI-compatible server (vLLM, llama.cpp, TGI, Ollama...).

One pooled aiohttp ClientSession carries every request (aiohttp rather than httpx: on our 2-core machines
httpx's client tops out near 750 requests/s on its own, aiohttp near 6,000; see the README). `generate` sends
the request and waits for the upstream's status line, so refusals and outages become HTTP errors before any
byte goes to the client. The body is then read as the caller iterates: SSE lines when streaming, one JSON
document otherwise. `cancel()` closes the upstream connection, so the upstream stops generating too.

Over 400 lines on purpose: it is one protocol end to end (the request it sends, the SSE and JSON it reads back, tool
calls and reasoning as they arrive, the upstream's errors as ours), and each part follows from the others.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import replace
from typing import Any, AsyncIterator, Callable

from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .base import (
    Admission,
    ChatMessage,
    EngineNotReady,
    FinishReason,
    GenerationRequest,
    ModelInfo,
    RequestTimeout,
    TokenLogprob,
    UpstreamError,
)

log = logging.getLogger(__name__)

BACKEND = "openai-upstream"
CONNECT_TIMEOUT = 5.0
DISCOVERY_RETRY_SECONDS = 2.0
MAX_CONNECTIONS = 256
JSON_HEADERS = {"Content-Type": "application/json"}
PROPAGATOR = TraceContextTextMapPropagator()


def _aiohttp() -> Any:
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
        self._pieces = self._read_stream() if stream else self._read_whole()

    def __aiter__(self) -> "UpstreamGeneration":
        return self

    async def __anext__(self) -> str:
        aiohttp = _aiohttp()
        try:
            return await self._pieces.__anext__()
        except StopAsyncIteration:
            self._response.release()
            if self._aborted:
                raise EngineNotReady("the service is shutting down") from None
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, IndexError, TypeError) as exc:
            self._response.close()
            if self._aborted:
                raise EngineNotReady("the service is shutting down") from None
            if self._cancelled:
                self.finish_reason = None
                raise StopAsyncIteration from None
            if isinstance(exc, asyncio.TimeoutError):
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    raise RequestTimeout(self._deadline - self._started) from None
                raise UpstreamError(504, "upstream_timeout", f"the upstream stalled for {self._timeout:g} s") from None
            raise UpstreamError(502, "upstream_error", f"the upstream's answer broke off: {exc!r}") from None

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

    async def aclose(self) -> None:
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
        data = json.loads(await self._response.read())
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
            data = json.loads(payload)
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


class UpstreamRelay(UpstreamGeneration):
    """An answer passed back as the upstream wrote it (Relay: UPSTREAM_PASSTHROUGH): its text as the pieces, line
    by line when streaming, whole otherwise. Its usage and end are read on the way, whichever API it speaks:
    Anthropic's (`usage` in message_start and message_delta, `stop_reason`) or the Responses API's (the response's
    `usage` and `status`)."""

    answer_id: str | None = None  # the message's or response's id, once the answer has said it

    def _take(self, data: Any) -> None:
        if not isinstance(data, dict):
            return
        if self.answer_id is None and isinstance(data.get("id"), str) and (
                data.get("type") == "message" or data.get("object") == "response"):
            self.answer_id = data["id"]
        inner = data.get("message") or data.get("response")
        if isinstance(inner, dict):  # message_start's message, the Responses events' response
            self._take(inner)
        usage = data.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("input_tokens") or self.prompt_tokens)
            self.completion_tokens = int(usage.get("output_tokens") or self.completion_tokens)
        if (isinstance(data.get("delta"), dict) and data["delta"].get("stop_reason") == "max_tokens"
                or data.get("stop_reason") == "max_tokens" or data.get("status") == "incomplete"):
            self._length = True

    async def _read_whole(self) -> AsyncIterator[str]:
        self._length = False
        raw = await self._response.read()
        try:
            self._take(json.loads(raw))
        except ValueError:
            pass  # passed on as it came; there is no usage to count
        yield raw.decode("utf-8", errors="replace")
        self.finish_reason = "length" if self._length else "stop"

    async def _read_stream(self) -> AsyncIterator[str]:
        self._length = False
        async for raw in self._response.content:
            if raw.startswith(b"data:") and (b'"usage"' in raw or b'"stop_reason"' in raw or b'"status"' in raw):
                try:
                    self._take(json.loads(raw[5:]))
                except ValueError:
                    pass
            yield raw.decode("utf-8", errors="replace")
        if self._cancelled:
            return
        self.finish_reason = "length" if self._length else "stop"


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


class UpstreamEngine:
    """An Engine that forwards to `base_url` (an OpenAI API base, e.g. http://vllm:8000/v1)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: Any = None
        self._info: ModelInfo | None = None
        self._closed = threading.Event()
        self._live: weakref.WeakSet[UpstreamGeneration] = weakref.WeakSet()
        self.on_restart: Callable[[str], None] | None = None  # nothing here is ever restarted

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise EngineNotReady("waiting for the upstream")
        return self._info

    @property
    def loaded(self) -> bool:
        return self._info is not None

    @property
    def queue_depth(self) -> int:
        return 0  # requests wait at the upstream, not here

    # The upstream generates: there are no steps to watch here, and nothing to restart.
    progress = None
    health = None

    @property
    def busy(self) -> bool:
        return bool(self._live)

    def restart(self, why: str) -> bool:
        return False

    def load(self) -> None:
        """Find the upstream's model (its first one unless UPSTREAM_MODEL names it); retry until it answers."""
        model = self.model
        while model is None and not self._closed.is_set():
            try:
                request = urllib.request.Request(f"{self.base_url}/models", headers=self._headers)
                with urllib.request.urlopen(request, timeout=CONNECT_TIMEOUT) as response:
                    model = json.load(response)["data"][0]["id"]
            except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
                log.warning("upstream %s not usable yet (%s); retrying", self.base_url, exc)
                self._closed.wait(DISCOVERY_RETRY_SECONDS)
        if model is None:
            return
        self.model = model
        revision = hashlib.sha256(f"{self.base_url}|{model}".encode()).hexdigest()[:12]
        self._info = ModelInfo(
            name=model, revision=revision, backend=BACKEND,
            description=f"{model}, served by the OpenAI-compatible upstream at {self.base_url}",
            extra={"upstream": self.base_url},
        )
        log.info("forwarding to %s (model %s)", self.base_url, model)

    def _get_session(self) -> Any:
        if self._session is None:
            aiohttp = _aiohttp()
            from yarl import URL  # aiohttp's URL type, installed with it

            self._session = aiohttp.ClientSession(
                headers={**self._headers, **JSON_HEADERS},
                timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT, sock_read=self.timeout),
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, limit_per_host=MAX_CONNECTIONS),
            )
            # Parsed once here rather than on every request.
            self._urls = {"chat": URL(f"{self.base_url}/chat/completions"), "text": URL(f"{self.base_url}/completions"),
                          **{path: URL(f"{self.base_url}/{path}") for path in ("messages", "responses")}}
        return self._session

    def admit(self, request: GenerationRequest, n: int = 1) -> Admission:
        """Nothing to hold: the upstream queues (and refuses, 429/503, which are passed on) by itself."""
        if self._info is None or self._closed.is_set():
            raise EngineNotReady("waiting for the upstream" if not self._closed.is_set() else "shutting down")
        return Admission(n)

    async def generate(self, request: GenerationRequest, admission: Admission | None = None) -> UpstreamGeneration:
        if self._info is None or self._closed.is_set():
            raise EngineNotReady("waiting for the upstream" if not self._closed.is_set() else "shutting down")
        started = time.monotonic()
        if request.relay is not None:  # the client's own request, for an upstream that speaks its API
            return await self._post(request.relay.path, request.relay.body, request, UpstreamRelay, started)
        params = request.params
        payload: dict[str, Any] = {
            "model": self.model, "temperature": params.temperature, "top_p": params.top_p, "stream": request.stream,
        }
        if not params.fit_context:
            payload["max_tokens"] = params.max_tokens
        if params.stop:
            payload["stop"] = list(params.stop)
        if params.seed is not None:
            payload["seed"] = params.seed
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(params, name):
                payload[name] = getattr(params, name)
        if params.response_format is not None:
            payload["response_format"] = json.loads(params.response_format)
        if params.logit_bias:
            payload["logit_bias"] = {str(token): bias for token, bias in params.logit_bias}
        if params.repetition_penalty != 1.0:
            payload["repetition_penalty"] = params.repetition_penalty
        if params.top_k is not None:  # an extension vLLM, llama.cpp's server and Ollama accept
            payload["top_k"] = params.top_k
        if request.stream:
            payload["stream_options"] = {"include_usage": True}
        if request.messages is not None:
            kind = "chat"
            payload["messages"] = [_message(m) for m in request.messages]
            if request.prefill is not None:  # the upstream continues it (continue_final_message, forwarded)
                payload["messages"].append({"role": "assistant", "content": request.prefill})
            if params.logprobs is not None:
                payload["logprobs"], payload["top_logprobs"] = True, params.logprobs
        else:
            kind = "text"
            payload["prompt"] = request.prompt
            if params.logprobs is not None:
                payload["logprobs"] = params.logprobs
        if params.forwarded is not None:
            payload.update(json.loads(params.forwarded))
        return await self._post(kind, json.dumps(payload).encode(), request, UpstreamGeneration, started)

    async def _post(self, target: str, body: bytes, request: GenerationRequest, reader: type[UpstreamGeneration],
                    started: float) -> UpstreamGeneration:
        """Send `body` to the `target` path ("chat", "text", "messages", "responses"), wait for the status line,
        and read the answer as `reader` reads it."""
        aiohttp = _aiohttp()
        session = self._get_session()
        options: dict[str, Any] = {}
        if request.deadline is not None:  # the whole exchange, body included, ends by the request's deadline
            options["timeout"] = aiohttp.ClientTimeout(total=max(request.deadline - time.monotonic(), 0.001),
                                                       connect=CONNECT_TIMEOUT, sock_read=self.timeout)
        # W3C trace context: the upstream's spans join this request's trace; an unsampled request says so (flags
        # 00), so the upstream does not record what we did not. Nothing is added when tracing is off.
        carrier: dict[str, str] = {}
        PROPAGATOR.inject(carrier)
        if carrier:
            options["headers"] = carrier
        try:
            response = await session.post(self._urls[target], data=body, **options)
        except asyncio.TimeoutError:
            if request.deadline is not None and time.monotonic() >= request.deadline:
                raise RequestTimeout(request.deadline - started) from None
            raise UpstreamError(504, "upstream_timeout",
                                f"the upstream at {self.base_url} did not answer within {self.timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(502, "upstream_unavailable", f"the upstream at {self.base_url} failed: {exc}") from None
        if response.status >= 400:
            raise await _refusal(response)
        generation = reader(response, request.stream, self.timeout, request.deadline)
        self._live.add(generation)
        return generation

    async def fetch(self, method: str, path: str, query: str = "", body: bytes | None = None) -> tuple[int, bytes]:
        """A plain call to the upstream (UPSTREAM_PASSTHROUGH: a stored response's GET or DELETE, a count of
        tokens): its status and body. `path` is under the base URL; the caller quotes what came from its client."""
        if self._info is None or self._closed.is_set():
            raise EngineNotReady("waiting for the upstream" if not self._closed.is_set() else "shutting down")
        aiohttp = _aiohttp()
        url = f"{self.base_url}/{path}" + (f"?{query}" if query else "")
        try:
            async with self._get_session().request(method, url, data=body) as response:
                return response.status, await response.read()
        except asyncio.TimeoutError:
            raise UpstreamError(504, "upstream_timeout",
                                f"the upstream at {self.base_url} did not answer within {self.timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(502, "upstream_unavailable", f"the upstream at {self.base_url} failed: {exc}") from None

    def abort(self) -> None:
        """End every request in flight with an error (shutdown timeout) and refuse new ones."""
        self._closed.set()
        for generation in list(self._live):
            generation.abort()

    async def generate_many(self, request: GenerationRequest, n: int,
                            admission: Admission | None = None) -> list[UpstreamGeneration]:
        """`n` requests to the upstream side by side (choice i of a seeded request with seed + i), so each choice
        streams on its own connection and the upstream batches them as it batches any requests."""
        params = request.params
        requests = [request if params.seed is None or i == 0 else replace(request, params=replace(params, seed=params.seed + i))
                    for i in range(n)]
        results = await asyncio.gather(*(self.generate(r) for r in requests), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            for result in results:
                if isinstance(result, UpstreamGeneration):
                    await result.aclose()
            raise failures[0]
        return results  # type: ignore[return-value]

    async def close(self) -> None:
        self._closed.set()
        if self._session is not None:
            await self._session.close()


def _message(message: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.forwarded is not None:
        out.update(json.loads(message.forwarded))
    if message.tool_calls is not None:
        out["tool_calls"] = json.loads(message.tool_calls)
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


async def _refusal(response: Any) -> UpstreamError:
    """The upstream's 4xx/5xx as our error: its client errors pass through, its failures become 502."""
    raw = b""
    try:
        raw = await response.read()
        body = json.loads(raw)
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else (error or str(body))
        param = error.get("param") if isinstance(error, dict) else None
    except Exception:  # a body that is not OpenAI's error JSON, or that broke off
        message, param = raw[:200].decode(errors="replace"), None
    finally:
        response.release()
    status = response.status
    text = f"upstream: {message}"
    if status in (400, 404, 413, 422):
        return UpstreamError(status, "upstream_rejected", text, field=param)
    if status in (429, 503, 529):  # 529: Anthropic's overloaded (a passed-through /v1/messages)
        return UpstreamError(503 if status == 529 else status, "upstream_busy", text,
                             retry_after=response.headers.get("Retry-After", "1"))
    return UpstreamError(502, "upstream_error", f"upstream answered {status}: {message}")
