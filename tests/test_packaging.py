"""The package as it ships: a wheel built from this tree, installed outside it, with every module and data file.

An editable install (the README's, the tests') serves files straight from the source tree, so a package missing
from the wheel (once `inference/engine/`, which had no `__init__.py`) goes unnoticed until an image crashes.
"""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "inference"

IMPORT_EVERYTHING = """
import importlib, importlib.resources, json, pkgutil, sys
import inference
modules = sorted(m.name for m in pkgutil.walk_packages(inference.__path__, "inference."))
for name in modules:
    importlib.import_module(name)
files = importlib.resources.files("inference")
data = sorted(str(p.relative_to(files)) for p in (files / "static").iterdir())
data += sorted("store/lua/" + p.name for p in (files / "store" / "lua").iterdir())
print(json.dumps({"file": inference.__file__, "modules": modules, "data": data,
                  "lua": [len((files / "store/lua" / n).read_text()) for n in ("gcra.lua", "refund.lua")]}))
"""


def source_modules() -> list[str]:
    names = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(set(names) - {"inference"})


def source_data() -> list[str]:
    return sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out, tree = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("tree")
    # Built from a copy of what packaging reads, so no build/ or egg-info is left in the checkout.
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(PACKAGE, tree / "inference", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(tree)],
                   check=True, timeout=300)
    (built,) = out.glob("inference-*.whl")
    return built


def test_the_wheel_holds_every_module_and_data_file(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    missing = [f"inference/{name}" for name in source_data() if f"inference/{name}" not in names]
    missing += [m for m in source_modules() if m.replace(".", "/") + ".py" not in names
                and m.replace(".", "/") + "/__init__.py" not in names]
    assert not missing, f"not in {wheel.name}: {missing}"


def test_installed_wheel_imports_every_module_and_reads_its_data(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target),
                    str(wheel)], check=True, timeout=300)
    # Run from outside the source tree with the wheel's copy first on the path (dependencies from this venv).
    result = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["file"].startswith(str(target)), report["file"]
    assert report["modules"] == source_modules()
    assert report["data"] == source_data()
    assert all(report["lua"])
    command = subprocess.run([sys.executable, "-m", "inference", "--help"], cwd=tmp_path,
                             env={"PYTHONPATH": str(target)}, capture_output=True, text=True, timeout=60)
    assert command.returncode == 0 and "pull" in command.stdout, command.stderr
