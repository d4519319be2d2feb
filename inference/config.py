"""Settings: read once from the environment and an optional .env file, then passed down frozen.

Precedence: process environment > .env file > defaults. A value that cannot be used stops start-up
with a ConfigError naming the variable and what is allowed.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from dotenv import dotenv_values

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Give short, factual answers."
ENVIRONMENTS = ("development", "staging", "production", "test")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MODEL_BACKENDS = ("llama", "openai")
CACHE_MODES = ("all", "deterministic", "off")
PASSTHROUGH_APIS = ("messages", "responses")  # UPSTREAM_PASSTHROUGH: the dialects an upstream may get unchanged
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """A setting has a value the service cannot use; the message names the variable."""


def default_model_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "inference" / "models"


# Parsers take the raw string and return the value or raise ValueError("what is allowed").


def _bool(raw: str) -> bool:
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError("must be a boolean (true/false, 1/0, yes/no, on/off)")


def _int(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"must be an integer {bound}")
        return value

    return parse


def _float(minimum: float, maximum: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            value = math.nan
        if not minimum <= value <= maximum:  # also refuses nan
            raise ValueError(f"must be a number of seconds between {minimum:g} and {maximum:g}")
        return value

    return parse


def _choice(choices: tuple[str, ...], *, upper: bool = False) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().upper() if upper else raw.strip().lower()
        if value not in choices:
            raise ValueError("must be one of: " + ", ".join(choices))
        return value

    return parse


def _choices(choices: tuple[str, ...]) -> Callable[[str], frozenset[str]]:
    """A comma-separated set of `choices` (empty: none)."""
    def parse(raw: str) -> frozenset[str]:
        values = frozenset(v.strip().lower() for v in raw.split(",") if v.strip())
        unknown = values - set(choices)
        if unknown:
            raise ValueError(f"{', '.join(sorted(unknown))}: not one of " + ", ".join(choices))
        return values

    return parse


def _url(schemes: tuple[str, ...]) -> Callable[[str], str | None]:
    def parse(raw: str) -> str | None:
        value = raw.strip()
        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme not in schemes or not (parts.netloc or parts.path):
            raise ValueError("must be a URL starting with " + " or ".join(f"{s}://" for s in schemes))
        return value

    return parse


def _host(raw: str) -> str:
    value = raw.strip()
    if not value or not re.fullmatch(r"[A-Za-z0-9.:\-\[\]]+", value):
        raise ValueError("must be a host name or IP address, e.g. 127.0.0.1 or 0.0.0.0")
    return value


def _existing_file(raw: str) -> Path | None:
    value = raw.strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"must name an existing file; {path} does not exist")
    return path


def _directory(raw: str) -> Path:
    value = raw.strip()
    if not value:
        raise ValueError("must be a directory path")
    return Path(value).expanduser()


def _text(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must not be empty")
    return raw


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse_optional(raw: str) -> Any:
        return parse(raw) if raw.strip() else None

    return parse_optional


def _key_prefix(raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"[A-Za-z0-9_.\-:]{1,64}", value):
        raise ValueError("must be 1-64 characters of A-Z a-z 0-9 _ . - :")
    return value


def _networks(raw: str) -> tuple[IPNetwork, ...]:
    networks = []
    for part in filter(None, (p.strip() for p in raw.split(","))):
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"must be comma-separated IP addresses or CIDRs; {part!r} is neither") from None
    return tuple(networks)


def _keys(raw: str) -> tuple[str, ...]:
    keys = tuple(filter(None, (k.strip() for k in raw.split(","))))
    if any(len(k) < 8 for k in keys):
        raise ValueError("every key must have at least 8 characters")
    return keys


def _keys_file(raw: str) -> Path | None:
    path = _existing_file(raw)
    if path is not None:
        try:
            keys = [line.strip() for line in path.read_text().splitlines()]
        except OSError as exc:
            raise ValueError(f"cannot be read: {exc}") from None
        _keys(",".join(k for k in keys if k and not k.startswith("#")))
    return path


def _secret_file(raw: str) -> Path | None:
    path = _existing_file(raw)
    if path is not None:
        try:
            secret = path.read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot be read: {exc}") from None
        if not secret:
            raise ValueError(f"{path} is empty")
    return path


def _optional_text(raw: str) -> str | None:
    return raw.strip() or None


@dataclass(frozen=True)
class Settings:
    """Everything the service can be configured with; field name = environment variable in upper case."""

    host: str = "127.0.0.1"
    port: int = 8000
    environment: str = "development"
    log_level: str = "INFO"
    redis_url: str | None = None
    redis_password: str | None = None
    redis_password_file: Path | None = None
    redis_key_prefix: str = "inference"
    redis_timeout_ms: int = 200
    rate_limit_enabled: bool = True
    rate_limit_per_minute: int = 10
    rate_limit_burst: int | None = None
    rate_limit_tokens_per_minute: int | None = None
    rate_limit_fail_open: bool = True
    trusted_proxies: tuple[IPNetwork, ...] = ()
    api_keys: tuple[str, ...] = ()
    api_keys_file: Path | None = None
    cache_mode: str = "all"
    cache_max_bytes: int = 64 * 1024 * 1024
    log_format: str = "text"
    log_prompts: bool = False
    otel_enabled: bool = True
    otel_exporter_otlp_endpoint: str | None = None
    otel_exporter_otlp_protocol: str = "http/protobuf"
    otel_service_name: str = "inference"
    model_backend: str = "llama"
    served_model_name: str | None = None
    upstream_url: str | None = None
    upstream_api_key: str | None = None
    upstream_model: str | None = None
    upstream_passthrough: frozenset[str] = frozenset()
    upstream_timeout_seconds: int = 60
    model_path: Path | None = None
    chat_template_file: Path | None = None
    model_cache_dir: Path = default_model_cache_dir()
    n_ctx: int = 2048
    n_threads: int = 0
    llama_extra_buffers: str = "auto"
    test_only_crash_with_extra_buffers: bool = False
    engine_crash_loop_deaths: int = 3
    engine_crash_loop_seconds: float = 60.0
    max_body_bytes: int = 1024 * 1024
    body_timeout_seconds: float = 30.0
    head_timeout_seconds: float = 10.0
    max_connections: int = 1024
    max_tokens_limit: int = 1024
    structured_dry_multiplier: float = 0.0
    structured_closing_tokens: int = 64
    max_queued_requests: int = 64
    max_concurrent_requests: int = 8
    max_choices: int = 4
    queue_timeout_seconds: float = 30.0
    request_timeout_seconds: float = 300.0
    watchdog_seconds: float = 30.0
    engine_stall_restart_seconds: float = 120.0
    drain_delay_seconds: float = 5.0
    shutdown_timeout_seconds: float = 30.0
    cache_ttl_seconds: int = 60
    idempotency_ttl_seconds: int = 3600
    responses_ttl_seconds: int = 30 * 86400  # OpenAI keeps stored responses 30 days
    responses_max_bytes: int = 1024 * 1024
    responses_memory_bytes: int = 64 * 1024 * 1024
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    chat_system_prompt: bool = True
    docs_enabled: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env") -> "Settings":
        """Build settings from `environ` (default: os.environ) over the values in `env_file`, if it exists."""
        environ = os.environ if environ is None else environ
        merged: dict[str, str] = {}
        if env_file is not None and Path(env_file).is_file():
            merged.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
        merged.update(environ)

        values: dict[str, Any] = {}
        for f in fields(cls):
            name = f.name.upper()
            if name in merged:
                try:
                    values[f.name] = PARSERS[f.name](merged[name])
                except ValueError as exc:
                    raise ConfigError(f"{name}={merged[name]!r} is invalid: {exc}") from None
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Cross-field rules that no single variable can express."""
        if not self.embedded and self.upstream_url is None:
            raise ConfigError("MODEL_BACKEND=openai needs UPSTREAM_URL (the base URL of an OpenAI-compatible server)")
        if self.embedded and self.upstream_passthrough:
            raise ConfigError("UPSTREAM_PASSTHROUGH needs MODEL_BACKEND=openai (an upstream to pass requests to)")
        if self.embedded and self.max_tokens_limit >= self.n_ctx:
            raise ConfigError(
                f"MAX_TOKENS_LIMIT={self.max_tokens_limit} is invalid: must be smaller than N_CTX={self.n_ctx}"
            )

    @property
    def all_api_keys(self) -> tuple[str, ...]:
        """API_KEYS plus the keys in API_KEYS_FILE (one a line; blank lines and # comments skipped)."""
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            lines = self.api_keys_file.read_text().splitlines()
            keys += [k.strip() for k in lines if k.strip() and not k.strip().startswith("#")]
        return tuple(dict.fromkeys(keys))

    @property
    def redis_auth(self) -> str | None:
        """REDIS_PASSWORD, else the content of REDIS_PASSWORD_FILE (a mounted Secret), else None."""
        if self.redis_password is None and self.redis_password_file is not None:
            return self.redis_password_file.read_text().strip()
        return self.redis_password

    @property
    def embedded(self) -> bool:
        """The model runs here (MODEL_BACKEND=llama), not behind an upstream: the one place this is decided."""
        return self.model_backend == "llama"

    @property
    def burst(self) -> int:
        return self.rate_limit_burst or self.rate_limit_per_minute

    def replace(self, **changes: Any) -> "Settings":
        settings = replace(self, **changes)
        settings.check()
        return settings


PARSERS: dict[str, Callable[[str], Any]] = {
    "host": _host,
    "port": _int(1, 65535),
    "environment": _choice(ENVIRONMENTS),
    "log_level": _choice(LOG_LEVELS, upper=True),
    "redis_url": _url(("redis", "rediss", "unix")),
    "redis_password": _optional_text,
    "redis_password_file": _secret_file,
    "redis_key_prefix": _key_prefix,
    "redis_timeout_ms": _int(1, 60_000),
    "rate_limit_enabled": _bool,
    "rate_limit_per_minute": _int(1),
    "rate_limit_burst": _optional(_int(1)),
    "rate_limit_tokens_per_minute": _optional(_int(1)),
    "rate_limit_fail_open": _bool,
    "trusted_proxies": _networks,
    "api_keys": _keys,
    "api_keys_file": _keys_file,
    "cache_mode": _choice(CACHE_MODES),
    "cache_max_bytes": _int(0),
    "log_format": _choice(("text", "json")),
    "log_prompts": _bool,
    "otel_enabled": _bool,
    "otel_exporter_otlp_endpoint": _url(("http", "https")),
    "otel_exporter_otlp_protocol": _choice(("http/protobuf", "grpc")),
    "otel_service_name": _text,
    "model_backend": _choice(MODEL_BACKENDS),
    "served_model_name": _optional_text,
    "upstream_url": _url(("http", "https")),
    "upstream_api_key": _optional_text,
    "upstream_model": _optional_text,
    "upstream_passthrough": _choices(PASSTHROUGH_APIS),
    "upstream_timeout_seconds": _int(1, 3600),
    "model_path": _existing_file,
    "chat_template_file": _existing_file,
    "model_cache_dir": _directory,
    "n_ctx": _int(64, 1 << 20),
    "n_threads": _int(0, 1024),
    "llama_extra_buffers": _choice(("auto", "on", "off")),
    "test_only_crash_with_extra_buffers": _bool,
    "engine_crash_loop_deaths": _int(1, 1000),
    "engine_crash_loop_seconds": _float(1, 86400),
    "max_body_bytes": _int(1024),
    "body_timeout_seconds": _float(0.1, 3600),
    "head_timeout_seconds": _float(0.1, 3600),
    "max_connections": _int(1, 1_000_000),
    "max_tokens_limit": _int(1),
    "structured_dry_multiplier": _float(0, 10),
    "structured_closing_tokens": _int(0, 1 << 20),
    "max_queued_requests": _int(1),
    "max_concurrent_requests": _int(1, 256),
    "max_choices": _int(1, 128),
    "queue_timeout_seconds": _float(0.001, 86400),
    "request_timeout_seconds": _float(0.001, 86400),
    "watchdog_seconds": _float(0, 86400),
    "engine_stall_restart_seconds": _float(0, 86400),
    "drain_delay_seconds": _float(0, 3600),
    "shutdown_timeout_seconds": _float(1, 3600),
    "cache_ttl_seconds": _int(1),
    "idempotency_ttl_seconds": _int(1),
    "responses_ttl_seconds": _int(1),
    "responses_max_bytes": _int(1024),
    "responses_memory_bytes": _int(0),
    "system_prompt": _text,
    "chat_system_prompt": _bool,
    "docs_enabled": _bool,
}
