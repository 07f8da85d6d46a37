"""GGUF rows for GraniteMoE, PhiMoE and ERNIE-4.5-MoE (issue 17), merged into `gguf_families.FAMILIES`.

What each needs beyond the common keys, as llama.cpp's converter writes it and its graph reads it:

- granitemoe (`general.architecture = "granitemoe"`, llama.cpp's granite graph with experts):
  Granite's four multipliers; q/k permuted (interleaved rope); the fused `input_linear`
  [E, 2I, H] splits into gate (rows 0..I-1) and up. Its router is a softmax over the top-k
  logits, which is llama.cpp's softmax-then-renormalise.
- phimoe: refused (see `_phimoe_check`): llama.cpp's phimoe runs on its phi3 graph, which
  normalises with RMSNorm (+ bias) where Phi-3.5-MoE uses LayerNorm, and weighs the top-2
  experts by a renormalised softmax where the sparsemixer gives each its own masked softmax
  (≈ 1 each); the file would run, differently.
- ernie4_5_moe ("ernie4_5-moe"): HF's rope is already interleaved (no permutation); the
  first `moe_layer_start_index` layers are dense (`leading_dense_block_count`), every
  `moe_layer_interval`-th after that MoE (`interleave_moe_layer_step`) up to the last layer;
  the selection bias `moe_statics.e_score_correction_bias` becomes `blk.N.exp_probs_b.bias`;
  shared experts are `ffn_*_shexp` of width moe_intermediate_size · moe_num_shared_experts.
"""

from __future__ import annotations

from gguf import MODEL_ARCH, GGUFWriter

from greentune.errors import UserError
from greentune.export.gguf_families import Family, _granite_keys


def _granitemoe_keys(w: GGUFWriter, cfg: dict) -> None:
    _granite_keys(w, cfg)
    w.add_expert_feed_forward_length(int(cfg["intermediate_size"]))
    if cfg.get("shared_intermediate_size"):
        w.add_expert_shared_feed_forward_length(int(cfg["shared_intermediate_size"]))


def _phimoe_check(cfg: dict) -> None:
    raise UserError(
        "GGUF export of phimoe: llama.cpp runs phimoe on its phi3 graph, with RMSNorm where Phi-3.5-MoE "
        "has LayerNorm and renormalised top-2 weights where its sparsemixer router has its own; "
        "the file would compute another model (export to MLX instead: mlx_lm implements both)"
    )


def _ernie_bounds(cfg: dict) -> tuple[int, int, int]:
    n = int(cfg["num_hidden_layers"])
    start = cfg.get("moe_layer_start_index", 1)
    end = cfg.get("moe_layer_end_index", n - 1)
    start = min(start) if isinstance(start, (list, tuple)) else int(start)
    end = max(end) if isinstance(end, (list, tuple)) else int(end if end is not None else n - 1)
    return start, end, int(cfg.get("moe_layer_interval", 1) or 1)


def _ernie_layers(cfg: dict) -> list[int]:
    start, end, every = _ernie_bounds(cfg)
    return [i for i in range(int(cfg["num_hidden_layers"])) if (i + 1) % every == 0 and start <= i <= end]


def _ernie_check(cfg: dict) -> None:
    start, end, _ = _ernie_bounds(cfg)
    if end != int(cfg["num_hidden_layers"]) - 1:
        raise UserError(
            f"GGUF export of ernie4_5_moe: MoE layers end at {end}, before the last layer; llama.cpp's "
            "ernie4_5-moe graph makes every layer from moe_layer_start_index on MoE"
        )
    if cfg.get("use_bias"):
        raise UserError("GGUF export of ernie4_5_moe: use_bias true (MLP biases) is not in llama.cpp's graph")


def _ernie_keys(w: GGUFWriter, cfg: dict) -> None:
    start, _, every = _ernie_bounds(cfg)
    w.add_interleave_moe_layer_step(every)
    w.add_leading_dense_block_count(start)
    inter = int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
    w.add_expert_feed_forward_length(inter)
    shared = int(cfg.get("moe_num_shared_experts") or 0)
    w.add_expert_shared_count(shared)
    if shared:
        w.add_expert_shared_feed_forward_length(inter * shared)


MOE_FAMILIES: dict[str, Family] = {
    "granitemoe": Family(MODEL_ARCH.GRANITE_MOE, interleaved_rope=True, moe=True, keys=_granitemoe_keys),
    "phimoe": Family(MODEL_ARCH.PHIMOE, moe=True, check=_phimoe_check),
    "ernie4_5_moe": Family(
        MODEL_ARCH.ERNIE4_5_MOE, moe=True, keys=_ernie_keys, check=_ernie_check, moe_layers=_ernie_layers
    ),
}
