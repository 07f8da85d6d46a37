"""DeepSeek-V3 and GLM-4.5 (sigmoid, bias-corrected, group-limited routers) through greentune's
expert path, against transformers' own eager model with the same adapter loaded by PEFT.

Per family, fp32 on the CPU: LoRA on [attn, experts] (MLA's q_a/q_b/kv_a/kv_b/o for
DeepSeek), `SparseExperts` in place of the fused experts, adapter factors random, and
the correction bias random so that it changes which experts run. The logits, the gradient
of every LoRA factor and the gradient of the input embeddings equal PEFT's on the
transformers model; the router statistics count the experts the router chose; the balance
loss is the normalised-sigmoid one (k at uniform routing) and trains the router.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf

from greentune.adapters.lora import apply_lora, lora_modules
from greentune.adapters.peft_format import lora_state_dict, save_adapter
from greentune.moe import RouterMonitor, prepare_moe_, sparse_experts
from greentune.moe.router_grouped import is_sigmoid_router, sigmoid_balancing_loss

V, H = 128, 64


def _prepare_with_expert_lora(model, **kw):
    """`prepare_moe_` with expert LoRA r4 alpha 8 on every experts module (as attach_adapters does)."""
    from greentune.adapters.expert_lora import add_expert_lora_

    monitor = prepare_moe_(model, lora_on_experts=True, **kw)
    add_expert_lora_(model, 4, 8.0, 0.0)
    return monitor


def _config(model_type: str):
    common = dict(
        vocab_size=V,
        hidden_size=H,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        max_position_embeddings=64,
    )
    if model_type == "deepseek_v3":
        return tf.DeepseekV3Config(
            **common,
            num_key_value_heads=4,
            n_group=2,
            topk_group=1,
            q_lora_rank=32,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
        )
    return tf.Glm4MoeConfig(
        **common,
        num_key_value_heads=2,
        head_dim=16,
        n_group=2,
        topk_group=1,
        attention_bias=True,
        use_qk_norm=True,
    )


@pytest.fixture(scope="module", params=["deepseek_v3", "glm4_moe"])
def family_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(_config(request.param), dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    out = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(out)
    return out


def _load(path):
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager")


def _ours(path):
    model = _load(path)
    wrapped = apply_lora(model, ["attn"], rank=4, alpha=8)
    monitor = _prepare_with_expert_lora(model, router="frozen")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model, wrapped, monitor


def _backward(model, ids):
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, labels=ids)
    out.loss.backward()
    return out.logits.detach(), embeds.grad


def test_forward_and_gradients_match_transformers_with_peft(family_dir, tmp_path):
    from peft import PeftModel

    ours, wrapped, monitor = _ours(family_dir)
    mt = ours.config.model_type
    leaves = {n.rsplit(".", 1)[-1] for n in wrapped}
    if mt == "deepseek_v3":
        assert leaves == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
    else:
        assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert len(sparse_experts(ours)) == 2  # layer 0 is dense (first_k_dense_replace)
    save_adapter(ours, tmp_path / "adapter", 4, 8.0, 0.0, str(family_dir))
    peft_model = PeftModel.from_pretrained(_load(family_dir), tmp_path / "adapter", is_trainable=True)

    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(3))
    logits, d_embeds = _backward(ours, ids)
    ref_logits, ref_d_embeds = _backward(peft_model, ids)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(d_embeds, ref_d_embeds, atol=1e-6, rtol=1e-4)

    # our factor gradients in PEFT's layout: the same (linear) map lora_state_dict applies to the factors
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.copy_(p.grad)
    grads = lora_state_dict(ours)
    ref = {n.replace(".default", ""): p.grad for n, p in peft_model.named_parameters() if "lora_" in n}
    assert grads.keys() == ref.keys()
    assert len(grads) == 2 * len(lora_modules(ours)) + 2 * 2 * 2  # + (gate_up, down) × (A, B) × 2 layers
    for k in ref:
        torch.testing.assert_close(grads[k], ref[k], atol=1e-6, rtol=1e-4, msg=k)
        assert ref[k].abs().sum() > 0, k

    stats = monitor.pop_stats()
    assert sorted(stats["expert_use"]) == ["1", "2"]
    for use in stats["expert_use"].values():
        assert math.isclose(sum(use), 1.0, abs_tol=1e-5)
    monitor.close()


def test_statistics_count_the_routers_choice(family_dir):
    """The router's bias and groups decide; the statistics count exactly those choices."""
    model = _load(family_dir)
    monitor = RouterMonitor(model)
    assert monitor.sigmoid and is_sigmoid_router(model.model.layers[1].mlp.gate)
    chosen = []
    hook = model.model.layers[1].mlp.gate.register_forward_hook(lambda m, i, o: chosen.append(o[2]))
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model(ids)
    hook.remove()
    counts = torch.bincount(chosen[0].reshape(-1), minlength=4).float()
    want = (counts / counts.sum()).tolist()
    got = monitor.pop_stats()["expert_use"]["1"]
    assert got == pytest.approx(want, abs=1e-6)
    gate = model.model.layers[1].mlp.gate
    if gate.num_group > gate.topk_group:  # group-limited: every token's experts from one group
        per_group = gate.num_experts // gate.num_group
        assert bool(((chosen[0] // per_group) == (chosen[0][:, :1] // per_group)).all())
    monitor.close()


def test_balance_loss_is_k_when_uniform_and_trains_the_router(family_dir):
    n, e, k = 8, 4, 2
    uniform = torch.zeros(n, e)
    round_robin = torch.stack([torch.arange(k) + 2 * (i % 2) for i in range(n)])  # each expert n·k/E times
    assert float(sigmoid_balancing_loss([uniform], [round_robin], e)) == pytest.approx(k)
    skewed = torch.zeros(n, k, dtype=torch.long) + torch.arange(k)  # always experts 0 and 1
    logits = torch.tensor([[3.0, 3.0, -3.0, -3.0]]).repeat(n, 1)
    assert float(sigmoid_balancing_loss([logits], [skewed], e)) > k  # imbalance costs more
    mask = torch.tensor([[1] * 4 + [0] * 4])
    padded = torch.cat([logits[:4], torch.zeros(4, e)])
    assert float(sigmoid_balancing_loss([padded], [skewed], e, mask)) == pytest.approx(
        float(sigmoid_balancing_loss([logits[:4]], [skewed[:4]], e))
    )

    model = _load(family_dir)
    prepare_moe_(model, router="full", aux_loss_coef=0.01)
    monitor = RouterMonitor(model, aux_loss_coef=0.01)
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(5))
    model(ids)
    loss = monitor.pop_aux_loss()
    assert 0 < float(loss.detach()) < 0.01 * e * k  # f sums to k, P to 1
    loss.backward()
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
    monitor.close()
