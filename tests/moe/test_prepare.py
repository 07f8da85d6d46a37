"""prepare_moe_: what a recipe's moe keys do to a model."""

import pytest
import torch
import transformers as tf

from greentune.errors import UserError
from greentune.moe import SparseExperts, prepare_moe_


def test_prepare_mixtral_after_dense_lora(tiny_mixtral_dir):
    from greentune.adapters.attach import attach_adapters
    from greentune.recipe import LoraConfig, MoeConfig

    model = tf.AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir, dtype=torch.float32)
    lora, moe = (
        LoraConfig(rank=4, alpha=8, targets=["attn", "experts"]),
        MoeConfig(router="full", aux_loss_coef=0.01),
    )
    mon = attach_adapters(model, lora, moe).monitor
    assert isinstance(model.model.layers[0].mlp.experts, SparseExperts)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.layers.0.mlp.gate.weight" in trainable
    assert "model.layers.1.mlp.experts.lora.B_down" in trainable
    assert not any(n.endswith("gate_up_proj") for n in trainable)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    loss = model(ids, labels=ids).loss + mon.pop_aux_loss()
    loss.backward()
    assert model.model.layers[0].mlp.gate.weight.grad is not None
    assert set(mon.pop_stats()["expert_use"]) == {"0", "1"}


def test_prepare_dense(tiny_llama_dir):
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    assert prepare_moe_(model) is None
    with pytest.raises(UserError, match="no MoE experts"):
        prepare_moe_(model, lora_on_experts=True)
    with pytest.raises(UserError, match="moe.router"):
        prepare_moe_(model, router="lora")
