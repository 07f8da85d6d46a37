"""GGUF → HF state dict for any family row, so PyTorch runs exactly the weights llama.cpp sees.

Independent of the exporter's code path: names come from the `gguf` package's
`TensorNameMap` applied to the HF model's own state-dict names; every tensor is dequantised
with `gguf.quants.dequantize`; the row's `interleaved` and `norm_offset` are undone; stacked
experts become transformers v5's fused `gate_up_proj` / `down_proj`. The hybrids' delta-net
tensors are rebuilt from llama.cpp's layout as its graph reads it (`_delta_net`: A = −exp(A_log),
the per-key-head qkvz, value heads tiled where `row.v_tiled`, the gated norm without offset).
With `row.ggml_activations` the model also rounds its matmul inputs as llama.cpp does for each
tensor's type (`ggml_activations`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch


def _arch(name: str):
    from gguf import MODEL_ARCH, MODEL_ARCH_NAMES

    return next(a for a in MODEL_ARCH if MODEL_ARCH_NAMES[a] == name)


def _interleave(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
    out = np.stack([a, b], axis=axis + 1)
    shape = list(a.shape)
    shape[axis] *= 2
    return out.reshape(shape)


def _gpt_oss_expert(hname: str, t: dict):
    """gpt-oss's HF expert tensors from the GGUF's split ones (gate/up rows interleaved, [E, in, out])."""
    m = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_bias)?$", hname)
    if not m:
        return None
    b, bias = f"blk.{m.group(1)}", bool(m.group(3))
    sfx = ".bias" if bias else ".weight"
    if m.group(2) == "down_proj":
        v = t[f"{b}.ffn_down_exps{sfx}"]
        return v if bias else v.transpose(0, 2, 1)
    gate, up = t[f"{b}.ffn_gate_exps{sfx}"], t[f"{b}.ffn_up_exps{sfx}"]
    if bias:
        return _interleave(gate, up, 1)
    return _interleave(gate, up, 1).transpose(0, 2, 1)


def _grouped(heads: np.ndarray, r: int, nk: int, dim: int, axis: int) -> np.ndarray:
    """Value heads of `dim` rows along `axis` from llama.cpp's tiled order (head j·nk + g) back to
    HF's grouped one (head g·r + j)."""
    index = np.arange(nk * r).reshape(r, nk).T.reshape(-1)  # grouped head h sits at index[h]
    blocks = np.split(heads, nk * r, axis=axis)
    assert blocks[0].shape[axis] == dim
    return np.concatenate([blocks[i] for i in index], axis=axis)


def _delta_net(hname: str, t: dict, cfg, row):
    """A Qwen3-Next / Qwen3.5 gated-delta-net tensor from the GGUF's (None for any other name)."""
    m = re.match(r"model\.layers\.(\d+)\.linear_attn\.(.+)$", hname)
    if not m:
        return None
    b, leaf = f"blk.{m.group(1)}", m.group(2)
    nk, nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv, r = cfg.linear_key_head_dim, cfg.linear_value_head_dim, nv // nk

    def heads(x, dim, axis=0):
        return _grouped(x, r, nk, dim, axis) if row.v_tiled else x

    qk = 2 * nk * dk
    if leaf == "A_log":
        return np.log(-heads(t[f"{b}.ssm_a"], 1))
    if leaf == "dt_bias":
        return heads(t[f"{b}.ssm_dt.bias"], 1)
    if leaf == "norm.weight":
        return t[f"{b}.ssm_norm.weight"]  # the gated norm: stored as is, no 1 + w
    if leaf == "conv1d.weight":
        c = t[f"{b}.ssm_conv1d.weight"]
        return np.concatenate([c[:qk], heads(c[qk:], dv)])[:, None, :]
    if leaf == "out_proj.weight":
        return heads(t[f"{b}.ssm_out.weight"], dv, axis=1)
    if leaf == "in_proj_qkvz.weight":  # per key head: its q, k, then its value heads' v and z rows
        qkv, z = t[f"{b}.attn_qkv.weight"], t[f"{b}.attn_gate.weight"]
        q, k, v = qkv[: nk * dk], qkv[nk * dk : qk], heads(qkv[qk:], dv)
        z = heads(z, dv)
        per = [
            part[g * n : (g + 1) * n]
            for g in range(nk)
            for part, n in ((q, dk), (k, dk), (v, r * dv), (z, r * dv))
        ]
        return np.concatenate(per)
    if leaf == "in_proj_ba.weight":
        return t[f"{b}.ssm_ba.weight"]
    if leaf == "in_proj_qkv.weight":
        qkv = t[f"{b}.attn_qkv.weight"]
        return np.concatenate([qkv[:qk], heads(qkv[qk:], dv)])
    if leaf == "in_proj_z.weight":
        return heads(t[f"{b}.attn_gate.weight"], dv)
    if leaf in ("in_proj_b.weight", "in_proj_a.weight"):
        return heads(t[f"{b}.ssm_{'beta' if leaf == 'in_proj_b.weight' else 'alpha'}.weight"], 1)
    raise AssertionError(f"unknown delta-net tensor {hname}")


# in-memory router names the gguf map does not know, and their on-disk (hub) names
_ROUTERS = {
    "block_sparse_moe.router.weight": "block_sparse_moe.router.layer.weight",  # GraniteMoE
    "mlp.router.weight": "block_sparse_moe.gate.weight",  # PhiMoE
}


def _hub_name(name: str) -> str:
    for mem, hub in _ROUTERS.items():
        if name.endswith(mem):
            return name[: -len(mem)] + hub
    return name


def hf_model_from_gguf(path, model_dir, row):
    """The HF model of `model_dir` with every weight replaced by the GGUF's (dequantised)."""
    import helpers
    from gguf import TensorNameMap
    from transformers import AutoConfig, AutoModelForCausalLM

    meta, t, types = helpers.read_gguf(path)
    assert meta["general.architecture"] == row.arch
    cfg = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    names = TensorNameMap(_arch(row.arch), cfg.num_hidden_layers)
    sd = {}
    for hname in model.state_dict():
        g = _gpt_oss_expert(hname, t) if row.model_type == "gpt_oss" else None
        if g is not None:
            sd[hname] = g
            continue
        m = re.match(
            r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)$", hname
        )
        if m:
            b = f"blk.{m.group(1)}"
            sd[hname] = (
                np.concatenate([t[f"{b}.ffn_gate_exps.weight"], t[f"{b}.ffn_up_exps.weight"]], axis=1)
                if m.group(2) == "gate_up_proj"
                else t[f"{b}.ffn_down_exps.weight"]
            )
            continue
        g = _delta_net(hname, t, cfg, row)
        if g is not None:
            sd[hname] = g
            continue
        if hname.endswith("mlp.gate.e_score_correction_bias"):
            sd[hname] = t[f"blk.{hname.split('.')[2]}.exp_probs_b.bias"]
            continue
        if hname.endswith("self_attn.kv_b_proj.weight"):  # MLA: per-head k_b (transposed) and v_b
            b = f"blk.{hname.split('.')[2]}"
            k_b, v_b = t[f"{b}.attn_k_b.weight"], t[f"{b}.attn_v_b.weight"]
            sd[hname] = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(-1, k_b.shape[1])
            continue
        g = names.get_name(_hub_name(hname), try_suffixes=(".weight", ".bias"))
        if g is None and hname.endswith("e_score_correction_bias"):  # ERNIE: blk.N.exp_probs_b.bias [E]
            g = (
                names.get_name(hname.replace(".gate.moe_statics.", ".moe_statics.")[: -len("_bias")])
                + ".bias"
            )
        if hname == "lm_head.weight" and "output.weight" not in t:
            g = "token_embd.weight"
        if g not in t and f"{g}.weight" in t:  # a bare parameter (gpt-oss's sinks)
            g = f"{g}.weight"
        assert g in t, (hname, g)
        v = t[g]
        kind = g.split(".")[2] if g.startswith("blk.") else ""
        if row.interleaved and kind in ("attn_q", "attn_k"):
            v = helpers._unpermute(
                v, cfg.num_attention_heads if kind == "attn_q" else cfg.num_key_value_heads
            )
        if row.norm_offset and "norm" in g:
            v = v - np.float32(row.norm_offset)
        sd[hname] = v.reshape(model.state_dict()[hname].shape)
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=True)
    if row.ggml_activations:
        import ggml_activations

        ggml_activations.round_activations(model, types)
    return model


# Qwen3-Next / Qwen3.5's RMSNorms that HF computes as x̂·(1 + w) (not the delta-net's gated `norm`)
_ZERO_CENTRED = re.compile(r"(input_layernorm|post_attention_layernorm|model\.norm|q_norm|k_norm)\.weight$")


def _undo_hybrid(sd: dict) -> dict:
    """HF names and layouts of a hybrid model's MLX tensors: no `language_model.` prefix (Qwen3.5),
    conv1d [C, K, 1] → [C, 1, K], zero-centred norms 1 + w → w."""
    out = {}
    for name, t in sd.items():
        name = name.removeprefix("language_model.")
        if name.endswith("linear_attn.conv1d.weight"):
            t = t.transpose(0, 2, 1)
        elif _ZERO_CENTRED.search(name):
            t = t - np.float32(1.0)
        out[name] = t
    return out


def hf_model_from_mlx(mlx_dir, model_dir):
    """The HF model of `model_dir` with the MLX folder's weights, dequantised by MLX's formula."""
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    from greentune.export.mlx import dequantize_affine

    cfg = json.loads((Path(mlx_dir) / "config.json").read_text())
    q = cfg.get("quantization") or {}
    w = load_file(Path(mlx_dir) / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sd = {}
    for name, t in w.items():
        if name.endswith((".scales", ".biases")):
            continue
        base = name[: -len(".weight")]
        if f"{base}.scales" in w:
            t = dequantize_affine(
                t.view(np.uint32),
                w[f"{base}.scales"].astype(np.float32),
                w[f"{base}.biases"].astype(np.float32),
                q["bits"],
                q["group_size"],
            )
        sd[name] = t.astype(np.float32)
    if any(n.endswith("linear_attn.conv1d.weight") for n in sd):
        sd = _undo_hybrid(sd)
    for name in [n for n in sd if n.endswith(".mlp.experts.gate_proj.weight")]:  # gpt-oss
        p = name[: -len(".gate_proj.weight")]
        gate, up = sd.pop(name), sd.pop(f"{p}.up_proj.weight")
        sd[f"{p}.gate_up_proj"] = _interleave(gate, up, 1).transpose(0, 2, 1)
        sd[f"{p}.gate_up_proj_bias"] = _interleave(
            sd.pop(f"{p}.gate_proj.bias"), sd.pop(f"{p}.up_proj.bias"), 1
        )
        sd[f"{p}.down_proj"] = sd.pop(f"{p}.down_proj.weight").transpose(0, 2, 1)
        sd[f"{p}.down_proj_bias"] = sd.pop(f"{p}.down_proj.bias")
    for name in [n for n in sd if n.endswith("self_attn.embed_q.weight")]:  # DeepSeek MLA, split
        wk, wv = sd.pop(name), sd.pop(name.replace("embed_q", "unembed_out"))
        kv_b = np.concatenate([wk.transpose(0, 2, 1), wv], axis=1)
        sd[name.replace("embed_q", "kv_b_proj")] = kv_b.reshape(-1, kv_b.shape[-1])
    have = model.state_dict()
    for name in [n for n in sd if ".switch_mlp.gate_proj." in n]:
        moe = name.split(".switch_mlp.")[0]
        p = moe.rsplit(".", 1)[0]
        up = sd.pop(f"{moe}.switch_mlp.up_proj.weight")
        # the in-memory module: `mlp` (Mixtral, Qwen-MoE, OLMoE, PhiMoE, ERNIE), `block_sparse_moe` (Granite)
        hf = next(f"{p}.{m}" for m in ("mlp", "block_sparse_moe") if f"{p}.{m}.experts.gate_up_proj" in have)
        sd[f"{hf}.experts.gate_up_proj"] = np.concatenate([sd.pop(name), up], 1)
        sd[f"{hf}.experts.down_proj"] = sd.pop(f"{moe}.switch_mlp.down_proj.weight")
        router = next(r for r in ("gate", "router") if f"{hf}.{r}.weight" in have)
        sd[f"{hf}.{router}.weight"] = sd.pop(
            next(f"{moe}.{r}.weight" for r in ("gate", "router.layer") if f"{moe}.{r}.weight" in sd)
        )
    if "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=False
    )
    # mlx_lm has no ERNIE selection bias (the exporter refuses a nonzero one): the model's own stays
    kept = ("rotary", "e_score_correction_bias")
    assert not unexpected and not [m for m in missing if not any(k in m for k in kept)], (missing, unexpected)
    return model
