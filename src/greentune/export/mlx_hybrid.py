"""Qwen3-Next and Qwen3.5-MoE (text) as mlx-lm's models hold them after their `sanitize`.

mlx-lm (`mlx_lm.models.qwen3_next`, `qwen3_5` via `qwen3_5_moe`) converts a checkpoint only when
it sees the hub's layout: Qwen3-Next's conversions run only for per-expert
``mlp.experts.0.up_proj.weight`` tensors, Qwen3.5's norm shift only while a conv1d is not yet
[C, K, 1]. greentune writes stacked ``switch_mlp`` experts and the conv1d as [C, K, 1], so it
applies the conversions itself:

- zero-centred RMSNorms (HF computes x̂·(1 + w)) — ``input_layernorm``, ``post_attention_layernorm``,
  ``model.norm``, ``self_attn.q_norm`` / ``k_norm`` — are written as 1 + w, the weight mlx's
  ``nn.RMSNorm`` multiplies by; the delta-net's gated norm ``linear_attn.norm`` (HF: x̂·w) is
  written unchanged;
- ``linear_attn.conv1d.weight`` HF [C, 1, K] is written as MLX's depthwise Conv1d weight [C, K, 1];
- Qwen3.5's tensors are named under ``language_model.`` (mlx-lm's module tree).

Config: mlx-lm places full attention on every n-th layer (``full_attention_interval``), so HF's
``layer_types`` must be that pattern; Qwen3-Next's args read ``partial_rotary_factor`` at the
top level, Qwen3.5's read θ and the rotary fraction from ``rope_parameters`` (kept) inside
``text_config`` of a ``qwen3_5_moe`` config, the module mlx-lm serves Qwen3.5-MoE with.

mlx-lm computes in the dtype the tensors are stored in; these models are more sensitive to
float16 than the attention-only families (tests/families/rows.py, `_hybrid`), and
``write_mlx(..., dtype="float32")`` keeps quantised weights while computing in float32.
"""

from __future__ import annotations

import numpy as np

from greentune.errors import UserError

FAMILIES = ("qwen3_next", "qwen3_5_moe_text")
ZERO_CENTRED = (
    ".input_layernorm.weight",
    ".post_attention_layernorm.weight",
    "model.norm.weight",
    ".self_attn.q_norm.weight",
    ".self_attn.k_norm.weight",
)


def adapt(cfg: dict, tensors: list[tuple[str, callable]]) -> list[tuple[str, callable]]:
    """The generic (HF-named, stacked-expert) tensor list under mlx-lm's names and layouts."""
    prefix = "language_model." if cfg["model_type"] == "qwen3_5_moe_text" else ""
    out = []
    for name, load in tensors:
        if name.endswith("linear_attn.conv1d.weight"):
            load = _conv(load)
        elif name.endswith(ZERO_CENTRED):
            load = _plus_one(load)
        out.append((prefix + name, load))
    return out


def _conv(load):
    def get():
        w = load()
        if w.ndim != 3 or w.shape[1] != 1:
            raise UserError(f"a depthwise conv1d weight is [C, 1, K]; got {list(w.shape)}")
        return np.ascontiguousarray(w.transpose(0, 2, 1))

    return get


def _plus_one(load):
    return lambda: (load() + 1.0).astype(np.float32)


def config(cfg: dict, flat: dict) -> dict:
    """mlx-lm's config for a hybrid model from the generic MLX config `flat` (HF keys, top-level θ)."""
    mt = cfg["model_type"]
    params = dict(cfg.get("rope_parameters") or {})
    partial = float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    flat = {**flat, "full_attention_interval": _interval(cfg), "partial_rotary_factor": partial}
    if mt == "qwen3_next":
        return flat
    params.setdefault("rope_type", "default")
    params["rope_theta"] = flat["rope_theta"]
    params["partial_rotary_factor"] = partial
    text = {k: v for k, v in flat.items() if k not in ("quantization", "quantization_config")}
    text["rope_parameters"] = params
    top = {"model_type": "qwen3_5_moe", "text_config": text}
    for k in ("tie_word_embeddings", "torch_dtype", "quantization", "quantization_config"):
        if k in flat:
            top[k] = flat[k]
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if flat.get(k) is not None:
            top[k] = flat[k]
    return top


def _interval(cfg: dict) -> int:
    """mlx-lm's `full_attention_interval` n: layer i is full attention exactly when (i + 1) % n == 0."""
    types = cfg.get("layer_types")
    if not types:
        return int(cfg.get("full_attention_interval", 4))
    n = types.index("full_attention") + 1 if "full_attention" in types else 0
    want = ["full_attention" if n and (i + 1) % n == 0 else "linear_attention" for i in range(len(types))]
    if types != want:
        raise UserError(
            f"MLX export of {cfg['model_type']}: mlx_lm runs full attention on every n-th layer, "
            f"and layer_types {types} is not that pattern"
        )
    return n
