"""The upstream engine: generation forwarded to an OpenAI-compatible server (vLLM, llama.cpp, TGI, Ollama...).

One pooled httpx.AsyncClient carries every request. `generate` sends the request and waits for the
upstream's status line, so refusals and outages become HTTP errors before any byte is sent to the client;
a pump task then reads the body (SSE when streaming) and hands text pieces over a queue, like the
embedded engine's worker does. Cancelling the pump closes the upstream connection, so the upstream stops
generating too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from typing import Any

from .base import EngineNotReady, FinishReason, GenerationRequest, ModelInfo, UpstreamError

log = logging.getLogger(__name__)

BACKEND = "openai-upstream"
CONNECT_TIMEOUT = 5.0
DISCOVERY_RETRY_SECONDS = 2.0
MAX_CONNECTIONS = 256
_END = object()


def _httpx() -> Any:
    try:
        import httpx
    except ImportError:  # pragma: no cover - depends on the install
        raise UpstreamError(500, "missing_dependency", "MODEL_BACKEND=openai needs httpx: pip install 'inference[upstream]'")
    return httpx


class UpstreamGeneration:
    def __init__(self, response: Any, stream: bool) -> None:
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None
        self._response = response
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._done = False
        self._pump = asyncio.ensure_future(self._read_stream() if stream else self._read_whole())

    def __aiter__(self) -> "UpstreamGeneration":
        return self

    async def __anext__(self) -> str:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, str):
            return item
        self._done = True
        if isinstance(item, BaseException):
            raise item
        raise StopAsyncIteration

    def cancel(self) -> None:
        self._pump.cancel()

    async def aclose(self) -> None:
        self._done = True
        if not self._pump.done():
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)

    def _usage(self, usage: dict[str, Any] | None) -> None:
        if usage:
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)

    async def _read_whole(self) -> None:
        httpx = _httpx()
        try:
            data = json.loads(await self._response.aread())
            choice = data["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
            self.finish_reason = _finish(choice.get("finish_reason"))
            self._usage(data.get("usage"))
            if text:
                self._queue.put_nowait(text)
            self._queue.put_nowait(_END)
        except asyncio.CancelledError:
            self._queue.put_nowait(_END)
            raise
        except httpx.TimeoutException:
            self._queue.put_nowait(UpstreamError(504, "upstream_timeout", "the upstream did not answer in time"))
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            self._queue.put_nowait(UpstreamError(502, "upstream_error", f"the upstream sent a bad answer: {exc!r}"))
        finally:
            await self._response.aclose()

    async def _read_stream(self) -> None:
        httpx = _httpx()
        finish: FinishReason | None = None
        try:
            async for line in self._response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                data = json.loads(payload)
                if "error" in data:
                    message = (data["error"] or {}).get("message", "unknown error")
                    raise UpstreamError(502, "upstream_error", f"the upstream failed mid-stream: {message}")
                self._usage(data.get("usage"))
                for choice in data.get("choices") or ():
                    delta = choice.get("delta")
                    text = delta.get("content") if delta is not None else choice.get("text")
                    if text:
                        self._queue.put_nowait(text)
                    if choice.get("finish_reason"):
                        finish = _finish(choice["finish_reason"])
            self.finish_reason = finish or "stop"
            self._queue.put_nowait(_END)
        except asyncio.CancelledError:
            self._queue.put_nowait(_END)
            raise
        except UpstreamError as exc:
            self._queue.put_nowait(exc)
        except httpx.TimeoutException:
            self._queue.put_nowait(UpstreamError(504, "upstream_timeout", "the upstream stalled mid-stream"))
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            self._queue.put_nowait(UpstreamError(502, "upstream_error", f"the upstream stream broke: {exc!r}"))
        finally:
            await self._response.aclose()


def _finish(reason: Any) -> FinishReason:
    return "length" if reason == "length" else "stop"


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
        self._client: Any = None
        self._info: ModelInfo | None = None
        self._closed = threading.Event()

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

    def load(self) -> None:
        """Find the upstream's model (its first one unless UPSTREAM_MODEL names it); retry until it answers."""
        httpx = _httpx()
        model = self.model
        while model is None and not self._closed.is_set():
            try:
                response = httpx.get(f"{self.base_url}/models", headers=self._headers, timeout=CONNECT_TIMEOUT)
                response.raise_for_status()
                model = response.json()["data"][0]["id"]
            except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
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

    def _get_client(self) -> Any:
        if self._client is None:
            httpx = _httpx()
            self._client = httpx.AsyncClient(
                base_url=self.base_url,
                headers=self._headers,
                timeout=httpx.Timeout(self.timeout, connect=CONNECT_TIMEOUT),
                limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS),
            )
        return self._client

    async def generate(self, request: GenerationRequest) -> UpstreamGeneration:
        if self._info is None or self._closed.is_set():
            raise EngineNotReady("waiting for the upstream" if not self._closed.is_set() else "shutting down")
        httpx = _httpx()
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
        if request.stream:
            payload["stream_options"] = {"include_usage": True}
        if request.messages is not None:
            path = "/chat/completions"
            payload["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        else:
            path = "/completions"
            payload["prompt"] = request.prompt
        client = self._get_client()
        try:
            response = await client.send(client.build_request("POST", path, json=payload), stream=True)
        except httpx.TimeoutException:
            raise UpstreamError(504, "upstream_timeout", f"the upstream at {self.base_url} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise UpstreamError(502, "upstream_unavailable", f"the upstream at {self.base_url} failed: {exc!r}") from None
        if response.status_code >= 400:
            raise await _refusal(response)
        return UpstreamGeneration(response, request.stream)

    async def close(self) -> None:
        self._closed.set()
        if self._client is not None:
            await self._client.aclose()


async def _refusal(response: Any) -> UpstreamError:
    """The upstream's 4xx/5xx as our error: its client errors pass through, its failures become 502."""
    try:
        body = json.loads(await response.aread())
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else (error or str(body))
        param = error.get("param") if isinstance(error, dict) else None
    except ValueError:
        message, param = response.text[:200], None
    finally:
        await response.aclose()
    status = response.status_code
    text = f"upstream: {message}"
    if status in (400, 404, 413, 422):
        return UpstreamError(status, "upstream_rejected", text, field=param)
    if status in (429, 503):
        return UpstreamError(status, "upstream_busy", text, retry_after=response.headers.get("retry-after", "1"))
    return UpstreamError(502, "upstream_error", f"upstream answered {status}: {message}")
