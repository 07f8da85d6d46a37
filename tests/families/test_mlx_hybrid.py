"""MLX export of the hybrid linear-attention families (Qwen3-Next, Qwen3.5-MoE text), untrained.

A tiny model of the family-matrix row (3 delta-net layers, 1 full-attention layer, MoE with a
shared expert), its matrices ×4 and every 1-D parameter (norms, A_log, dt_bias) shifted at
random, so that a norm written without its 1 + w, a gated norm shifted by mistake or a conv1d
in the wrong axis order each change the logits. Checked: the layout mlx_lm's model holds after
its `sanitize` (which converts only the hub's per-expert layout), the float32 export's logits
in mlx_lm against PyTorch (1e-4; ~2e-5 measured), and the 4-bit export (float32 scales) running
its own dequantised weights (1e-3 of the largest logit; ~4e-5 measured).
"""

from __future__ import annotations

import json

import gguf_inverse
import numpy as np
import pytest
import torch
from rows import BY_TYPE
from safetensors.numpy import load_file

from greentune.export import write_mlx

HIDDEN, FF = 128, 64
PROMPT = list(range(5, 29))  # 24 tokens


def _build(model_type, out, tokenizer):
    from transformers import AutoModelForCausalLM

    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    cfg = BY_TYPE[model_type].make(len(tokenizer), ids, HIDDEN, FF)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim >= 2:
                p.mul_(4.0)
            else:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model


@pytest.mark.parametrize("model_type", ["qwen3_next", "qwen3_5_moe_text"])
def test_hybrid_mlx_layout_and_logits(tmp_path, tokenizer, model_type):
    model = _build(model_type, tmp_path / "hf", tokenizer)
    hf = {k: v.numpy() for k, v in model.state_dict().items()}
    exact = write_mlx(tmp_path / "hf", tmp_path / "mlx-f32", bits=None, dtype="float32")
    cfg = json.loads((exact / "config.json").read_text())
    w = load_file(exact / "model.safetensors")
    pre = "language_model." if model_type == "qwen3_5_moe_text" else ""
    if model_type == "qwen3_5_moe_text":
        assert cfg["model_type"] == "qwen3_5_moe" and cfg["text_config"]["full_attention_interval"] == 4
        assert cfg["text_config"]["rope_parameters"]["partial_rotary_factor"] == 0.25
    else:
        assert cfg["model_type"] == "qwen3_next" and cfg["full_attention_interval"] == 4
        assert cfg["partial_rotary_factor"] == 0.25
    conv = hf["model.layers.0.linear_attn.conv1d.weight"]  # [C, 1, K]
    np.testing.assert_array_equal(
        w[f"{pre}model.layers.0.linear_attn.conv1d.weight"], conv.transpose(0, 2, 1)
    )
    for name in ("model.layers.0.input_layernorm.weight", "model.layers.3.self_attn.q_norm.weight"):
        np.testing.assert_array_equal(w[pre + name], hf[name] + 1.0)  # HF: x̂·(1 + w)
    gated = "model.layers.0.linear_attn.norm.weight"  # HF: x̂·w
    np.testing.assert_array_equal(w[pre + gated], hf[gated])
    assert w[f"{pre}model.layers.1.mlp.switch_mlp.gate_proj.weight"].shape == (4, FF, HIDDEN)
    assert f"{pre}model.layers.1.mlp.shared_expert_gate.weight" in w

    # scales in float32, so mlx_lm computes in float32 and runs the 4-bit weights to within 1e-3
    out4 = write_mlx(tmp_path / "hf", tmp_path / "mlx-4", bits=4, group_size=64, dtype="float32")
    w4 = load_file(out4 / "model.safetensors")
    assert w4[f"{pre}model.layers.0.linear_attn.in_proj_{'qkvz' if not pre else 'qkv'}.scales"].shape[-1] == 2
    assert w4[f"{pre}model.layers.0.mlp.gate.weight"].dtype == np.float32  # router kept in float

    mx = pytest.importorskip("mlx.core")
    from mlx_lm import load

    with torch.no_grad():
        want = model(torch.tensor([PROMPT])).logits[0].numpy()
    m, _ = load(str(exact))
    got = np.array(m(mx.array([PROMPT])).astype(mx.float32))[0]
    assert np.abs(want).max() > 1.0  # spread logits: 1e-4 is a real bound
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

    m4, _ = load(str(out4))
    got4 = np.array(m4(mx.array([PROMPT])).astype(mx.float32))[0]
    with torch.no_grad():
        want4 = (
            gguf_inverse.hf_model_from_mlx(out4, tmp_path / "hf")(torch.tensor([PROMPT])).logits[0].numpy()
        )
    assert np.abs(want4 - want).max() > 0.05  # 4 bits do change the model ...
    np.testing.assert_allclose(got4, want4, atol=1e-3 * np.abs(want4).max(), rtol=0)  # ... mlx runs those
