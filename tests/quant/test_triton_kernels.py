"""The Triton kernels (`greentune.quant.triton_*`), proven on the CPU under Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before triton defines the kernels, and setting it here would
leak into every other test of this process, so the cases (`_triton_cases.py`) run in a child
pytest process with it set. Skipped only when triton is not installed (the `test` extra
installs it on Linux).
"""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("_triton_cases.py")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton is not installed (the test extra installs it on Linux)")
def test_triton_kernels_under_the_interpreter():
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREENTUNE_")}
    env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
                       capture_output=True, text=True, env=env, cwd=CASES.parents[2], timeout=600)
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, tail
    passed = re.search(r"(\d+) passed", r.stdout)
    assert passed and int(passed.group(1)) >= 20 and "skipped" not in r.stdout, tail


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
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREENTUNE_")}
    env.update(GREENTUNE_TRITON="fused", TRITON_INTERPRET="1")   # asked for, but not importable
    r = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
