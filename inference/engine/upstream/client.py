"""The upstream engine: generation forwarded to an OpenAI-compatible server (vLLM, llama.cpp, TGI, Ollama...).

One pooled aiohttp ClientSession carries every request (aiohttp rather than httpx: on our 2-core machines
httpx's client tops out near 750 requests/s on its own, aiohttp near 6,000; see the README). `generate` builds the
request the upstream gets, sends it and waits for the upstream's status line, so refusals and outages become HTTP
errors before any byte goes to the client; the answer is then read as the caller iterates (stream.py, relay.py).
`cancel()` closes the upstream connection, so the upstream stops generating too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
import urllib.request
import weakref
from dataclasses import replace
from typing import Any, Callable

from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..base import (
    Admission,
    ChatMessage,
    EngineNotReady,
    GenerationRequest,
    ModelInfo,
    RequestTimeout,
    UpstreamError,
)
from .relay import UpstreamRelay
from .stream import UpstreamGeneration, aiohttp_module, dumps

log = logging.getLogger(__name__)

BACKEND = "openai-upstream"
CONNECT_TIMEOUT = 5.0
DISCOVERY_RETRY_SECONDS = 2.0
MAX_CONNECTIONS = 256
JSON_HEADERS = {"Content-Type": "application/json"}
PROPAGATOR = TraceContextTextMapPropagator()


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
            aiohttp = aiohttp_module()
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
        if params.ignore_eos:  # vLLM's and llama.cpp's server's
            payload["ignore_eos"] = True
        if params.min_tokens:  # vLLM's
            payload["min_tokens"] = params.min_tokens
        if request.stream:
            payload["stream_options"] = {"include_usage": True}
            if request.count_as_it_goes:  # vLLM's usage in every chunk, which the stream reader takes as it comes
                payload["stream_options"]["continuous_usage_stats"] = True
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
        return await self._post(kind, dumps(payload), request, UpstreamGeneration, started)

    async def _post(self, target: str, body: bytes, request: GenerationRequest, reader: type[UpstreamGeneration],
                    started: float) -> UpstreamGeneration:
        """Send `body` to the `target` path ("chat", "text", "messages", "responses"), wait for the status line,
        and read the answer as `reader` reads it."""
        aiohttp = aiohttp_module()
        session = self._get_session()
        options: dict[str, Any] = {}
        # W3C trace context: the upstream's spans join this request's trace; an unsampled request says so (flags
        # 00), so the upstream does not record what we did not. Nothing is added when tracing is off.
        carrier: dict[str, str] = {}
        PROPAGATOR.inject(carrier)
        if carrier:
            options["headers"] = carrier
        # The whole exchange ends by the request's deadline: asyncio's timeout until the status line, then the
        # generation's own timer while the answer is read (aiohttp's per-request total timeout cost 15 us more).
        deadline = asyncio.timeout(None if request.deadline is None else max(request.deadline - time.monotonic(), 0.001))
        try:
            async with deadline:
                response = await session.post(self._urls[target], data=body, **options)
        except asyncio.TimeoutError:
            if deadline.expired():  # ours, not the session's connect or read timeout
                raise RequestTimeout(request.deadline - started) from None  # type: ignore[operator]
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
        aiohttp = aiohttp_module()
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
