"""MLX export: a folder `mlx_lm.load()` reads on Apple silicon, unquantised or affine-quantised.

    from greentune.export import write_mlx
    write_mlx("runs/x/merged", "runs/x/export/mlx", bits=4, group_size=64)

Layout (mlx-lm 0.32): `config.json` (the HF config plus top-level `rope_theta`, which
mlx-lm's model args read instead of transformers-v5 `rope_parameters`, and
`"quantization": {"group_size": g, "bits": b}`), `model.safetensors`, tokenizer files.

Affine quantisation, as MLX documents it: each group of `g` consecutive weights along the
input dimension gets a scale s = (max − min)/(2^b − 1) and a bias β = min;
q = round((w − β)/s) ∈ [0, 2^b − 1] and ŵ = s·q + β. Each row's q values are packed into
uint32 words from the low bits up (value k of a row occupies bits [k·b, (k+1)·b) of the row's
little-endian bit stream, which for b = 4 is 8 values per word, the first in bits 0–3).
Stored as `<module>.weight` uint32 [out, in·b/32], `<module>.scales` and `<module>.biases`
[out, in/g].

Quantised: every linear projection, the embedding and lm_head (and the stacked experts)
whose input size is a multiple of `g`. Kept in `dtype`: norms, biases and the MoE router
(a tiny tensor whose errors change which experts run). mlx-lm quantises a module exactly
when `<module>.scales` is present, so this choice loads as written.

MoE: experts are stacked as `<moe>.switch_mlp.{gate,up,down}_proj.*` ([E, out, in]) and the
router stays `<moe>.gate.weight`, where `<moe>` is `model.layers.N.block_sparse_moe` for
Mixtral and `model.layers.N.mlp` for Qwen2-MoE, Qwen3-MoE and OLMoE (mlx-lm's module
paths, also for DeepSeek-V3 and GLM-4.5, whose leading dense layers, shared experts and
router bias keep their HF names); Qwen2-MoE's shared expert and its gate keep their HF names.
DeepSeek's `kv_b_proj` is written as mlx-lm's `embed_q` / `unembed_out` (`_mla_split`).
Every other tensor keeps its HF name (phi3's fused qkv_proj / gate_up_proj included), which
is what mlx-lm's models read. Gemma-3's per-layer-type rope thetas become mlx-lm's
`rope_theta` (full layers) and `rope_local_base_freq` (sliding layers).

Hybrid linear attention (Qwen3-Next, Qwen3.5-MoE text): experts stacked under `mlp` as above,
the shared expert and its gate under their HF names. mlx-lm converts norms and conv1d only for
the hub's layout, so `mlx_hybrid` writes what its model holds after `sanitize`: the
zero-centred norms as 1 + w (the delta-net's gated `linear_attn.norm` as is), conv1d as
[C, K, 1], Qwen3.5 under `language_model.` with a `qwen3_5_moe` config nesting `text_config`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from greentune.errors import UserError
from greentune.export import mlx_hybrid
from greentune.export.source import ModelSource, Packed, rope_settings
from greentune.fsutil import atomic_dir

log = logging.getLogger(__name__)

# model_type -> module path of its MoE block ("" for dense families)
SUPPORTED = {
    "llama": "",
    "mistral": "",
    "qwen2": "",
    "qwen3": "",
    "gemma2": "",
    "gemma3_text": "",
    "phi3": "",
    "olmo2": "",
    "granite": "",
    "mixtral": "block_sparse_moe",
    "qwen2_moe": "mlp",
    "qwen3_moe": "mlp",
    "olmoe": "mlp",
    "gpt_oss": "mlp.experts",  # its own tensor list: `mlx_gpt_oss`
    "deepseek_v3": "mlp",  # mlx-lm splits kv_b_proj into embed_q / unembed_out itself
    "glm4_moe": "mlp",
    # issue 17 (mlx_lm's granitemoe, phimoe, ernie4_5_moe)
    "granitemoe": "block_sparse_moe",
    "phimoe": "block_sparse_moe",
    "ernie4_5_moe": "mlp",
    # issue 17, hybrid linear attention: norms, conv1d and names adapted in `mlx_hybrid`
    "qwen3_next": "mlp",
    "qwen3_5_moe_text": "mlp",
}
# Trained but not exported to MLX: what the writer lacks (one line at export and at train time)
NOT_EXPORTED: dict[str, str] = {}
# mlx-lm's router module under `<moe>`, where it is not `gate`
ROUTER = {"granitemoe": "router.layer"}
BITS = (2, 3, 4, 5, 6, 8)


def quantize_affine(w: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float [..., K] → (uint32 [..., K·bits/32], scales [..., K/g], biases [..., K/g]) as MLX stores."""
    *lead, k = w.shape
    g = w.reshape(*lead, k // group_size, group_size).astype(np.float32)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    levels = (1 << bits) - 1
    scale = (hi - lo) / levels
    safe = np.where(scale == 0, 1.0, scale)
    q = np.clip(np.rint((g - lo) / safe), 0, levels).astype(np.uint8).reshape(*lead, k)
    return pack_bits(q, bits), scale[..., 0], lo[..., 0]


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned `bits`-bit values (last axis) into uint32 words, low bits first."""
    *lead, k = q.shape
    if (k * bits) % 32:
        raise UserError(f"a row of {k} values of {bits} bits is not a whole number of 32-bit words")
    stream = np.unpackbits(q[..., None], axis=-1, bitorder="little")[..., :bits]  # [..., K, bits]
    packed = np.packbits(stream.reshape(*lead, k * bits), axis=-1, bitorder="little")  # bytes
    return np.ascontiguousarray(packed).view("<u4")


def unpack_bits(p: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of `pack_bits`: uint32 [..., K·bits/32] → uint8 [..., K]."""
    stream = np.unpackbits(np.ascontiguousarray(p).view(np.uint8), axis=-1, bitorder="little")
    vals = stream[..., : k * bits].reshape(*p.shape[:-1], k, bits)
    return (vals * (1 << np.arange(bits, dtype=np.uint16))).sum(-1).astype(np.uint8)


def dequantize_affine(
    p: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int
) -> np.ndarray:
    """ŵ = s·q + β, group by group (MLX's documented formula)."""
    k = scales.shape[-1] * group_size
    q = unpack_bits(p, bits, k).astype(np.float32).reshape(*scales.shape, group_size)
    return (q * scales[..., None] + biases[..., None]).reshape(*scales.shape[:-1], k)


def _mlx_tensors(src: ModelSource) -> list[tuple[str, callable]]:
    """(MLX name, loader of float32 numpy) for every weight, in a stable order."""
    cfg = src.config
    if cfg.get("model_type") == "gpt_oss":
        from greentune.export import mlx_gpt_oss

        return mlx_gpt_oss.tensors(src, _float)
    out = []
    moe = SUPPORTED.get(cfg.get("model_type"), "")
    n_exp = int(
        cfg.get("num_local_experts")
        or cfg.get("num_experts")
        or cfg.get("n_routed_experts")
        or cfg.get("moe_num_experts")
        or 0
    )
    skip = set()
    router_at = ROUTER.get(cfg.get("model_type"), "gate")
    for i in range(cfg["num_hidden_layers"]):
        if not moe or not src.has_experts(i):  # DeepSeek/GLM's leading, ERNIE's dense layers
            continue
        p = f"model.layers.{i}"
        for kind, t in zip(("gate_proj", "up_proj", "down_proj"), range(3)):

            def load(i=i, t=t):
                return _float(src.expert_weights(i, n_exp)[t])

            out.append((f"{p}.{moe}.switch_mlp.{kind}.weight", load))
        for names in src.expert_sources(i, n_exp):
            skip.update(names)
        router = src.router_name(i)
        skip.add(router)
        out.append((f"{p}.{moe}.{router_at}.weight", lambda r=router: _float(src.get(r))))
    for name in src.names():
        if (
            name in skip or "rotary_emb" in name or name.endswith("moe_statics.e_score_correction_bias")
        ):  # see above
            continue
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        if cfg.get("model_type") == "deepseek_v3" and name.endswith("self_attn.kv_b_proj.weight"):
            out += _mla_split(cfg, name, lambda n=name: _float(src.get(n)))
            continue
        out.append((name, lambda n=name: _float(src.get(n))))
    if cfg.get("model_type") in mlx_hybrid.FAMILIES:
        out = mlx_hybrid.adapt(cfg, out)
    return sorted(out, key=lambda x: x[0])


def _mla_split(cfg: dict, name: str, load) -> list[tuple[str, callable]]:
    """DeepSeek's kv_b_proj [n_head·(nope + v), rank] as mlx-lm's model holds it: `embed_q`
    [n_head, rank, nope] (the k rows, transposed) and `unembed_out` [n_head, v, rank]. Written
    split, each quantised along its own input axis, because mlx-lm's loader would otherwise
    dequantise a quantised kv_b_proj and quantise the halves again (a second rounding)."""
    heads, nope = int(cfg["num_attention_heads"]), int(cfg["qk_nope_head_dim"])
    base = name[: -len("kv_b_proj.weight")]

    def per_head():
        w = load()
        return w.reshape(heads, -1, w.shape[-1])

    return [
        (f"{base}embed_q.weight", lambda: np.ascontiguousarray(per_head()[:, :nope].transpose(0, 2, 1))),
        (f"{base}unembed_out.weight", lambda: np.ascontiguousarray(per_head()[:, nope:])),
    ]


def _float(t) -> np.ndarray:
    if isinstance(t, Packed):
        from gguf.quants import dequantize

        return dequantize(t.data, t.ggml_type).astype(np.float32)
    return t


def _quantisable(name: str, shape: tuple[int, ...], group_size: int) -> bool:
    if len(shape) < 2 or not name.endswith(".weight") or shape[-1] % group_size:
        return False
    # routers (and Qwen2-MoE's shared-expert gate) stay in float: their errors change which experts run
    return "norm" not in name and not name.endswith(
        (
            "block_sparse_moe.gate.weight",
            "mlp.gate.weight",
            "shared_expert_gate.weight",
            "mlp.router.weight",
            "router.layer.weight",
        )
    )


def write_mlx(
    model_dir, out_dir, bits: int | None = 4, group_size: int = 64, *, tokenizer=None, dtype: str = "float16"
) -> Path:
    """Write an mlx-lm model folder at `out_dir` (atomically); return its path.

    Args:
        model_dir: HF model directory, or an in-memory model (then pass `tokenizer=`).
        bits: 2, 3, 4, 5, 6 or 8 for affine quantisation; None for unquantised.
        group_size: 32, 64 or 128 weights per scale/bias.
        dtype: "float16", "bfloat16" or "float32" for unquantised tensors, scales and biases.
    """
    if bits is not None and bits not in BITS:
        raise UserError(f"MLX bits must be one of {BITS} or None, got {bits}")
    if group_size not in (32, 64, 128):
        raise UserError(f"MLX group_size must be 32, 64 or 128, got {group_size}")
    tdtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(dtype)
    if tdtype is None:
        raise UserError(f"MLX dtype must be float16, bfloat16 or float32, got {dtype!r}")
    if isinstance(model_dir, (str, Path)):
        src = ModelSource.from_dir(model_dir)
    elif tokenizer is None:
        raise UserError("exporting an in-memory model to MLX needs its tokenizer (tokenizer=...)")
    else:
        src = ModelSource.from_model(model_dir, tokenizer)
    if src.config.get("model_type") in NOT_EXPORTED:
        mt = src.config["model_type"]
        raise UserError(f"MLX export of {mt}: {NOT_EXPORTED[mt]}")
    if src.config.get("model_type") not in SUPPORTED:
        raise UserError(
            f"MLX export supports {sorted(SUPPORTED)}; this model is {src.config.get('model_type')!r}"
        )
    _check_mlx_runs_it(src)

    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    n_quant = 0
    for name, load in _mlx_tensors(src):
        w = load()
        if bits is not None and _quantisable(name, w.shape, group_size):
            q, s, b = quantize_affine(w, bits, group_size)
            base = name[: -len(".weight")]
            tensors[f"{base}.weight"] = torch.from_numpy(q.view(np.int32)).view(torch.uint32)
            tensors[f"{base}.scales"] = torch.from_numpy(s).to(tdtype)
            tensors[f"{base}.biases"] = torch.from_numpy(b).to(tdtype)
            n_quant += 1
        else:
            tensors[name] = torch.from_numpy(np.ascontiguousarray(w)).to(tdtype)

    config = _mlx_config(src.config, bits, group_size, dtype)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "mlx"})
        (tmp / "config.json").write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        src.tokenizer.save_pretrained(tmp)
    log.info("wrote MLX model %s (%d tensors quantised to %s bits)", out_dir, n_quant, bits)
    return out_dir


def _check_mlx_runs_it(src: ModelSource) -> None:
    """UserError for weights mlx-lm's model would silently drop: its ernie4_5_moe removes the
    experts' selection bias (`e_score_correction_bias`) and routes without it."""
    for name in src.names():
        if name.endswith("moe_statics.e_score_correction_bias") and np.any(src.get(name) != 0):
            raise UserError(
                f"MLX export of {src.config.get('model_type')}: mlx_lm drops {name} (nonzero), so it "
                "would route tokens to other experts; export to GGUF instead (llama.cpp applies it)"
            )


def _mlx_config(cfg: dict, bits: int | None, group_size: int, dtype: str) -> dict:
    config = {k: v for k, v in cfg.items() if k not in ("quantization", "quantization_config")}
    theta, scaling = rope_settings(cfg)
    config["rope_theta"] = theta
    local = ((cfg.get("rope_parameters") or {}).get("sliding_attention") or {}).get("rope_theta")
    if local is not None:
        config["rope_local_base_freq"] = float(local)
    if scaling:
        config["rope_scaling"] = scaling
    partial = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor")
    if cfg.get("model_type") == "glm4_moe":  # mlx-lm's glm4_moe args have no defaults for these
        config["partial_rotary_factor"] = float(partial or cfg.get("partial_rotary_factor") or 1.0)
        config.setdefault("rope_scaling", None)
    config.pop("rope_parameters", None)
    if SUPPORTED.get(cfg.get("model_type")) == "mlp" and "num_local_experts" in config:
        config.setdefault(
            "num_experts", config["num_local_experts"]
        )  # v5 Qwen3-MoE's spelling; mlx-lm reads this
    config["torch_dtype"] = dtype
    config.pop("dtype", None)
    if bits is not None:
        config["quantization"] = {"group_size": group_size, "bits": bits}
        config["quantization_config"] = dict(config["quantization"])
    if cfg.get("model_type") in mlx_hybrid.FAMILIES:
        config = mlx_hybrid.config(cfg, config)
    return config
