"""GGUF of the Qwen3-Next / Qwen3.5 hybrids: the tensor layout llama.cpp's qwen3next / qwen35moe read.

The end-to-end checks (train, merge, export, llama.cpp matches PyTorch) are rows of
tests/families; here, on a tiny model without llama.cpp: the delta-net tensors as stored
(A = −exp(A_log), the gated norm without 1 + w, the convolution kernel F32 in every preset),
the keys, and the multi-token-prediction head dropped rather than refused.
"""

from __future__ import annotations

import helpers
import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from greentune.export import export_gguf


def _qwen3_next(tokenizer, out):
    cfg = tf.Qwen3NextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_delta_net_tensors_as_llama_cpp_reads_them(tmp_path, tokenizer, quant):
    base = _qwen3_next(tokenizer, tmp_path / "m")
    sd = load_file(base / "model.safetensors")
    sd["mtp.fc.weight"] = torch.zeros(64, 128)  # the multi-token-prediction head: not run, dropped
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    summary = export_gguf(base, tmp_path / "m.gguf", quant)
    meta, t, types = helpers.read_gguf(summary.path)
    p = "model.layers.0.linear_attn."
    assert meta["general.architecture"] == "qwen3next"
    assert meta["qwen3next.ssm.group_count"] == 2 and meta["qwen3next.ssm.time_step_rank"] == 4
    assert meta["qwen3next.ssm.inner_size"] == 64 and meta["qwen3next.full_attention_interval"] == 4
    assert meta["qwen3next.rope.dimension_count"] == 4  # head_dim 16 · partial_rotary_factor 0.25
    assert types["blk.0.ssm_conv1d.weight"] == "F32" and t["blk.0.ssm_conv1d.weight"].shape == (128, 4)
    np.testing.assert_array_equal(t["blk.0.ssm_conv1d.weight"], sd[p + "conv1d.weight"][:, 0].numpy())
    np.testing.assert_allclose(t["blk.0.ssm_a"], -np.exp(sd[p + "A_log"].numpy()), rtol=1e-6)
    np.testing.assert_array_equal(t["blk.0.ssm_dt.bias"], sd[p + "dt_bias"].numpy())
    np.testing.assert_array_equal(t["blk.0.ssm_norm.weight"], sd[p + "norm.weight"].numpy())  # no 1 + w
    np.testing.assert_array_equal(
        t["blk.0.attn_norm.weight"], 1 + sd["model.layers.0.input_layernorm.weight"].numpy()
    )
    assert "blk.0.attn_q.weight" not in t and t["blk.3.attn_q.weight"].shape == (128, 64)  # q and its gate
    assert not [n for n in t if "mtp" in n or "nextn" in n or "eh_proj" in n]
