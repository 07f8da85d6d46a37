"""greentune.cpu_gemm: oneDNN's linear against torch's, values and gradients, and when it applies."""

import platform
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from greentune import cpu_gemm

pytestmark = pytest.mark.skipif(
    cpu_gemm._onednn_linear() is None, reason="this torch build has no oneDNN linear"
)


@pytest.fixture(autouse=True)
def onednn(monkeypatch):
    """oneDNN on whatever CPU runs the tests (`auto` would choose it on AMD x86-64 only), for
    every size (these shapes are below `MIN_MACS`)."""
    monkeypatch.setattr(cpu_gemm, "BACKEND", "onednn")
    monkeypatch.setattr(cpu_gemm, "MIN_MACS", 0)


@pytest.mark.parametrize("layout", ["contiguous", "column slice", "transposed", "3-d"])
def test_linear_and_matmul_equal_torch_within_rounding(layout):
    torch.manual_seed(0)
    w, b = torch.randn(48, 32), torch.randn(48)
    x = {
        "contiguous": torch.randn(20, 32),
        "column slice": torch.randn(20, 64)[:, 16:48],
        "transposed": torch.randn(32, 20).t(),
        "3-d": torch.randn(2, 10, 32),
    }[layout]
    torch.testing.assert_close(cpu_gemm.linear(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cpu_gemm.linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cpu_gemm.matmul(x, w.t()), x @ w.t(), atol=1e-5, rtol=1e-5)
    assert cpu_gemm.linear(torch.randn(0, 32), w).shape == (0, 48)  # an expert with no rows


def test_frozen_linear_gradient_equals_torch():
    torch.manual_seed(1)
    w, b = torch.randn(48, 32), torch.randn(48)
    x = torch.randn(3, 7, 32, requires_grad=True)
    dy = torch.randn(3, 7, 48)
    y = cpu_gemm.frozen_linear(x, w, b)
    assert y.grad_fn is not None and "FrozenLinear" in type(y.grad_fn).__name__
    (dx,) = torch.autograd.grad(y, x, dy)
    (want,) = torch.autograd.grad(F.linear(x, w, b), x, dy)
    torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, want, atol=1e-5, rtol=1e-5)


def test_where_it_does_not_apply_torch_computes_exactly(monkeypatch):
    torch.manual_seed(2)
    x, w = torch.randn(5, 32), torch.randn(8, 32)
    trainable = w.clone().requires_grad_()
    y = cpu_gemm.frozen_linear(x, trainable)  # a weight that trains: autograd's own linear
    assert "FrozenLinear" not in type(y.grad_fn).__name__
    assert torch.equal(cpu_gemm.linear(x.double(), w.double()), F.linear(x.double(), w.double()))
    monkeypatch.setattr(cpu_gemm, "BACKEND", "torch")
    assert torch.equal(cpu_gemm.linear(x, w), F.linear(x, w))
    assert torch.equal(cpu_gemm.frozen_linear(x, w), F.linear(x, w))


def test_auto_chooses_it_on_amd_x86_only_and_from_min_macs(monkeypatch):
    x, w = torch.randn(5, 32), torch.randn(8, 32)
    monkeypatch.setattr(cpu_gemm, "BACKEND", "auto")
    assert cpu_gemm._use_onednn(x, w) == cpu_gemm._amd_x86()
    monkeypatch.setattr(cpu_gemm, "MIN_MACS", 5 * 8 * 32 + 1)
    assert not cpu_gemm._use_onednn(x, w)  # one multiply-add short: torch's GEMM
    info = Path("/proc/cpuinfo")
    amd = info.exists() and "AuthenticAMD" in info.read_text() and platform.machine() == "x86_64"
    assert cpu_gemm._amd_x86() == amd


def test_deterministic():
    torch.manual_seed(3)
    x, w = torch.randn(300, 512), torch.randn(1024, 512)
    assert torch.equal(cpu_gemm.linear(x, w), cpu_gemm.linear(x, w))


def test_the_self_check_draws_nothing_from_the_global_rng():
    """A resumed run restores the RNG and then makes its first GEMM at another point than the
    original run did: a draw there would shift every later dropout mask."""
    cpu_gemm._onednn_linear.cache_clear()
    before = torch.get_rng_state()
    assert cpu_gemm._onednn_linear() is not None
    assert torch.equal(torch.get_rng_state(), before)
