"""gpt-oss → llama.cpp's `gpt-oss` architecture: its keys, its checks and its expert tensors.

As llama.cpp's converter (`GptOssModel` in convert_hf_to_gguf.py) writes it:

- keys: `gpt-oss.attention.sliding_window`, `gpt-oss.expert_feed_forward_length`, and the
  YaRN rope scaling (`rope.scaling.{type, factor, original_context_length,
  yarn_beta_fast, yarn_beta_slow}`); llama.cpp itself fixes the layer pattern (even
  layers sliding, `set_swa_pattern(2)`) and the clamped SwiGLU (alpha 1.702, limit 7), so a
  model that differs is refused (`check`) rather than written to run differently;
- `blk.N.attn_sinks.weight` [n_head]; `blk.N.ffn_gate_inp.{weight,bias}` (the router);
  q/k/v/o with their biases (NeoX rope: q/k unpermuted);
- experts: HF's `gate_up_proj [E, H, 2I]` (columns interleaved gate/up) and `down_proj
  [E, I, H]` become `ffn_gate_exps` / `ffn_up_exps` [E, I, H] (the even / odd rows of the
  [E, 2I, H] transpose) and `ffn_down_exps` [E, H, I], each with its `.bias` ([E, I] / [E, H]).
  Prequantized experts (the training bytes of `quant_base: mxfp4`, or any block format) are
  already stored [E, out, in]: their rows are split the same way, byte for byte — MXFP4 expert
  tensors are written as they were trained, never quantised a second time.
"""

from __future__ import annotations

import numpy as np
from gguf import MODEL_TENSOR, TENSOR_NAMES, GGUFWriter, RopeScalingType

from greentune.errors import UserError
from greentune.export.source import ModelSource, Tensor, as_packed, take_rows

ALPHA, LIMIT = 1.702, 7.0  # llama.cpp's swiglu_oai constants for gpt-oss


def check(cfg: dict) -> None:
    alpha, limit = float(cfg.get("swiglu_alpha", ALPHA)), float(cfg.get("swiglu_limit", LIMIT))
    if abs(alpha - ALPHA) > 1e-6 or abs(limit - LIMIT) > 1e-6:
        raise UserError(
            f"GGUF export of gpt_oss: swiglu_alpha {alpha} / swiglu_limit {limit} differ from the "
            f"{ALPHA} / {LIMIT} llama.cpp's gpt-oss graph fixes"
        )
    n = cfg["num_hidden_layers"]
    default = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    if cfg.get("layer_types") and list(cfg["layer_types"]) != default:
        raise UserError(
            f"GGUF export of gpt_oss: layer_types {cfg['layer_types']} differ from the alternating "
            "sliding/full pattern (even layers sliding) that llama.cpp uses"
        )
    if not cfg.get("sliding_window"):
        raise UserError("GGUF export of gpt_oss: no sliding_window, which llama.cpp's gpt-oss graph needs")


def keys(w: GGUFWriter, cfg: dict) -> None:
    w.add_sliding_window(int(cfg["sliding_window"]))
    w.add_expert_feed_forward_length(int(cfg["intermediate_size"]))
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) == "yarn":
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        w.add_rope_scaling_yarn_beta_fast(float(rope.get("beta_fast", 32.0)))
        w.add_rope_scaling_yarn_beta_slow(float(rope.get("beta_slow", 1.0)))


def _out_in(src: ModelSource, name: str) -> Tensor:
    """An experts tensor as [E, out, in]: prequantized bytes are stored so already; HF's float
    parameter [E, in, out] is transposed."""
    pre = src.prequantized_entry(name)
    if pre is not None:
        E, inp, out = src.torch_shape(name)
        return as_packed(pre[0], pre[1], (E, out, inp))
    return np.ascontiguousarray(src.get(name).transpose(0, 2, 1))


def experts(out: list, src: ModelSource, arch, i: int) -> None:
    """Append layer i's expert tensors (weights and biases) as `gguf_tensors.PlannedTensor`s."""
    from greentune.export.gguf_tensors import PlannedTensor

    p = f"model.layers.{i}.mlp.experts"
    gu, dn = f"{p}.gate_up_proj", f"{p}.down_proj"
    E, ff, h = arch.n_expert, arch.n_ff, arch.n_embd
    cache: dict[str, Tensor] = {}

    def gate_up(half: int):
        def load() -> Tensor:
            if "gu" not in cache:
                cache["gu"] = _out_in(src, gu)
            t = take_rows(cache["gu"], slice(half, None, 2))
            if half == 1:
                cache.clear()
            return t

        return load

    def bias(name: str, half: int | None):
        def load() -> np.ndarray:
            b = src.get(name)
            return np.ascontiguousarray(b if half is None else b[..., half::2])

        return load

    def name(tensor, suffix: str) -> str:
        return TENSOR_NAMES[tensor].format(bid=i) + suffix

    gate, up, down = MODEL_TENSOR.FFN_GATE_EXP, MODEL_TENSOR.FFN_UP_EXP, MODEL_TENSOR.FFN_DOWN_EXP
    out += [
        PlannedTensor(name(gate, ".weight"), (E, ff, h), gate_up(0), i, (gu,)),
        PlannedTensor(name(up, ".weight"), (E, ff, h), gate_up(1), i, (gu,)),
        PlannedTensor(name(down, ".weight"), (E, h, ff), lambda: _out_in(src, dn), i, (dn,)),
        PlannedTensor(name(gate, ".bias"), (E, ff), bias(f"{gu}_bias", 0), i, (f"{gu}_bias",)),
        PlannedTensor(name(up, ".bias"), (E, ff), bias(f"{gu}_bias", 1), i, (f"{gu}_bias",)),
        PlannedTensor(name(down, ".bias"), (E, h), bias(f"{dn}_bias", None), i, (f"{dn}_bias",)),
    ]
