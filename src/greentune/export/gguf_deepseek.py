"""GGUF for the DeepSeek-V3-style families: `deepseek_v3` → llama.cpp `deepseek2`, `glm4_moe` → `glm4moe`.

Both route with a sigmoid router whose choice adds `e_score_correction_bias` and may be
limited to the best `topk_group` of `n_group` expert groups; the chosen experts' sigmoid
scores are renormalised (`norm_topk_prob`) and scaled by `routed_scaling_factor`; one or
more shared experts are always on; the first `first_k_dense_replace` layers are dense.
llama.cpp's `build_moe_ffn` computes exactly that from these keys, as its converter writes
them: `expert_gating_func` = sigmoid, `expert_weights_norm`, `expert_weights_scale`,
`expert_group_count` / `expert_group_used_count`, `expert_shared_count`,
`leading_dense_block_count`, `expert_feed_forward_length`, and the bias as the tensor
`blk.N.exp_probs_b.bias` (the dense layers have no expert tensors).

DeepSeek's multi-head latent attention is stored as llama.cpp's converter stores it for the
"absorbed" MLA graph: q_a/q_b (or q) and kv_a_proj_with_mqa by name, and `kv_b_proj`
[n_head·(nope + v), kv_lora_rank] split per head into `attn_k_b` (numpy [n_head,
kv_lora_rank, nope], the nope rows transposed) and `attn_v_b` ([n_head, v, kv_lora_rank]);
`head_count_kv` = 1, `key_length` = kv_lora_rank + rope, `value_length` = kv_lora_rank,
`key_length_mla` = nope + rope, `value_length_mla` = v, `rope.dimension_count` = rope.
A prequantized `kv_b_proj` is dequantised for the split (its blocks span the rows being
transposed) and written in the preset's type. llama.cpp's deepseek2 graph rotates
interleaved pairs, which is what HF computes with `rope_interleave` true (the published
configs); other settings are refused in one line.
"""

from __future__ import annotations

import numpy as np
from gguf import ExpertGatingFuncType, GGUFWriter, RopeScalingType

from greentune.errors import UserError


def _router_check(cfg: dict) -> None:
    mt = cfg["model_type"]
    scoring = cfg.get("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise UserError(f"GGUF export of {mt}: router scoring_func {scoring!r} is not sigmoid")
    experts, groups = int(cfg["n_routed_experts"]), int(cfg.get("n_group") or 1)
    if experts % groups:
        raise UserError(f"GGUF export of {mt}: {experts} experts do not split into n_group={groups} groups")


def deepseek_check(cfg: dict) -> None:
    _router_check(cfg)
    if not cfg.get("rope_interleave", True):
        raise UserError(
            "GGUF export of deepseek_v3: rope_interleave false (half rotation) is not llama.cpp's "
            "deepseek2 rotation; published DeepSeek-V3 configs have it true"
        )
    if not cfg.get("q_lora_rank"):
        raise UserError(
            "GGUF export of deepseek_v3: q_lora_rank null (an unfactored q_proj) is read by llama.cpp's "
            "deepseek2 only for its 'lite' layer counts"
        )


def glm4moe_check(cfg: dict) -> None:
    _router_check(cfg)


def arch_overrides(cfg: dict) -> dict:
    """Arch fields that differ from the common reading of a config (see `gguf_tensors.Arch`)."""
    out = {
        "n_expert": int(cfg["n_routed_experts"]),
        "n_expert_used": int(cfg["num_experts_per_tok"]),
        "n_ff": int(cfg["intermediate_size"]),  # the dense layers'; the experts' is their own key
    }
    if cfg["model_type"] == "deepseek_v3":
        out.update(n_head_kv=1, n_rot=int(cfg["qk_rope_head_dim"]))
    return out


def _router_keys(w: GGUFWriter, cfg: dict) -> None:
    w.add_leading_dense_block_count(int(cfg.get("first_k_dense_replace") or 0))
    w.add_expert_feed_forward_length(int(cfg["moe_intermediate_size"]))
    w.add_expert_shared_count(int(cfg.get("n_shared_experts") or 0))
    w.add_expert_weights_scale(float(cfg.get("routed_scaling_factor", 1.0)))
    w.add_expert_weights_norm(bool(cfg.get("norm_topk_prob", False)))
    w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)
    if int(cfg.get("n_group") or 1) > 1:
        w.add_expert_group_count(int(cfg["n_group"]))
        w.add_expert_group_used_count(int(cfg["topk_group"]))


def _yarn_keys(w: GGUFWriter, cfg: dict) -> None:
    """YaRN as llama.cpp's converter writes it for deepseek2; llama.cpp then scales the scores by
    mscale² (mscale = 1 + 0.1·mscale_all_dim·ln factor), as HF's DeepSeek attention does."""
    from greentune.export.source import rope_settings

    _, s = rope_settings(cfg)
    if s.get("rope_type", s.get("type")) != "yarn":
        return
    if s.get("mscale", 1.0) != s.get("mscale_all_dim", 1.0) and s.get("mscale_all_dim"):
        raise UserError(
            "GGUF export of deepseek_v3: YaRN with mscale != mscale_all_dim scales cos/sin, "
            "which llama.cpp's deepseek2 graph does not"
        )
    w.add_rope_scaling_type(RopeScalingType.YARN)
    w.add_rope_scaling_factor(float(s["factor"]))
    w.add_rope_scaling_orig_ctx_len(int(s["original_max_position_embeddings"]))
    w.add_rope_scaling_yarn_beta_fast(float(s.get("beta_fast", 32.0)))
    w.add_rope_scaling_yarn_beta_slow(float(s.get("beta_slow", 1.0)))
    if s.get("mscale_all_dim"):
        w.add_rope_scaling_yarn_log_mul(0.1 * float(s["mscale_all_dim"]))  # the converter's 0.1 factor


def deepseek_keys(w: GGUFWriter, cfg: dict) -> None:
    _router_keys(w, cfg)
    _yarn_keys(w, cfg)
    rank, rope = int(cfg["kv_lora_rank"]), int(cfg["qk_rope_head_dim"])
    w.add_q_lora_rank(int(cfg["q_lora_rank"]))
    w.add_kv_lora_rank(rank)
    w.add_key_length(rank + rope)
    w.add_value_length(rank)
    w.add_key_length_mla(int(cfg["qk_nope_head_dim"]) + rope)
    w.add_value_length_mla(int(cfg["v_head_dim"]))


def glm4moe_keys(w: GGUFWriter, cfg: dict) -> None:
    _router_keys(w, cfg)


def _float(t):
    """A float32 array from a tensor that may be prequantized blocks."""
    from greentune.export.source import Packed

    if isinstance(t, Packed):
        from gguf.quants import dequantize

        return dequantize(t.data, t.ggml_type).astype(np.float32)
    return t


def split(cfg: dict, hname: str, layer: int | None, shape: tuple, load):
    """[(GGUF name, numpy shape, loader)] for an HF tensor these families store differently, or None.

    `load()` reads the HF tensor (float32 or prequantized blocks)."""
    if hname.endswith(".mlp.gate.e_score_correction_bias"):
        return [(f"blk.{layer}.exp_probs_b.bias", tuple(shape), lambda: _float(load()))]
    if cfg["model_type"] == "deepseek_v3" and hname.endswith(".self_attn.kv_b_proj.weight"):
        heads, nope, v = (int(cfg[k]) for k in ("num_attention_heads", "qk_nope_head_dim", "v_head_dim"))
        rank = shape[-1]
        if tuple(shape) != (heads * (nope + v), rank):
            raise UserError(f"{hname}: shape {tuple(shape)} is not [n_head·(nope + v), kv_lora_rank]")

        def per_head():
            return _float(load()).reshape(heads, nope + v, rank)

        return [
            (
                f"blk.{layer}.attn_k_b.weight",
                (heads, rank, nope),
                lambda: np.ascontiguousarray(per_head()[:, :nope].transpose(0, 2, 1)),
            ),
            (
                f"blk.{layer}.attn_v_b.weight",
                (heads, v, rank),
                lambda: np.ascontiguousarray(per_head()[:, nope:]),
            ),
        ]
    return None
