"""ExpertLoop (the hand-written per-expert backward) against SparseExperts' autograd loop: with
torch's own GEMMs (`cpu_gemm.BACKEND = "torch"`) the same GEMMs in the same order, so outputs
and every gradient agree bit for bit; with oneDNN's (the default on AMD CPUs) to rounding."""

import pytest
import torch
from expert_store import FakeStore
from torch import nn

from greentune import cpu_gemm
from greentune.adapters.expert_lora import ExpertLoRA
from greentune.moe import SparseExperts
from greentune.moe.expert_loop import ExpertLoop

E, H, FF, R = 8, 32, 48, 4


def _experts(lora: bool, store: bool = False) -> SparseExperts:
    torch.manual_seed(0)
    m = SparseExperts(torch.randn(E, 2 * FF, H) * 0.1, torch.randn(E, H, FF) * 0.1, nn.SiLU())
    if store:
        for name in ("gate_up", "down"):
            m.set_weight_store_(name, FakeStore(getattr(m, f"{name}_proj")))
    if lora:
        m.lora = ExpertLoRA(E, H, FF, r=R, alpha=2 * R)
        with torch.no_grad():
            m.lora.B_gate_up.normal_(std=0.1)
            m.lora.B_down.normal_(std=0.1)
    return m


def _run(m: SparseExperts, fused: bool, monkeypatch, x_grad: bool = True):
    """Output and gradients (x, routing weights, LoRA factors) with `ExpertLoop` on or off."""
    monkeypatch.setattr(SparseExperts, "_loop_ok", lambda self, x: fused)
    torch.manual_seed(1)
    n = 36
    x = torch.randn(n, H, requires_grad=x_grad)
    idx = torch.tensor([[0, 1], [2, 4], [1, 0], [4, 2]]).repeat(n // 4, 1)  # experts 3, 5-7 idle
    w = torch.softmax(torch.randn(n, 2), -1).requires_grad_()
    params = list(m.lora.parameters()) if m.lora is not None else []
    y = m(x, idx, w)
    wrt = ([x] if x_grad else []) + [w, *params]
    return (y, *torch.autograd.grad(y.square().sum(), wrt))


@pytest.fixture(params=["torch", "onednn"])
def gemm(request, monkeypatch):
    """The CPU GEMM backend, and the tolerance against the autograd loop (torch's GEMMs)."""
    monkeypatch.setattr(cpu_gemm, "BACKEND", request.param)
    monkeypatch.setattr(cpu_gemm, "MIN_MACS", 0)  # these shapes are tiny
    return {"atol": 0, "rtol": 0} if request.param == "torch" else {"atol": 1e-5, "rtol": 1e-5}


def _autograd_loop(m, monkeypatch, **kw):
    with monkeypatch.context() as mp:
        mp.setattr(cpu_gemm, "BACKEND", "torch")  # F.linear is torch's either way; keep it plain
        return _run(m, False, mp, **kw)


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("store", [False, True])
def test_same_output_and_gradients_as_the_autograd_loop(lora, store, gemm, monkeypatch):
    m = _experts(lora, store)
    want = _autograd_loop(m, monkeypatch)
    got = _run(m, True, monkeypatch)
    assert len(got) == len(want) == 3 + 4 * lora
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **gemm)
    if lora:  # idle experts get exactly zero factor gradients
        for g in got[3:]:
            assert g[[3, 5, 6, 7]].abs().max() == 0 and g[[0, 1, 2, 4]].abs().max() > 0


def test_store_dequantised_once_forward_once_backward(monkeypatch):
    m = _experts(lora=True, store=True)
    _run(m, True, monkeypatch)
    assert m.down_proj.calls == m.gate_up_proj.calls == 2 * 4  # 4 experts with rows


def test_no_input_gradient_when_none_is_wanted(gemm, monkeypatch):
    m = _experts(lora=True)
    want = _autograd_loop(m, monkeypatch, x_grad=False)
    got = _run(m, True, monkeypatch, x_grad=False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **gemm)


def test_which_path_a_forward_takes():
    m = _experts(lora=True)
    x = torch.randn(4, H)
    assert m._loop_ok(x)
    assert not m._loop_ok(x.double())  # another dtype than the weights: the autograd loop
    m.lora.dropout = nn.Dropout(0.1)
    assert not m._loop_ok(x)  # dropout on the LoRA input: the autograd loop
    m.lora.dropout = nn.Identity()
    m.gate_up_proj.requires_grad_()
    assert not m._loop_ok(x)  # a trainable base weight: the autograd loop
    m.gate_up_proj.requires_grad_(False)
    m.act_fn, m._silu = nn.GELU(), False
    assert not m._loop_ok(x)


def test_expert_loop_direct_call_matches_dense_reference():
    """ExpertLoop alone, against the formula written with plain tensor ops and autograd (fp64)."""
    torch.manual_seed(2)
    w1, w2 = torch.randn(2, 2 * FF, H, dtype=torch.float64), torch.randn(2, H, FF, dtype=torch.float64)
    a1, b1 = torch.randn(2, R, H, dtype=torch.float64), torch.randn(2, 2 * FF, R, dtype=torch.float64)
    a2, b2 = torch.randn(2, R, FF, dtype=torch.float64), torch.randn(2, H, R, dtype=torch.float64)
    x = torch.randn(5, H, dtype=torch.float64)
    counts, s = [2, 3], 0.5

    def weight(name, e):
        return (w1 if name == "gate_up" else w2)[e]

    def reference(x, a1, b1, a2, b2):
        ys = []
        for e, xe in enumerate(x.split(counts)):
            h = xe @ w1[e].T + s * (xe @ a1[e].T) @ b1[e].T
            g, u = h.chunk(2, -1)
            a = nn.functional.silu(g) * u
            ys.append(a @ w2[e].T + s * (a @ a2[e].T) @ b2[e].T)
        return torch.cat(ys)

    inputs = [t.requires_grad_() for t in (x, a1, b1, a2, b2)]
    dy = torch.randn(5, H, dtype=torch.float64)
    y = ExpertLoop.apply(*inputs, weight, counts, s)
    torch.testing.assert_close(y, reference(*inputs))
    got, want = (torch.autograd.grad(out, inputs, dy) for out in (y, reference(*inputs)))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-10)
