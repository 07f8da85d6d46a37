"""Router: aux loss against a hand computation and transformers, statistics, freezing."""

import math

import pytest
import torch
import transformers as tf
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from greentune.errors import UserError
from greentune.moe import replace_experts_
from greentune.moe.router import RouterMonitor, find_routers, load_balancing_loss, set_router_trainable_


def test_aux_loss_hand_computation():
    # 4 rows, E=3, k=1; the softmax of these logits is known in closed form
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]))
    # top-1: experts 0, 0, 1, 2 -> f = [2/4, 1/4, 1/4]; P = column means of the probabilities
    f = [0.5, 0.25, 0.25]
    P = [1.6 / 4, 1.5 / 4, 0.9 / 4]
    expected = 3 * sum(a * b for a, b in zip(f, P))
    assert expected == pytest.approx(1.05)  # 3 · (0.5·0.4 + 0.25·0.375 + 0.25·0.225)
    assert load_balancing_loss([logits], num_experts=3, top_k=1).item() == pytest.approx(expected, abs=1e-6)


def test_aux_loss_matches_transformers_with_and_without_mask():
    layers = tuple(torch.randn(2 * 7, 8) for _ in range(3))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    for m in (None, mask):
        ref = load_balancing_loss_func(layers, 8, 2, m)
        ours = load_balancing_loss(list(layers), 8, 2, m)
        assert ours.item() == pytest.approx(ref.item(), abs=1e-6)


def test_uniform_probabilities_give_k():
    # P_e = 1/E for every e, and Σ_e f_e = k, so E · Σ f_e P_e = k whichever experts the ties pick
    logits = torch.zeros(8, 4)
    assert load_balancing_loss([logits], 4, 2).item() == pytest.approx(2.0, abs=1e-6)


def test_monitor_aux_loss_equals_transformers_model_loss(tiny_mixtral_dir):
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir, dtype=torch.float32)
    replace_experts_(model)
    mon = RouterMonitor(model, aux_loss_coef=0.02)
    assert [n for n, _ in find_routers(model)] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    out = model(ids, labels=ids, output_router_logits=True)
    ref = load_balancing_loss_func(out.router_logits, 4, 2, None)
    aux = mon.pop_aux_loss()
    assert aux.item() == pytest.approx(0.02 * ref.item(), abs=1e-7)
    aux.backward()  # gradient flows (into the hidden states and, if trainable, the router)
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    mon.close()


def test_expert_statistics(tiny_mixtral_dir):
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir, dtype=torch.float32)
    replace_experts_(model)
    mon = RouterMonitor(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    with torch.no_grad():
        for _ in range(2):  # two micro-batches in one step
            out = model(ids, output_router_logits=True)
            assert mon.pop_aux_loss().item() == 0.0
    stats = mon.pop_stats()
    assert set(stats) == {"expert_use", "expert_entropy"} and set(stats["expert_use"]) == {"0", "1"}
    for layer, logits in zip(("0", "1"), out.router_logits):
        top = torch.topk(logits, 2, dim=-1).indices.reshape(-1)
        expected = (torch.bincount(top, minlength=4).float() / top.numel()).tolist()
        assert stats["expert_use"][layer] == pytest.approx(expected, abs=1e-6)
        ent = -sum(p * math.log(p) for p in expected if p > 0)
        assert stats["expert_entropy"][layer] == pytest.approx(ent, abs=1e-5)
        assert 0 <= ent <= math.log(4)
    assert mon.pop_stats() == {"expert_use": {}, "expert_entropy": {}}
    mon.close()
    model(ids)
    assert mon.pop_stats() == {"expert_use": {}, "expert_entropy": {}}


def test_router_frozen_or_trainable(tiny_mixtral_dir, tiny_llama_dir):
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir, dtype=torch.float32)
    assert set_router_trainable_(model, False) == 2 * 4 * 64
    assert not model.model.layers[0].mlp.gate.weight.requires_grad
    assert set_router_trainable_(model, True) == 512
    assert model.model.layers[1].mlp.gate.weight.requires_grad
    dense = tf.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with pytest.raises(UserError, match="no MoE router"):
        set_router_trainable_(dense, True)


def test_trained_router_and_expert_lora_round_trip_through_peft(tiny_mixtral_dir, tmp_path):
    """A trained router saved as PEFT's modules_to_save, plus expert LoRA: PEFT gives our logits."""
    import json

    from peft import PeftModel
    from safetensors.torch import save_file

    from greentune.adapters.expert_lora import add_expert_lora_, expert_lora_state_dict, target_parameters
    from greentune.moe.router import load_router_state_dict, router_modules_to_save, router_state_dict

    load = lambda: tf.AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir, dtype=torch.float32)  # noqa: E731
    ours = load()
    replace_experts_(ours)
    add_expert_lora_(ours, r=2, alpha=4)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if ".lora." in n or n.endswith("mlp.gate.weight"):
                p.normal_(0, 0.1)
    assert router_modules_to_save(ours) == ["mlp.gate"]
    sd = {**expert_lora_state_dict(ours), **router_state_dict(ours)}
    assert "base_model.model.model.layers.1.mlp.gate.weight" in sd
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file(sd, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": 2,
                "lora_alpha": 4,
                "lora_dropout": 0.0,
                "target_modules": [],
                "target_parameters": target_parameters(ours),
                "modules_to_save": router_modules_to_save(ours),
            }
        )
    )
    peft_model = PeftModel.from_pretrained(load(), folder)
    ids = torch.randint(0, ours.config.vocab_size, (2, 16))
    torch.testing.assert_close(peft_model(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)
    fresh = load()
    assert load_router_state_dict(fresh, sd) == 2
    torch.testing.assert_close(fresh.model.layers[1].mlp.gate.weight, ours.model.layers[1].mlp.gate.weight)
    del sd["base_model.model.model.layers.0.mlp.gate.weight"]
    with pytest.raises(UserError, match="no router tensor"):
        load_router_state_dict(fresh, sd)


def test_statistics_count_once_with_activation_checkpointing(tiny_mixtral_dir):
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_mixtral_dir, dtype=torch.float32)
    replace_experts_(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    mon = RouterMonitor(model, aux_loss_coef=0.01)
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    (model(ids, labels=ids).loss + mon.pop_aux_loss()).backward()
    counts = mon._counts[0]
    assert counts.sum().item() == 2 * 10 * 2  # rows × k, not doubled by the recompute
    assert all(not x for x in mon._indices)
