"""Expert LoRA: init, maths, fuse, and the round trip through PEFT's target_parameters layout."""

import copy
import json

import pytest
import torch
import transformers as tf
from safetensors.torch import save_file

from greentune.adapters.expert_lora import (
    add_expert_lora_,
    expert_lora_state_dict,
    fuse_expert_lora_,
    load_expert_lora_state_dict,
    target_parameters,
)
from greentune.errors import UserError
from greentune.moe import replace_experts_, sparse_experts


def _load(path):
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager")


def _ours(path, r=4, alpha=8, randomise=True):
    model = _load(path)
    replace_experts_(model)
    n = add_expert_lora_(model, r=r, alpha=alpha)
    if randomise:
        with torch.no_grad():
            for _, m in sparse_experts(model):
                for p in m.lora.parameters():
                    p.normal_(0, 0.1)
    return model, n


def test_trainable_parameter_count_and_zero_init(tiny_mixtral_dir):
    ref = _load(tiny_mixtral_dir)
    model, n = _ours(tiny_mixtral_dir, r=4, randomise=False)
    # per layer: E·r·(H + 2I) for gate_up and E·r·(I + H) for down; E=4, H=64, I=128, 2 layers
    assert n == 2 * 4 * 4 * ((64 + 256) + (128 + 64)) == 16384
    ids = torch.randint(0, ref.config.vocab_size, (2, 12))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)


def test_low_rank_term_equals_explicit_delta(tiny_mixtral_dir):
    """Applying LoRA to activations == running the experts with W + s·B·A built explicitly."""
    model, _ = _ours(tiny_mixtral_dir)
    merged = copy.deepcopy(model)
    assert fuse_expert_lora_(merged) == 2
    assert all(m.lora is None for _, m in sparse_experts(merged))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    torch.testing.assert_close(merged(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    assert (merged(ids).logits - _load(tiny_mixtral_dir)(ids).logits).abs().max() > 1e-3


def test_fuse_restart_keeps_parameters_and_zeroes_b(tiny_mixtral_dir):
    model, _ = _ours(tiny_mixtral_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    before = model(ids).logits
    m = sparse_experts(model)[0][1]
    a_id = id(m.lora.A_gate_up)
    fuse_expert_lora_(model, restart=True)
    assert id(m.lora.A_gate_up) == a_id and m.lora.B_gate_up.abs().sum() == 0
    assert m.lora.A_gate_up.abs().max() <= 1 / 64**0.5  # Kaiming-uniform bound 1/sqrt(H)
    torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=0)


def test_gradients_reach_lora_only_through_used_experts(tiny_mixtral_dir):
    model, _ = _ours(tiny_mixtral_dir)
    for n, p in model.named_parameters():
        p.requires_grad_(".lora." in n)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if ".lora." in n]
    assert len(grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in grads)


def _write_adapter(folder, sd, model, r, alpha):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": r,
                "lora_alpha": alpha,
                "lora_dropout": 0.0,
                "target_modules": [],
                "target_parameters": target_parameters(model),
                "bias": "none",
            }
        )
    )


def test_peft_loads_our_adapter_with_same_logits(tiny_mixtral_dir, tmp_path):
    from peft import PeftModel

    model, _ = _ours(tiny_mixtral_dir, r=4, alpha=8)
    sd = expert_lora_state_dict(model)
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in sd
    assert sd["base_model.model.model.layers.0.mlp.experts.lora_B.weight"].shape == (64, 16)
    _write_adapter(tmp_path / "adapter", sd, model, 4, 8)
    peft_model = PeftModel.from_pretrained(_load(tiny_mixtral_dir), tmp_path / "adapter")
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    torch.testing.assert_close(peft_model(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fixture", ["tiny_mixtral_dir", "tiny_qwen2_moe_dir"])
def test_we_load_a_peft_adapter_with_same_logits(fixture, request, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    path = request.getfixturevalue(fixture)
    ours, _ = _ours(path, r=2, alpha=6, randomise=False)
    cfg = LoraConfig(r=2, lora_alpha=6, target_modules=[], target_parameters=target_parameters(ours))
    peft_model = get_peft_model(_load(path), cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    sd = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sd.keys() == expert_lora_state_dict(ours).keys()
    assert load_expert_lora_state_dict(ours, sd) == 8
    ids = torch.randint(0, ours.config.vocab_size, (2, 16))
    torch.testing.assert_close(ours(ids).logits, peft_model(ids).logits, atol=1e-5, rtol=0)
    # and back: our state dict reproduces PEFT's tensors exactly
    for k, v in expert_lora_state_dict(ours).items():
        assert torch.equal(v, sd[k]), k


def test_load_rejects_missing_and_wrong_rank(tiny_mixtral_dir):
    model, _ = _ours(tiny_mixtral_dir, r=4)
    sd = expert_lora_state_dict(model)
    other, _ = _ours(tiny_mixtral_dir, r=2)
    with pytest.raises(UserError, match="rank"):
        load_expert_lora_state_dict(other, sd)
    del sd[next(iter(sd))]
    with pytest.raises(UserError, match="no expert LoRA tensor"):
        load_expert_lora_state_dict(model, sd)


def test_dense_model_has_no_experts(tiny_llama_dir):
    model = _load(tiny_llama_dir)
    assert replace_experts_(model) == 0
    with pytest.raises(UserError, match="no MoE experts"):
        add_expert_lora_(model, r=4, alpha=8)
