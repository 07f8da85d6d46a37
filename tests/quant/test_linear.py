"""QuantLinear, QuantExperts3D and quantize_model_ on tiny models."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from greentune.models.tiny import tiny_config
from greentune.quant import QuantExperts3D, QuantLinear, get_format, quantize_model_


def _linear(inp=512, out=96, bias=True):
    lin = nn.Linear(inp, out, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
    return lin


def test_forward_backward_equal_dense_on_dequantized():
    lin = _linear()
    q = QuantLinear.from_linear(lin, "q4_k")
    assert (q.in_features, q.out_features, q.fmt.name) == (512, 96, "q4_k")
    assert q.qweight.dtype == torch.uint8 and tuple(q.qweight.shape) == (96, 512 // 256 * 144)
    assert q.raw_bytes().numel() * 8 / (96 * 512) == 4.5
    W = q.dequantize()
    assert torch.equal(W, get_format("q4_k").dequantize(get_format("q4_k").quantize(lin.weight), (96, 512)))
    x = torch.randn(3, 5, 512, requires_grad=True)
    y = q(x)
    assert torch.equal(y, F.linear(x, W) + lin.bias)
    g = torch.randn_like(y)
    y.backward(g)
    x2 = x.detach().clone().requires_grad_(True)
    (F.linear(x2, W) + lin.bias).backward(g)
    assert torch.allclose(x.grad, x2.grad, rtol=1e-6, atol=1e-6)
    assert q.qweight.grad is None and not q.bias.requires_grad


def test_backward_keeps_only_packed_weight():
    """The autograd graph saves the input, not a dequantised copy of the weight."""
    q = QuantLinear.from_linear(_linear(1024, 1024, bias=False), "q4_0")
    x = torch.randn(2, 1024, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        q(x).sum().backward()
    assert all(t.numel() < 1024 * 1024 for t in saved)


def test_bf16_input_computes_fp32_on_cpu():
    q = QuantLinear.from_linear(_linear(256, 32, bias=False), "q8_0")
    x = torch.randn(4, 256)
    y = q(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x.to(torch.bfloat16).float(), q.dequantize()).to(torch.bfloat16))


def test_add_merges_delta_within_quantisation_error():
    for fmt, tol in [("q8_0", 0.007), ("q4_k", 0.09), ("nf4", 0.11), ("nf4_dq", 0.11)]:
        q = QuantLinear.from_linear(_linear(512, 64, bias=False), fmt)
        before = q.dequantize()
        delta = torch.randn(64, 512) * 0.01
        q.add_(delta)
        after = q.dequantize()
        err = (after - (before + delta)).pow(2).mean().sqrt() / (before + delta).std()
        assert err < tol, (fmt, float(err))
        # the merge moved the weights by ~delta, far more than the re-quantisation error
        moved = ((after - before) - delta).pow(2).mean().sqrt() / delta.pow(2).mean().sqrt()
        assert moved < (0.25 if fmt == "q8_0" else 2.0)
        x = torch.randn(8, 512)
        assert torch.equal(q(x), F.linear(x, after))


def test_add_of_zero_is_idempotent_for_gguf_formats():
    """Re-quantising a dequantised Q8_0/Q4_0 tensor reproduces its bytes (a merge of 0 is a no-op)."""
    for fmt in ("q8_0", "q4_0"):
        q = QuantLinear.from_linear(_linear(256, 16, bias=False), fmt)
        b = q.qweight.clone()
        q.add_(torch.zeros(16, 256))
        assert torch.equal(q.qweight, b)


def test_fallback_for_rows_not_whole_blocks():
    q = QuantLinear.from_linear(_linear(96, 8), "q4_k")  # 96 % 256 != 0, % 32 == 0
    assert q.fmt.name == "q8_0" and tuple(q.qweight.shape) == (8, 3 * 34)
    q = QuantLinear.from_linear(_linear(50, 8), "q4_k")  # not even % 32
    assert q.fmt.name == "f32" and torch.equal(q.dequantize(), _linear_weight(q))


def _linear_weight(q):
    return q.qweight.view(torch.float32).reshape(q.out_features, q.in_features)


def test_experts_3d_per_expert():
    w = torch.randn(4, 64, 256) * 0.05
    ex = QuantExperts3D.from_tensor(w, "q4_k")
    fmt = get_format("q4_k")
    assert tuple(ex.raw_bytes().shape) == (4, 64, 144)
    for e in range(4):
        expected = fmt.dequantize(fmt.quantize(w[e]), (64, 256))
        assert torch.equal(ex.dequantize_expert(e), expected)
        assert torch.equal(ex[torch.tensor(e)], expected)
    assert torch.equal(ex.dequantize(), torch.stack([ex[e] for e in range(4)]))
    x = torch.randn(7, 256, requires_grad=True)
    y = ex.linear(x, 2)
    assert torch.equal(y, F.linear(x, ex[2]))
    y.sum().backward()
    assert torch.allclose(x.grad, ex[2].sum(0).expand(7, -1), atol=1e-5)
    before = ex.dequantize()
    delta = torch.randn(64, 256) * 0.01
    ex.add_(1, delta)
    after = ex.dequantize()
    assert torch.equal(after[[0, 2, 3]], before[[0, 2, 3]])
    assert (after[1] - before[1] - delta).pow(2).mean().sqrt() < 0.09 * before[1].std()
    # non-row-local format: packed per expert
    ex = QuantExperts3D.from_tensor(w, "nf4_dq")
    nf = get_format("nf4_dq")
    assert torch.equal(ex[3], nf.dequantize(nf.quantize(w[3]), (64, 256)))


def test_quantize_model_counts_and_outputs():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(
        tiny_config("mixtral", vocab_size=512, hidden=256, intermediate=256)
    )
    model.eval()
    model.set_experts_implementation("eager")
    ids = torch.randint(0, 500, (2, 16))
    reference = copy.deepcopy(model)
    n_dense = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    counts = quantize_model_(model, "q4_k", skip=("lm_head", "embed_tokens"))  # (see test_embedding.py)
    # 4 attention projections per layer; gate_up and down expert tensors per layer
    assert (counts["linear"], counts["experts"], counts["fallback"]) == (8, 4, 0)
    attn = 2 * (256 * 256 * 2 + 256 * 128 * 2)
    experts = 2 * (4 * 512 * 256 + 4 * 256 * 256)
    assert counts["params"] == attn + experts
    assert counts["packed_bytes"] * 8 == 4.5 * counts["params"]
    assert n_dense - counts["params"] == sum(
        p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n
    )
    assert isinstance(model.model.layers[0].mlp.experts.gate_up_proj, QuantExperts3D)
    assert isinstance(model.model.layers[1].self_attn.o_proj, QuantLinear)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    # The quantised model computes exactly what the dense model does with dequantised weights.
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, QuantLinear):
                reference.get_submodule(name).weight.copy_(module.dequantize())
            elif isinstance(module, QuantExperts3D):
                getattr(reference.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]).copy_(
                    module.dequantize()
                )
        out, ref = model(ids).logits, reference(ids).logits
    assert torch.allclose(out, ref, atol=1e-6, rtol=1e-5)
