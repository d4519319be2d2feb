"""Engines: the contract the service may rely on (base.py), the embedded llama.cpp engine in a supervised process
of its own (llama/, with the default model's download), and an OpenAI-compatible upstream (upstream/).
May import config and telemetry (the engine process's logs); never web, serving or api.
`create_engine` is the one place that picks an engine from the settings."""

from __future__ import annotations

from ..config import Settings
from .base import Engine


def create_engine(settings: Settings) -> Engine:
    """The engine MODEL_BACKEND names; may download the default model (llama.models.pull) first."""
    if not settings.embedded:
        from .upstream import UpstreamEngine

        assert settings.upstream_url is not None  # Settings.check guarantees it
        return UpstreamEngine(
            settings.upstream_url, api_key=settings.upstream_api_key, model=settings.upstream_model,
            timeout=settings.upstream_timeout_seconds,
        )
    from .llama.engine import LlamaEngine
    from .llama.models import resolve_model

    path, sha256 = resolve_model(settings.model_path, settings.model_cache_dir)
    return LlamaEngine(
        path, n_ctx=settings.n_ctx, n_threads=settings.n_threads, max_queued=settings.max_queued_requests,
        max_concurrent=settings.max_concurrent_requests, queue_timeout=settings.queue_timeout_seconds, sha256=sha256,
        extra_buffers=settings.llama_extra_buffers, crash_test=settings.test_only_crash_with_extra_buffers,
        crash_loop_deaths=settings.engine_crash_loop_deaths, crash_loop_seconds=settings.engine_crash_loop_seconds,
        log_format=settings.log_format, chat_template_file=settings.chat_template_file,
        structured_dry_multiplier=settings.structured_dry_multiplier,
        structured_closing_tokens=settings.structured_closing_tokens,
    )
