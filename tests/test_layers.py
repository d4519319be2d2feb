"""The layer rule, read from the modules' own imports: a module imports only from its own layer or the layers
below it, and no chain of imports comes back to where it started (imports for type checkers included: a circle
drawn only for them is still two modules that cannot be read apart). And the room rule: a module holds one thing,
which fits in MAX_LINES."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "inference"
# Bottom to top. The entry points and the assembly sit on top; settings and the package's name at the bottom.
LAYERS = [
    ("inference", "inference.config"),
    ("inference.web",),
    ("inference.telemetry",),
    ("inference.store",),
    ("inference.engine",),
    ("inference.serving",),
    ("inference.api",),
    ("inference.middleware",),
    ("inference.app", "inference.__main__"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules `name` imports, anywhere in its body (function-level and TYPE_CHECKING imports count
    too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from . import x` imports the module x when there is one
            found.update(f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known)
    return {target for target in found if target in known}


def layer(name: str) -> int:
    best, rank = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            # the longest matching prefix decides ("inference" alone only claims the package's __init__)
            matches = name == prefix or (prefix != "inference" and name.startswith(prefix + "."))
            if matches and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank >= 0, f"{name} belongs to no layer: add it to LAYERS"
    return rank


GRAPH = {name: imports(name, path, set(modules())) for name, path in modules().items()}
# The room rule: a module over this many lines holds more than one thing; split it. The exceptions, each with why:
MAX_LINES = 500
LONGER: dict[str, str] = {}


def test_every_module_belongs_to_a_layer():
    for name in GRAPH:
        layer(name)


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_a_module_imports_nothing_from_a_layer_above_its_own(name):
    above = sorted(target for target in GRAPH[name] if layer(target) > layer(name))
    assert not above, f"{name} (layer {LAYERS[layer(name)][0]}) imports from layers above it: {above}"


def test_no_import_circle():
    # Depth-first search; a module met again while still on the path closes a circle.
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            circle = path[path.index(name):] + [name]
            pytest.fail("import circle: " + " -> ".join(circle))
        if name in done:
            return
        for target in sorted(GRAPH[name]):
            # a package's __init__ importing its own modules, and a module importing its package, are not circles
            if target != name and not name.startswith(target + ".") and not target.startswith(name + "."):
                visit(target, path + [name])
        done.add(name)

    for name in sorted(GRAPH):
        visit(name, [])


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_a_module_fits_in_one_room(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES or name in LONGER, (
        f"{name} has {lines} lines (more than {MAX_LINES}): split it, or say in LONGER why it is one thing")


def test_the_room_rule_names_only_modules_that_need_it():
    for name in LONGER:
        assert len(modules()[name].read_text().splitlines()) > MAX_LINES, f"{name} fits now: take it out of LONGER"


def test_the_circle_check_sees_a_circle_drawn_for_type_checkers(tmp_path):
    """A TYPE_CHECKING import is an import here (the web/ circle of dialect, http and state was one)."""
    module = tmp_path / "inference" / "web" / "x.py"
    module.parent.mkdir(parents=True)
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .state import RequestState\n")
    known = {"inference.web.state", "inference.web.x"}
    assert imports("inference.web.x", module, known) == {"inference.web.state"}


def test_the_checks_see_a_violation():
    """The rule is read from real imports: a module of a lower layer importing a higher one is caught."""
    assert layer("inference.web.http") < layer("inference.serving.service") < layer("inference.middleware.errors")
    assert "inference.web.errors" in GRAPH["inference.web.router"]
    assert "inference.engine.base" in GRAPH["inference.engine.llama.engine"]  # relative `from ..base import`


def test_everything_but_the_embedded_engine_imports_without_llama_cpp():
    """The upstream-only image has no llama-cpp-python: its entry point, the assembly and the model download must
    import without it (a package __init__ that imports its modules once broke this)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'llama_cpp': raise ImportError('no llama_cpp here')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import inference.__main__, inference.app, inference.engine.llama.models, inference.engine.upstream\n"
        "import inference.telemetry.export\n"
        "from inference.engine import create_engine\n"
        "from inference.config import Settings\n"
        "settings = Settings.from_env({'MODEL_BACKEND': 'openai', 'UPSTREAM_URL': 'http://127.0.0.1:9'}, env_file=None)\n"
        "print(type(create_engine(settings)).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "UpstreamEngine"
