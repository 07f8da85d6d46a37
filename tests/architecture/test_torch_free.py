"""The fast commands stay fast: `plan/`, `energy/`, `report/`, `recipe.py`, `cli.py`, `formats.py` and
`run_dir.py` import without torch (ARCHITECTURE.md). Each check runs in a fresh interpreter whose import
system refuses `torch`, so a module that needs it fails there with the name of what pulled it in."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

TORCH_FREE_PACKAGES = ("plan", "energy", "report")
TORCH_FREE_MODULES = ("greentune.recipe", "greentune.cli", "greentune.formats", "greentune.run_dir")

BLOCK = textwrap.dedent(
    """
    import sys

    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"torch is blocked here (torch-free rule): {name}")
            return None

    sys.meta_path.insert(0, _NoTorch())
    """
)


def _run(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )


def _modules() -> list[str]:
    names = list(TORCH_FREE_MODULES)
    for pkg in TORCH_FREE_PACKAGES:
        names.append(f"greentune.{pkg}")
        names += sorted(f"greentune.{pkg}.{p.stem}" for p in (SRC / "greentune" / pkg).glob("*.py"))
    return [n.removesuffix(".__init__") for n in names]


def test_the_blocker_blocks():
    """The check can fail: a module that imports torch is refused in the blocked interpreter."""
    r = _run("import greentune.adapters.lora")
    assert r.returncode != 0 and "torch is blocked here" in r.stderr


@pytest.mark.parametrize("module", _modules())
def test_imports_without_torch(module):
    r = _run(f"import {module}; assert 'torch' not in sys.modules")
    assert r.returncode == 0, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.stdout


@pytest.mark.parametrize("argv", [["--version"], ["plan", "--help"], ["--help"]])
def test_fast_commands_run_without_torch(argv):
    t0 = time.perf_counter()
    r = _run(
        f"import runpy; sys.argv = ['greentune', *{argv!r}]; "
        "runpy.run_module('greentune', run_name='__main__')"
    )
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    # generous: a torch import alone takes seconds; this bound only catches something pathological
    assert seconds < 30, f"greentune {' '.join(argv)} took {seconds:.1f} s"
