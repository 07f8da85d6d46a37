"""MLX export. Where `mlx` and `mlx_lm` import (Linux CPU wheels `mlx[cpu]`), the export is loaded
with `mlx_lm.load` and its logits compared with PyTorch; the packing is checked against
`mx.dequantize`. Without them, the documented formula (ŵ = s·q + β) is checked in numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from greentune.errors import UserError
from greentune.export import write_mlx
from greentune.export.mlx import dequantize_affine, pack_bits, quantize_affine, unpack_bits

IDS = [5, 6, 7, 8, 9, 10, 40, 41]


def _torch_logits(model_dir, state=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if state is not None:
        model.load_state_dict(state, strict=False)
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].numpy()


def _dequantised_state(out_dir, bits, moe: bool) -> dict:
    """HF state dict from the MLX folder, dequantised with the documented formula."""
    w = load_file(out_dir / "model.safetensors")
    sd = {}
    for name in w:
        if name.endswith(".scales") or name.endswith(".biases"):
            continue
        base = name[: -len(".weight")]
        t = w[name]
        if f"{base}.scales" in w:
            t = dequantize_affine(
                t.view(np.uint32),
                w[f"{base}.scales"].astype(np.float32),
                w[f"{base}.biases"].astype(np.float32),
                bits,
                64,
            )
        sd[name] = t.astype(np.float32)
    if moe:
        for name in [n for n in sd if ".switch_mlp." in n]:
            p = name.split(".block_sparse_moe.")[0]
            if name.endswith("gate_proj.weight"):
                sd[f"{p}.mlp.experts.gate_up_proj"] = np.concatenate(
                    [sd[name], sd[f"{p}.block_sparse_moe.switch_mlp.up_proj.weight"]], axis=1
                )
            if name.endswith("down_proj.weight"):
                sd[f"{p}.mlp.experts.down_proj"] = sd[name]
        for name in [n for n in sd if n.endswith("block_sparse_moe.gate.weight")]:
            sd[name.replace("block_sparse_moe.gate", "mlp.gate")] = sd[name]
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_roundtrip_and_formula(bits):
    w = np.random.default_rng(bits).standard_normal((3, 128)).astype(np.float32)
    p, s, b = quantize_affine(w, bits, 64)
    assert p.dtype == np.uint32 and p.shape == (3, 128 * bits // 32) and s.shape == (3, 2)
    q = unpack_bits(p, bits, 128)
    np.testing.assert_array_equal(pack_bits(q, bits), p)
    assert q.max() == 2**bits - 1 and q.min() == 0
    w_hat = dequantize_affine(p, s, b, bits, 64)
    assert np.abs(w_hat - w).max() <= s.max() / 2 + 1e-6  # half a step at most
    np.testing.assert_allclose(w_hat.reshape(3, 2, 64).min(-1), w.reshape(3, 2, 64).min(-1), atol=1e-6)
    if bits == 4:  # low bits first: value 0 of a row sits in bits 0-3 of word 0
        assert p[0, 0] & 0xF == q[0, 0] and (p[0, 0] >> 4) & 0xF == q[0, 1]


def test_packing_matches_mlx():
    mx = pytest.importorskip("mlx.core")
    w = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    for bits in (3, 4, 8):
        p, s, b = quantize_affine(w, bits, 64)
        ref = np.array(mx.dequantize(mx.array(p), mx.array(s), mx.array(b), group_size=64, bits=bits))
        np.testing.assert_array_equal(ref, dequantize_affine(p, s, b, bits, 64))


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_mlx_export_layout_and_logits(request, tmp_path, arch):
    model_dir = request.getfixturevalue(f"scaled_{arch}_dir")
    out = write_mlx(model_dir, tmp_path / "mlx4", bits=4, group_size=64, dtype="float32")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 64, "bits": 4}
    assert cfg["rope_theta"] == (1e6 if arch == "mixtral" else 1e4)
    w = load_file(out / "model.safetensors")
    assert w["model.layers.0.self_attn.q_proj.weight"].dtype == np.uint32
    assert w["model.layers.0.self_attn.q_proj.weight"].shape == (64, 8)
    assert w["model.layers.0.self_attn.q_proj.scales"].shape == (64, 1)
    assert "model.norm.scales" not in w
    if arch == "mixtral":
        assert w["model.layers.1.block_sparse_moe.switch_mlp.down_proj.weight"].shape == (4, 64, 16)
        assert w["model.layers.1.block_sparse_moe.switch_mlp.gate_proj.scales"].shape == (4, 128, 1)
        assert w["model.layers.1.block_sparse_moe.gate.weight"].dtype == np.float32  # router kept
    want = _torch_logits(model_dir, _dequantised_state(out, 4, arch == "mixtral"))
    original = _torch_logits(model_dir)
    assert np.abs(want - original).max() > 0.1  # 4 bits do change the model...
    try:
        import mlx.core as mx
        from mlx_lm import load
    except ImportError:
        return  # formula-only check above
    model, tok = load(str(out))
    got = np.array(model(mx.array([IDS])).astype(mx.float32))[0]
    np.testing.assert_allclose(got, want, atol=2e-3)  # ...and mlx_lm runs exactly those weights
    assert tok.encode("hello world") == request.getfixturevalue("tokenizer").encode("hello world")


def test_mlx_unquantised_matches_hf(tmp_path, scaled_mixtral_dir):
    out = write_mlx(scaled_mixtral_dir, tmp_path / "mlx", bits=None, dtype="float32")
    assert "quantization" not in json.loads((out / "config.json").read_text())
    mx = pytest.importorskip("mlx.core")
    from mlx_lm import load

    model, _ = load(str(out))
    got = np.array(model(mx.array([IDS])))[0]
    np.testing.assert_allclose(got, _torch_logits(scaled_mixtral_dir), atol=1e-4)


def test_mlx_user_errors(tmp_path, scaled_llama_dir):
    with pytest.raises(UserError, match="bits"):
        write_mlx(scaled_llama_dir, tmp_path / "m", bits=7)
    with pytest.raises(UserError, match="group_size"):
        write_mlx(scaled_llama_dir, tmp_path / "m", group_size=48)
