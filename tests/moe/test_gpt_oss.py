"""gpt-oss experts in greentune's sparse path against transformers' own GptOssExperts, fp32 on CPU:
the same logits, and gradients (input and expert LoRA) equal to those transformers' backward
gives for the merged weights; clamped SwiGLU active (small swiglu_limit), router with bias."""

from __future__ import annotations

import copy

import pytest
import torch

tf = pytest.importorskip("transformers")


def _prepare(model, lora, **kw):
    """`prepare_moe_` and, given `lora` = (rank, alpha, dropout), expert LoRA (as attach_adapters does)."""
    from greentune.adapters.expert_lora import add_expert_lora_
    from greentune.moe.prepare import prepare_moe_

    monitor = prepare_moe_(model, lora_on_experts=lora is not None, **kw)
    if lora is not None:
        add_expert_lora_(model, *lora)
    return monitor


def _close(got, want, rel=1e-5):
    """Equal within fp32 rounding of their magnitude: max |Δ| ≤ rel · max |want|."""
    assert (got - want).abs().max() <= rel * want.abs().max(), ((got - want).abs().max(), want.abs().max())


def _tiny(seed=0):
    cfg = tf.GptOssConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=4,
        max_position_embeddings=64,
        swiglu_limit=0.5,  # clamps bite: gradients through the clamp are checked too
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(seed)
    m = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "bias" in n or "sinks" in n:
                p.normal_(0, 0.5)
            elif p.dim() > 1:
                p.normal_(0, 0.3)
    return m


def test_forward_and_gradients_match_transformers():
    from greentune.moe.gpt_oss import GptOssSparseExperts

    ours = _tiny()
    ref = copy.deepcopy(ours)
    monitor = _prepare(ours, (4, 8.0, 0.0))
    experts = [m for m in ours.modules() if isinstance(m, GptOssSparseExperts)]
    assert len(experts) == 2 and len(monitor.routers) == 2
    torch.manual_seed(1)
    with torch.no_grad():
        for m in experts:
            m.lora.B_gate_up.normal_(0, 0.2)
            m.lora.B_down.normal_(0, 0.2)
            # the reference carries the LoRA merged: W_e^T += s · (B_e A_e)^T in HF's [E, in, out]
            layer = int(next(n for n, x in ours.named_modules() if x is m).split(".")[2])
            hf = ref.model.layers[layer].mlp.experts
            for name, attr in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
                delta = torch.stack([m.lora.delta(name, e) for e in range(m.num_experts)])
                getattr(hf, attr).add_(delta.transpose(1, 2))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    emb_o = ours.model.embed_tokens(ids).detach().requires_grad_(True)
    emb_r = emb_o.detach().clone().requires_grad_(True)
    for p in ref.parameters():
        p.requires_grad_(False)
    for m in ref.model.layers:
        m.mlp.experts.gate_up_proj.requires_grad_(True)
        m.mlp.experts.down_proj.requires_grad_(True)
    lo, lr = ours(inputs_embeds=emb_o).logits, ref(inputs_embeds=emb_r).logits
    torch.testing.assert_close(lo, lr, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(lo)
    (lo * w).sum().backward()
    (lr * w).sum().backward()
    _close(emb_o.grad, emb_r.grad)
    for m in experts:
        layer = int(next(n for n, x in ours.named_modules() if x is m).split(".")[2])
        hf = ref.model.layers[layer].mlp.experts
        for name, attr in (("gate_up", "gate_up_proj"), ("down", "down_proj")):
            g_w = getattr(hf, attr).grad.transpose(1, 2)  # dL/dW_e in [out, in]
            a, b = m.lora.factors(name)
            s = m.lora.scale
            _close(b.grad, s * g_w @ a.detach().transpose(1, 2))
            _close(a.grad, s * b.detach().transpose(1, 2) @ g_w)
            assert b.grad.abs().max() > 0


@pytest.mark.parametrize("fmt", ["mxfp4", "q8_0"])
def test_quantised_experts_store_runs_and_dequantises_to_hf_layout(fmt):
    from greentune.quant.dequantize import dequantize_model_
    from greentune.quant.experts import QuantExperts3D
    from greentune.quant.replace import quantize_model_

    ours = _tiny()
    counts = quantize_model_(ours, fmt)
    assert counts["experts"] == 4
    store = ours.model.layers[0].mlp.experts.gate_up_proj
    assert isinstance(store, QuantExperts3D) and store.shape == (4, 64, 32) and store.fmt.name == fmt
    if fmt == "mxfp4":  # experts only: the attention stays in Q8_0
        assert ours.model.layers[0].self_attn.q_proj.fmt.name == "q8_0"
    _prepare(ours, (4, 8.0, 0.0))
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        got = ours(ids).logits
    packed = dequantize_model_(ours)
    assert packed["model.layers.0.mlp.experts.gate_up_proj"][1].shape == store.qweight.shape
    ref = _tiny()
    sd = {k: v for k, v in ours.state_dict().items() if "lora" not in k}
    assert sd["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 32, 64)  # HF's [E, in, out]
    ref.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(got, ref(ids).logits, rtol=1e-5, atol=1e-5)


EXPERT_PARAMS = ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]


def test_expert_lora_is_peft_target_parameters_layout():
    """PEFT's ParamWrapper on gpt-oss's transposed experts and greentune's expert LoRA, given the
    same tensors (PEFT's saved state dict), compute the same logits."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from greentune.adapters.expert_lora import (
        expert_lora_state_dict,
        load_expert_lora_state_dict,
        target_parameters,
    )

    ours = _tiny()
    peft_model = get_peft_model(
        copy.deepcopy(ours),
        LoraConfig(r=2, lora_alpha=6, target_modules=[], target_parameters=EXPERT_PARAMS),
    )
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    _prepare(ours, (2, 6.0, 0.0))
    assert target_parameters(ours) == EXPERT_PARAMS
    sd = {f"base_model.model.{k}": v for k, v in get_peft_model_state_dict(peft_model).items()}
    sd = {k.replace("base_model.model.base_model.model.", "base_model.model."): v for k, v in sd.items()}
    assert load_expert_lora_state_dict(ours, sd) == 8
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        _close(ours(ids).logits, peft_model(ids).logits)
    for k, v in expert_lora_state_dict(ours).items():
        assert torch.equal(v, sd[k]), k


def test_router_monitor_aux_loss_equals_transformers():
    """gpt-oss's router (`mlp.router`, with bias; softmax over its top-k) is found, and the
    monitor's load-balancing loss is transformers' own `load_balancing_loss_func`."""
    from transformers.models.gpt_oss.modeling_gpt_oss import load_balancing_loss_func

    ours = _tiny()
    ref = copy.deepcopy(ours)
    monitor = _prepare(ours, None, router="full", aux_loss_coef=1.0)
    assert [n for n, _ in monitor.routers] == ["model.layers.0.mlp.router", "model.layers.1.mlp.router"]
    assert ours.model.layers[0].mlp.router.bias.requires_grad
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    ours(ids)
    got = monitor.pop_aux_loss()
    out = ref(ids, output_router_logits=True)
    want = load_balancing_loss_func(out.router_logits, 4, 2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    stats = monitor.pop_stats()
    assert set(stats["expert_use"]) == {"0", "1"}
