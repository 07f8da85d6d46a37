"""The benchmarks name only what the package still has.

They run outside the suite, so a module moved in the package (issue 14 moved `moe/hook.py` to
`train/moe_hook.py`) broke `train_throughput.py` with nothing failing in CI. Every
`from greentune... import name` in `benchmarks/` and `scripts/`, top-level or inside a
function, must resolve: the module imports and has the name (or a submodule of that name)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob("scripts/*.py")])


def _greentune_imports(path: Path) -> list[tuple[int, str, str | None]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        module = getattr(node, "module", None) or ""
        if isinstance(node, ast.ImportFrom) and node.level == 0 and module.startswith("greentune"):
            found += [(node.lineno, node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.startswith("greentune")]
    return found


def test_the_benchmarks_are_found():
    assert any(p.name == "train_throughput.py" for p in FILES)


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_greentune_import_resolves(path):
    broken = []
    for line, module, name in _greentune_imports(path):
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            broken.append(f"line {line}: {module}: {e}")
            continue
        if name is None or hasattr(mod, name):
            continue
        try:
            importlib.import_module(f"{module}.{name}")
        except ImportError:
            broken.append(f"line {line}: {module} has no {name!r}")
    assert not broken, f"{path.name}: " + "; ".join(broken)
