"""The Triton kernels (`greentune.quant.triton_*`), proven on the CPU under Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before triton defines the kernels, and setting it here would
leak into every other test of this process, so the cases (`_triton_cases.py`) run in a child
pytest process with it set. Skipped only when triton is not installed (the `test` extra
installs it on Linux).
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
NO_TRITON = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                               reason="triton is not installed (the test extra installs it on Linux)")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREENTUNE_") and k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


@NO_TRITON
def test_triton_kernels_under_the_interpreter():
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
                       capture_output=True, text=True, env=_env(TRITON_INTERPRET="1"), cwd=CASES.parents[2],
                       timeout=600)
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, tail
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) >= 20 and "skipped" not in r.stdout, tail


@NO_TRITON
def test_kernels_compile_for_a_gpu_without_fused_multiply_adds():
    """The interpreter runs the kernels' Python; this compiles them as a GPU would (PTX and cubin
    for sm_90, no device needed) and checks the compiler kept torch's separate multiply and add."""
    r = subprocess.run([sys.executable, str(COMPILE)], capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out.pop("contracted") > 0                 # the count sees contraction where it is allowed
    for name, k in out.items():
        assert k["cubin_bytes"] > 0 and k["fma"] == 0, (name, k)


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


def test_greentune_runs_without_triton():
    env = _env(GREENTUNE_TRITON="fused", TRITON_INTERPRET="1")     # asked for, but not importable
    r = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
