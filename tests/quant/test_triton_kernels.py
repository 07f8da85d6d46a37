"""The Triton kernels (`greentune.quant.triton_*`), proven on the CPU under Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before triton defines the kernels, and setting it here would
leak into every other test of this process, so the cases (`_triton_cases.py`) run in a child
pytest process with it set; another child compiles the kernels for a GPU
(`_triton_compile_probe.py`). Skipped only when triton is not installed (the `test` extra
installs it on Linux); that greentune runs without triton is checked either way.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("_triton_cases.py")
COMPILE = Path(__file__).with_name("_triton_compile_probe.py")
NO_TRITON = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (the test extra installs it on Linux)",
)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREENTUNE_") and k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


_WITHOUT_TRITON = r"""
import sys
sys.modules["triton"] = None                     # import triton -> ImportError, as when not installed
import torch
from greentune.quant import triton_dispatch
from greentune.quant.linear import QuantLinear
layer = QuantLinear.from_linear(torch.nn.Linear(64, 8), "q8_0")
x = torch.randn(3, 64, requires_grad=True)
layer(x).sum().backward()
assert triton_dispatch._kernels() is None
assert not triton_dispatch.enabled(torch.device("cuda"), layer.fmt)
print("ok")
"""


@pytest.fixture(scope="module")
def children():
    """The three child processes, started together (they are mostly imports and compiles)."""
    triton = importlib.util.find_spec("triton") is not None
    commands = {
        "cases": (
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
            _env(TRITON_INTERPRET="1"),
        ),
        "compile": ([sys.executable, str(COMPILE)], _env()),
        # asked for the kernels, but triton is not importable
        "without": (
            [sys.executable, "-c", _WITHOUT_TRITON],
            _env(GREENTUNE_TRITON="fused", TRITON_INTERPRET="1"),
        ),
    }
    procs = {
        name: subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=CASES.parents[2]
        )
        for name, (cmd, env) in commands.items()
        if triton or name == "without"
    }
    results = {}

    def result(name):
        if name not in results:
            out, err = procs[name].communicate(timeout=600)
            results[name] = (procs[name].returncode, out, err)
        return results[name]

    yield result
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


@NO_TRITON
def test_triton_kernels_under_the_interpreter(children):
    rc, out, err = children("cases")
    tail = (out + err)[-6000:]
    assert rc == 0, tail
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 20 and "skipped" not in out, tail


@NO_TRITON
def test_kernels_compile_for_a_gpu_without_fused_multiply_adds(children):
    """The interpreter runs the kernels' Python; this compiles them as a GPU would (PTX and cubin
    for sm_90, no device needed) and checks the compiler kept torch's separate multiply and add."""
    rc, out, err = children("compile")
    assert rc == 0, err[-3000:]
    found = json.loads(out.strip().splitlines()[-1])
    assert found.pop("contracted") > 0  # the count sees contraction where it is allowed
    for name, k in found.items():
        assert k["cubin_bytes"] > 0 and k["fma"] == 0, (name, k)


def test_greentune_runs_without_triton(children):
    rc, out, err = children("without")
    assert rc == 0 and out.strip() == "ok", err[-3000:]
