"""LoRA target "attn" on a hybrid model: softmax attention and the gated delta-net projections."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

from greentune.adapters.lora import LINEAR_ATTN, apply_lora

sys.path.insert(0, str(Path(__file__).parent.parent / "families"))
import rows  # noqa: E402


@pytest.mark.parametrize("model_type", ["qwen3_next", "qwen3_5_moe_text"])
def test_attn_covers_the_linear_attention_projections(model_type):
    cfg = rows.BY_TYPE[model_type].make(128, dict(bos_token_id=1, eos_token_id=2, pad_token_id=0), 32, 32)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    wrapped = apply_lora(model, ["attn"], rank=2, alpha=4.0)
    linear = {n.rsplit(".", 1)[1] for n in wrapped if ".linear_attn." in n}
    full = {n.rsplit(".", 1)[1] for n in wrapped if ".self_attn." in n}
    have = {
        n.rsplit(".", 1)[1] for n, m in model.named_modules() if ".linear_attn." in n and n.count(".") == 4
    }
    assert linear == have & set(LINEAR_ATTN) and "out_proj" in linear and len(linear) >= 3
    assert full == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert not any(".experts." in n or "shared_expert" in n for n in wrapped)
    ids = torch.randint(3, 128, (1, 8))
    model(ids, labels=ids).loss.backward()  # the delta-net LoRA factors get gradients
    grads = [p.grad for n, p in model.named_parameters() if ".linear_attn." in n and "lora_A" in n]
    assert grads and all(g is not None for g in grads)
