import subprocess
import sys
from pathlib import Path

import pytest

from inference.config import DEFAULT_SYSTEM_PROMPT, ConfigError, Settings

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_match_the_documented_ones():
    s = Settings.from_env({}, env_file=None)
    assert (s.host, s.port, s.environment, s.log_level) == ("127.0.0.1", 8000, "development", "INFO")
    assert (s.rate_limit_enabled, s.rate_limit_per_minute, s.cache_ttl_seconds) == (True, 10, 60)
    assert (s.max_body_bytes, s.model_backend, s.redis_url, s.model_path) == (1024 * 1024, "llama", None, None)
    assert s.system_prompt == DEFAULT_SYSTEM_PROMPT


def test_environment_beats_dotenv_beats_defaults(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("PORT=9001\nLOG_LEVEL=debug\n# a comment\nRATE_LIMIT_ENABLED=no\n")
    s = Settings.from_env({"PORT": "9002"}, env_file=env_file)
    assert s.port == 9002
    assert s.log_level == "DEBUG"
    assert s.rate_limit_enabled is False
    assert s.rate_limit_per_minute == 10


@pytest.mark.parametrize(
    "name, value, allowed",
    [
        ("PORT", "abc", "integer between 1 and 65535"),
        ("PORT", "70000", "integer between 1 and 65535"),
        ("RATE_LIMIT_PER_MINUTE", "-3", "integer >= 1"),
        ("RATE_LIMIT_ENABLED", "maybe", "boolean"),
        ("LOG_LEVEL", "loud", "DEBUG, INFO"),
        ("MODEL_BACKEND", "pytorch", "one of: llama"),
        ("REDIS_URL", "localhost:6379", "redis://"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318", "http://"),
        ("MODEL_PATH", "/no/such/model.gguf", "existing file"),
        ("MAX_BODY_BYTES", "10", ">= 1024"),
        ("SYSTEM_PROMPT", "  ", "not be empty"),
        ("UPSTREAM_PASSTHROUGH", "messages,chat", "chat: not one of messages, responses"),
    ],
)
def test_invalid_values_name_the_variable_and_what_is_allowed(name, value, allowed):
    with pytest.raises(ConfigError) as err:
        Settings.from_env({name: value}, env_file=None)
    assert str(err.value).startswith(f"{name}={value!r} is invalid")
    assert allowed in str(err.value)


def test_max_tokens_limit_must_fit_the_context():
    with pytest.raises(ConfigError, match="MAX_TOKENS_LIMIT=4096 is invalid: must be smaller than N_CTX=2048"):
        Settings.from_env({"MAX_TOKENS_LIMIT": "4096"}, env_file=None)


def test_passthrough_needs_an_upstream():
    upstream = {"MODEL_BACKEND": "openai", "UPSTREAM_URL": "http://vllm:8000/v1"}
    settings = Settings.from_env({**upstream, "UPSTREAM_PASSTHROUGH": " Responses, messages "}, env_file=None)
    assert settings.upstream_passthrough == {"messages", "responses"}
    with pytest.raises(ConfigError, match="UPSTREAM_PASSTHROUGH needs MODEL_BACKEND=openai"):
        Settings.from_env({"UPSTREAM_PASSTHROUGH": "messages"}, env_file=None)


@pytest.mark.parametrize("env", [{"PORT": "abc"}, {"RATE_LIMIT_PER_MINUTE": "-3"}])
def test_cli_stops_with_one_line_and_no_traceback(env):
    result = subprocess.run(
        [sys.executable, "-m", "inference", "--env-file", "/nonexistent"],
        cwd=ROOT, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"configuration error: {next(iter(env))}=")
    assert "Traceback" not in result.stderr


def test_api_keys_come_from_the_variable_and_the_file(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nfile-key-0001\n\n  file-key-0002  \nshared-key-01\n")
    s = Settings.from_env({"API_KEYS": "env-key-0001, shared-key-01", "API_KEYS_FILE": str(keys)}, env_file=None)
    assert s.all_api_keys == ("env-key-0001", "shared-key-01", "file-key-0001", "file-key-0002")


def test_an_api_key_file_with_a_short_key_is_refused(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("short\n")
    with pytest.raises(ConfigError, match="API_KEYS_FILE=.*at least 8 characters"):
        Settings.from_env({"API_KEYS_FILE": str(keys)}, env_file=None)
