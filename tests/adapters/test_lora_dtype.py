"""LoRA factors are fp32 masters whatever the base computes in (bf16 on a GPU), as PEFT's default.

bf16 factors would drop every AdamW update smaller than 2^-8 of the weight. Run on CPU in
bf16 with a tiny model (slow bf16 units do not matter at this size)."""

import torch
from torch import nn

from greentune.adapters.expert_lora import add_expert_lora_
from greentune.adapters.lora import LoRALinear, apply_lora
from greentune.moe import replace_experts_, sparse_experts


def test_lora_on_a_bf16_base_keeps_fp32_factors_and_gets_fp32_gradients():
    base = nn.Linear(32, 48, bias=False).to(torch.bfloat16)
    layer = LoRALinear(base, rank=4, alpha=8)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = (x.float() @ base.weight.float().t()) + (x.float() @ layer.lora_A.t() @ layer.lora_B.t()) * 2
    assert ((y.float() - expected).norm() / expected.norm()).item() < 2e-2
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
    assert base.weight.grad is None


def test_an_update_below_bf16_resolution_survives_in_the_master():
    layer = LoRALinear(nn.Linear(8, 8, bias=False).to(torch.bfloat16), rank=2, alpha=2)
    with torch.no_grad():
        layer.lora_A.fill_(1.0)
        layer.lora_A.add_(1e-4)  # lost in bf16 (resolution 2^-7 at 1.0), kept in fp32
    assert torch.all(layer.lora_A != 1.0)
    layer.fuse_()  # B = 0: the base is unchanged, and fusing works across dtypes
    assert layer.base.weight.dtype == torch.bfloat16


def test_expert_lora_on_a_bf16_moe_keeps_fp32_factors(tiny_mixtral_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir, dtype=torch.bfloat16)
    replace_experts_(model)
    apply_lora(model, ["attn"], rank=4, alpha=8)
    add_expert_lora_(model, r=4, alpha=8)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    for _, m in sparse_experts(model):
        with torch.no_grad():
            m.lora.B_gate_up.normal_(std=0.02)
            m.lora.B_down.normal_(std=0.02)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in trainable.items()}
    assert all(g is not None and g.dtype == torch.float32 for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if ".A_" in n or ".B_" in n)
