"""GGUF for the hybrid linear-attention MoE families: `qwen3_next` → llama.cpp `qwen3next`,
`qwen3_5_moe_text` → `qwen35moe` (issue 17).

Both stack gated-delta-net layers with a full-attention layer every `full_attention_interval`
(read from HF's `layer_types`, which must follow that pattern), and every layer's MLP is Qwen-MoE's
(softmax top-k renormalised, one sigmoid-gated shared expert). What llama.cpp reads, as its
converter writes it:

- keys: `expert_feed_forward_length`, `expert_shared_feed_forward_length`, `ssm.conv_kernel`
  (linear_conv_kernel_dim), `ssm.state_size` (linear_key_head_dim), `ssm.group_count`
  (linear_num_key_heads), `ssm.time_step_rank` (linear_num_value_heads), `ssm.inner_size`
  (value head dim · value heads), `full_attention_interval`; `rope.dimension_count` is
  head_dim · partial_rotary_factor (the common key). qwen35moe's loader also requires
  `rope.dimension_sections` (HF's mrope_section, default [11, 11, 10, 0]): its rope is
  interleaved M-RoPE, which for text (one position for all sections) is NeoX rope.
- norms: every RMSNorm is zero-centred (x·(1 + w)), stored as 1 + w (`Family.norm_offset`),
  except the delta net's gated norm `linear_attn.norm` (x·w, `ssm_norm`), stored as is.
- full-attention layers: q_proj holds each head's query and output gate (HF's
  view(…, 2·head_dim) chunk), which llama.cpp reads unchanged; NeoX rope, q/k unpermuted.
- delta net: `A_log` → `ssm_a` = −exp(A_log); `dt_bias` → `ssm_dt.bias`; `conv1d.weight`
  [C, 1, K] → `ssm_conv1d` [C, K] (always F32: ggml's ssm_conv reads float kernels);
  `out_proj` → `ssm_out`. Qwen3-Next's `in_proj_qkvz` holds, per key head, [q, k, v, z]
  (v and z: that head's value heads); it becomes `attn_qkv` = [all q, all k, all v] and
  `attn_gate` = [all z]; `in_proj_ba` → `ssm_ba` as is. Qwen3.5's separate projections
  map by name: in_proj_qkv → attn_qkv, in_proj_z → attn_gate, in_proj_b → ssm_beta,
  in_proj_a → ssm_alpha.
- value-head order (`TILED`): HF pairs value head j with key head j // (nv/nk) (grouped).
  qwen35moe's graph broadcasts q/k over value heads by tiling (value head j ↔ key head
  j % nk), so its value heads are reordered grouped → tiled wherever they appear: the v
  rows of in_proj_qkv, the rows of in_proj_z / in_proj_b / in_proj_a, A_log, dt_bias,
  conv1d's v channels, and the columns of out_proj. qwen3next's graph repeats them grouped,
  so Qwen3-Next's are kept in HF's order. (Measured with xllamacpp on 2 key / 4 value heads:
  the right order matches PyTorch within 4e-5 in log-probability, the other order is off by
  11-13; with as many key as value heads both orders are the same.)
- `mtp.*` (the multi-token-prediction head) is dropped, as llama.cpp's converter does:
  neither HF's causal LM nor llama.cpp's graph runs it.

Prequantized (trained-on) blocks: a row reorder is applied to the block bytes (a block never
crosses a row) and they ship unchanged; out_proj's column reorder would cut blocks, so a
prequantized Qwen3.5 out_proj is dequantised for it and written in the preset's type (as
DeepSeek's kv_b_proj is, `gguf_deepseek`).
"""

from __future__ import annotations

import numpy as np
from gguf import GGUFWriter

from greentune.errors import UserError
from greentune.export.source import Packed, take_rows

# value heads reordered grouped-by-key-head → tiled (see the module docstring)
TILED = {"qwen3_next": False, "qwen3_5_moe_text": True}
_MROPE_DEFAULT = [11, 11, 10, 0]


def _interval(cfg: dict) -> int:
    """One full-attention layer every this many: from layer_types (its first full layer), else
    full_attention_interval (default 4)."""
    types = list(cfg.get("layer_types") or [])
    if "full_attention" in types:
        return types.index("full_attention") + 1
    return int(cfg.get("full_attention_interval") or 4)


def check(cfg: dict) -> None:
    mt = cfg["model_type"]
    n, every = int(cfg["num_hidden_layers"]), _interval(cfg)
    expected = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n)]
    if cfg.get("layer_types") and list(cfg["layer_types"]) != expected:
        raise UserError(
            f"GGUF export of {mt}: layer_types {cfg['layer_types']} are not one full-attention layer "
            f"every {every} (full_attention_interval), the only pattern llama.cpp's graph reads"
        )
    if int(cfg.get("decoder_sparse_step", 1)) != 1 or cfg.get("mlp_only_layers"):
        raise UserError(
            f"GGUF export of {mt}: dense layers among the MoE layers (decoder_sparse_step / "
            "mlp_only_layers) are not exported yet"
        )
    if mt == "qwen3_next" and not cfg.get("norm_topk_prob", True):
        raise UserError(
            "GGUF export of qwen3_next: llama.cpp's qwen3next graph renormalises the top-k router "
            "weights, this model does not (norm_topk_prob false)"
        )
    if cfg.get("attention_bias"):
        raise UserError(
            f"GGUF export of {mt}: attention_bias true (q/k/v/o biases) is not in llama.cpp's graph"
        )
    nk, nv = int(cfg["linear_num_key_heads"]), int(cfg["linear_num_value_heads"])
    if nv % nk:
        raise UserError(f"GGUF export of {mt}: {nv} value heads are not a multiple of {nk} key heads")


def keys(w: GGUFWriter, cfg: dict) -> None:
    w.add_expert_feed_forward_length(int(cfg["moe_intermediate_size"]))
    w.add_expert_shared_feed_forward_length(int(cfg["shared_expert_intermediate_size"]))
    w.add_ssm_conv_kernel(int(cfg["linear_conv_kernel_dim"]))
    w.add_ssm_state_size(int(cfg["linear_key_head_dim"]))
    w.add_ssm_group_count(int(cfg["linear_num_key_heads"]))
    w.add_ssm_time_step_rank(int(cfg["linear_num_value_heads"]))
    w.add_ssm_inner_size(int(cfg["linear_value_head_dim"]) * int(cfg["linear_num_value_heads"]))
    w.add_full_attention_interval(_interval(cfg))
    if cfg["model_type"] == "qwen3_5_moe_text":
        sections = list((cfg.get("rope_parameters") or {}).get("mrope_section") or _MROPE_DEFAULT)
        w.add_rope_dimension_sections((sections + [0] * 4)[:4])


def _float(t) -> np.ndarray:
    if isinstance(t, Packed):
        from gguf.quants import dequantize

        return dequantize(t.data, t.ggml_type).astype(np.float32)
    return t


def tiled_heads(nk: int, per_k: int) -> np.ndarray:
    """Value-head index in tiled order: position j·nk + g holds HF's (grouped) head g·per_k + j."""
    return np.arange(nk * per_k).reshape(nk, per_k).T.reshape(-1)


def _expand(heads: np.ndarray, dim: int) -> np.ndarray:
    """Row index of whole heads of `dim` rows each."""
    return (heads[:, None] * dim + np.arange(dim)).reshape(-1)


def qkvz_rows(cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """Rows of Qwen3-Next's in_proj_qkvz that make attn_qkv ([all q, all k, all v]) and attn_gate."""
    nk, nv = int(cfg["linear_num_key_heads"]), int(cfg["linear_num_value_heads"])
    dk, dv = int(cfg["linear_key_head_dim"]), int(cfg["linear_value_head_dim"])
    vz = nv // nk * dv
    group = np.arange(nk)[:, None] * (2 * dk + 2 * vz)
    q = (group + np.arange(dk)).reshape(-1)
    k = (group + dk + np.arange(dk)).reshape(-1)
    v = (group + 2 * dk + np.arange(vz)).reshape(-1)
    z = (group + 2 * dk + vz + np.arange(vz)).reshape(-1)
    return np.concatenate([q, k, v]), z


def split(cfg: dict, hname: str, layer: int | None, shape: tuple, load):
    """[(GGUF name, numpy shape, loader, HF sources)] for the tensors these families store otherwise,
    [] for one dropped (mtp.*), None for one the name map handles. A tensor listing its HF name as
    source may hand out prequantized blocks (row reorders only); the others are float."""
    if hname.startswith("mtp."):
        return []
    if ".linear_attn." not in hname:
        return None
    b = f"blk.{layer}"
    mt = cfg["model_type"]
    nk, nv = int(cfg["linear_num_key_heads"]), int(cfg["linear_num_value_heads"])
    dk, dv = int(cfg["linear_key_head_dim"]), int(cfg["linear_value_head_dim"])
    heads = tiled_heads(nk, nv // nk) if TILED[mt] else np.arange(nv)
    leaf = hname.split(".linear_attn.", 1)[1]
    src = (hname,)

    def rows(index):
        return lambda: take_rows(load(), index)

    if leaf == "A_log":
        return [(f"{b}.ssm_a", (nv,), lambda: -np.exp(_float(load()).reshape(-1)[heads]))]
    if leaf == "dt_bias":
        return [(f"{b}.ssm_dt.bias", (nv,), lambda: _float(load()).reshape(-1)[heads])]
    if leaf == "norm.weight":  # the gated norm multiplies by w itself: no 1 + w
        return [(f"{b}.ssm_norm.weight", tuple(shape), lambda: _float(load()))]
    if leaf == "conv1d.weight":
        channels = np.concatenate([np.arange(2 * nk * dk), 2 * nk * dk + _expand(heads, dv)])
        return [(f"{b}.ssm_conv1d.weight", (shape[0], shape[-1]), lambda: _float(load())[:, 0, :][channels])]
    if leaf == "out_proj.weight":
        cols = _expand(heads, dv)
        if not TILED[mt]:
            return [(f"{b}.ssm_out.weight", tuple(shape), load, src)]
        return [(f"{b}.ssm_out.weight", tuple(shape), lambda: np.ascontiguousarray(_float(load())[:, cols]))]
    if leaf == "in_proj_qkvz.weight":
        qkv, z = qkvz_rows(cfg)
        return [
            (f"{b}.attn_qkv.weight", (len(qkv), shape[-1]), rows(qkv), src),
            (f"{b}.attn_gate.weight", (len(z), shape[-1]), rows(z), src),
        ]
    if leaf == "in_proj_ba.weight":
        return [(f"{b}.ssm_ba.weight", tuple(shape), load, src)]
    per_leaf = {
        "in_proj_qkv.weight": (
            "attn_qkv",
            np.concatenate([np.arange(2 * nk * dk), 2 * nk * dk + _expand(heads, dv)]),
        ),
        "in_proj_z.weight": ("attn_gate", _expand(heads, dv)),
        "in_proj_b.weight": ("ssm_beta", heads),
        "in_proj_a.weight": ("ssm_alpha", heads),
    }
    if leaf in per_leaf:
        name, index = per_leaf[leaf]
        return [(f"{b}.{name}.weight", tuple(shape), rows(index), src)]
    raise UserError(f"{hname}: a delta-net tensor greentune's GGUF export does not know; it would be dropped")
