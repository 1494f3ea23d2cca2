"""The house as drawn (shared/design/house.png): the runtime stands alone, the exporter builds on the
runtime's public names only, vera_models and the benchmarks on both packages' public names, and nothing
imports back up. Read from the source with ast, so that a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = {"runtime": ROOT / "runtime" / "vera_runtime", "exporter": ROOT / "vera_export", "models": ROOT / "models",
         "bench": ROOT / "bench"}


def _imports(folder: Path) -> list[tuple[str, str]]:
    """(file, module imported) for every import in the folder's Python files, ``from X import _y`` as X._y."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(path.name, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.append((path.name, node.module))
                found += [(path.name, f"{node.module}.{a.name}") for a in node.names if a.name.startswith("_")]
    return found


def _private(module: str, package: str) -> bool:
    return module.startswith(f"{package}.") and any(part.startswith("_") for part in module.split(".")[1:])


@pytest.mark.parametrize("part", ["exporter", "models", "bench"])
def test_only_public_runtime_names_are_used_outside_the_runtime(part):
    used = [(f, m) for f, m in _imports(PARTS[part]) if _private(m, "vera_runtime")]
    assert used == [], f"{part} imports private runtime modules: {used}; use vera_runtime, .layout or .files"


@pytest.mark.parametrize("part", ["models", "bench"])
def test_only_public_exporter_names_are_used_outside_the_exporter(part):
    used = [(f, m) for f, m in _imports(PARTS[part]) if _private(m, "vera_export")]
    assert used == [], f"{part} imports private exporter modules: {used}"


@pytest.mark.parametrize(("part", "forbidden"), [
    ("runtime", ("torch", "vera_export", "vera_models", "onnx", "transformers", "peft")),
    ("exporter", ("vera_models",)),
])
def test_nothing_imports_back_up(part, forbidden):
    used = [(f, m) for f, m in _imports(PARTS[part]) if m.split(".")[0] in forbidden]
    assert used == [], f"{part} imports {used}: the house's arrows point the other way"


def test_the_check_sees_a_private_import(tmp_path):
    """The rules above would catch what they forbid (a test that cannot fail proves nothing)."""
    (tmp_path / "probe.py").write_text(
        "from vera_runtime._io import x\nfrom vera_runtime import _taskfile\nimport vera_export._passes\n")
    found = [module for _, module in _imports(tmp_path)]
    assert [m for m in found if _private(m, "vera_runtime")] == ["vera_runtime._io", "vera_runtime._taskfile"]
    assert [m for m in found if _private(m, "vera_export")] == ["vera_export._passes"]
