"""The Triton kernels against the plain-torch reference, on the CPU under Triton's interpreter.

Run by `test_triton_kernels.py` in a child pytest process with ``TRITON_INTERPRET=1`` set before
triton defines any kernel (not collected on its own: the name does not start with ``test_``).
Shapes are tiny (the interpreter runs each program in numpy): the K-quants' 256-weight blocks
need rows of 256 or 512.
"""

import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run through test_triton_kernels.py"
triton = pytest.importorskip("triton", reason="triton is not installed")

from greentune.adapters.expert_lora import ExpertLoRA  # noqa: E402
from greentune.moe import experts as moe_experts  # noqa: E402
from greentune.moe.experts import SparseExperts  # noqa: E402
from greentune.quant import triton_dequant, triton_dispatch, triton_matmul  # noqa: E402
from greentune.quant.experts import QuantExperts3D  # noqa: E402
from greentune.quant.formats import get_format  # noqa: E402
from greentune.quant.linear import QuantLinear  # noqa: E402

FORMATS = ["q8_0", "q4_0", "q4_k", "q6_k", "nf4"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _weights(*shape, seed=0):
    """Gaussian weights with a spread of row scales (blocks with small and large scales)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-3, 0, shape[-2]).reshape(-1, 1)
    return torch.randn(*shape, generator=g) * scale


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", FORMATS)
def test_dequantize_is_bit_exact(name, dtype):
    fmt = get_format(name)
    w = _weights(6, 512, seed=1)
    w[0, : fmt.block_size] = 0  # an all-zero block
    q = fmt.quantize(w)
    want = fmt.dequantize(q, w.shape).to(dtype)
    got = triton_dequant.dequantize(fmt, q, w.shape, dtype)
    assert got.dtype == dtype and got.shape == w.shape
    assert torch.equal(got.view(_BITS[dtype]), want.view(_BITS[dtype])), (
        f"{(got != want).sum().item()} of {want.numel()} values differ"
    )


def test_dequantize_writes_into_the_given_buffer():
    fmt = get_format("q4_k")
    w = _weights(3, 256)
    q = fmt.quantize(w)
    buf = torch.full((3 * 256 + 100,), float("nan"))
    got = triton_dequant.dequantize(fmt, q, w.shape, torch.float32, out=buf)
    assert got.data_ptr() == buf.data_ptr()
    assert torch.equal(buf[:768].view(3, 256), fmt.dequantize(q, w.shape))
    assert buf[768:].isnan().all()  # nothing written past the weight
    with pytest.raises(ValueError):
        triton_dequant.dequantize(fmt, q, w.shape, torch.bfloat16, out=buf)


def _close(got, want, rtol):
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3g} vs max |value| {scale:.3g}"


@pytest.mark.parametrize("name", FORMATS)
def test_fused_linear_forward_and_input_grad(name):
    fmt = get_format(name)
    N, K = 40, 512  # N: not a multiple of any tile
    q = fmt.quantize(_weights(N, K, seed=2))
    W = fmt.dequantize(q, (N, K))
    x = torch.randn(3, 7, K)
    dy = torch.randn(3, 7, N)
    _close(triton_matmul.linear_forward(x, fmt, q, N, K), x @ W.T, 1e-5)
    _close(triton_matmul.linear_input_grad(dy, fmt, q, N, K), dy @ W, 1e-5)


def test_fused_linear_in_bf16_matches_the_bf16_weight():
    fmt = get_format("q4_k")
    N, K = 48, 256
    q = fmt.quantize(_weights(N, K, seed=3))
    W = fmt.dequantize(q, (N, K)).to(torch.bfloat16).float()  # the weight the GEMM multiplies
    x = torch.randn(20, K).to(torch.bfloat16)
    y = triton_matmul.linear_forward(x, fmt, q, N, K)
    assert y.dtype == torch.bfloat16
    _close(y, x.float() @ W.T, 1e-2)  # bf16 output rounding


@pytest.mark.parametrize("name", ["q8_0", "q4_k", "nf4"])
def test_grouped_gemm_with_empty_experts(name):
    fmt = get_format(name)
    E, N, K = 4, 40, 256
    q = fmt.quantize(_weights(E, N, K, seed=4))
    W = fmt.dequantize(q, (E, N, K))
    counts = [0, 37, 0, 5]  # empty first and third experts; 37 > one row tile
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x, dy = torch.randn(sum(counts), K), torch.randn(sum(counts), N)
    groups = [(e, slice(int(offs[e]) - c, int(offs[e]))) for e, c in enumerate(counts) if c]
    want_y = torch.cat([x[sl] @ W[e].T for e, sl in groups])
    want_dx = torch.cat([dy[sl] @ W[e] for e, sl in groups])
    _close(triton_matmul.grouped_forward(x, fmt, q, offs, N, K), want_y, 1e-5)
    _close(triton_matmul.grouped_input_grad(dy, fmt, q, offs, N, K), want_dx, 1e-5)
    none = torch.zeros(E, dtype=torch.int32)  # no rows at all
    assert triton_matmul.grouped_forward(x[:0], fmt, q, none, N, K).shape == (0, N)


def test_selection_and_its_override(monkeypatch):
    monkeypatch.delenv(triton_dispatch.ENV, raising=False)
    assert triton_dispatch.choose(triton_dispatch.FUSED_MAX_ROWS) == "fused"
    assert triton_dispatch.choose(triton_dispatch.FUSED_MAX_ROWS + 1) == "dequant"
    fmt = get_format("q4_k")
    assert not triton_dispatch.enabled(torch.device("cpu"), fmt)  # auto: never on the CPU
    monkeypatch.setenv(triton_dispatch.ENV, "fused")
    assert triton_dispatch.choose(10**6) == "fused"
    assert triton_dispatch.enabled(torch.device("cpu"), fmt)  # forced, interpreted
    assert not triton_dispatch.enabled(torch.device("cpu"), get_format("nf4_dq"))
    monkeypatch.setenv(triton_dispatch.ENV, "dequant")
    assert triton_dispatch.choose(1) == "dequant"
    monkeypatch.setenv(triton_dispatch.ENV, "never")
    assert not triton_dispatch.enabled(torch.device("cpu"), fmt)


def _linear_run(layer, x):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    return y.detach(), x.grad


@pytest.mark.parametrize("path", ["fused", "dequant"])
def test_quant_linear_dispatches_to_the_kernels(monkeypatch, path):
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(256, 24), "q4_k")
    x = torch.randn(2, 3, 256)
    monkeypatch.setenv(triton_dispatch.ENV, "never")
    want = _linear_run(layer, x)
    calls = []
    for fn in ("linear_forward", "linear_input_grad"):
        orig = getattr(triton_matmul, fn)
        monkeypatch.setattr(triton_matmul, fn, lambda *a, _o=orig, _n=fn: calls.append(_n) or _o(*a))
    orig_dq = triton_dequant.dequantize
    monkeypatch.setattr(
        triton_dequant, "dequantize", lambda *a, **k: calls.append("dequantize") or orig_dq(*a, **k)
    )
    monkeypatch.setenv(triton_dispatch.ENV, path)
    got = _linear_run(layer, x)
    assert calls == (["linear_forward", "linear_input_grad"] if path == "fused" else ["dequantize"] * 2)
    for g, w in zip(got, want):
        _close(g, w, 1e-5)


def _experts_run(se, hidden, idx, wts):
    h = hidden.clone().requires_grad_(True)
    out = se(h, idx, wts)
    out.square().sum().backward()
    grads = [h.grad] + [p.grad.clone() for p in se.lora.parameters()]
    for p in se.lora.parameters():
        p.grad = None
    return [out.detach()] + grads


@pytest.mark.parametrize("path", ["fused", "dequant"])
def test_sparse_experts_grouped_path_with_quantised_experts(monkeypatch, path):
    torch.manual_seed(0)
    E, H, FF = 4, 64, 32
    gate_up, down = torch.randn(E, 2 * FF, H) * 0.1, torch.randn(E, H, FF) * 0.1
    se = SparseExperts(gate_up.clone(), down.clone(), torch.nn.SiLU())
    se.set_weight_store_("gate_up", QuantExperts3D.from_tensor(gate_up, "q8_0"))
    se.set_weight_store_("down", QuantExperts3D.from_tensor(down, "q8_0"))
    se.lora = ExpertLoRA(E, H, FF, r=4, alpha=8)
    with torch.no_grad():
        for p in se.lora.parameters():
            p.normal_(0, 0.1)  # B nonzero: the LoRA path counts
    hidden = torch.randn(9, H)
    idx = torch.tensor([[0, 3]] * 4 + [[3, 2]] * 5)  # expert 1 gets no token
    wts = torch.rand(9, 2)
    monkeypatch.setattr(moe_experts, "GROUPED_MM", "always")  # the CPU's grouped_mm stands in for CUDA's
    monkeypatch.setenv(triton_dispatch.ENV, "never")
    assert not se._grouped_ok(hidden)  # without kernels: the per-expert loop
    want = _experts_run(se, hidden, idx, wts)
    monkeypatch.setenv(triton_dispatch.ENV, path)
    assert se._grouped_ok(hidden)
    got = _experts_run(se, hidden, idx, wts)
    for g, w in zip(got, want):
        _close(g, w, 1e-5)
