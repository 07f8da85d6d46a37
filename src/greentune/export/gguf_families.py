"""Per-family GGUF facts: which llama.cpp architecture runs an HF `model_type`, and how.

One `Family` row per HF `model_type`. Tensor names come from the `gguf` package's own
`TensorNameMap` for the row's `MODEL_ARCH` (the table llama.cpp's converter uses), so a
row only states what differs between families:

- `interleaved_rope`: llama.cpp's "llama"-style graphs (llama, granite) rotate interleaved
  pairs, so q/k rows are permuted (`gguf_tensors.qk_permutation`); the other architectures
  use NeoX rotation, which is HF's half-rotation, and take q/k unchanged;
- `norm_offset`: Gemma's (and the Qwen3-Next / Qwen3.5 hybrids') RMSNorm computes x·(1 + w);
  llama.cpp multiplies by the stored weight, so 1 + w is stored (as llama.cpp's converter does);
- `keys`: architecture keys beyond the common ones (`gguf._add_hparams`), e.g. Granite's
  multipliers, Gemma's sliding window and soft-capping, the MoE expert sizes;
- `check`: refuses, in one line, a configuration whose computation llama.cpp's graph for
  that architecture does not reproduce (rather than writing a file that runs differently);
- `overrides`, `split`, `head_lengths`, `rope_scaling`: for families whose hyper-parameters
  or tensors llama.cpp reads otherwise (DeepSeek-V3's latent attention and YaRN, the
  DeepSeek/GLM router bias and leading dense layers, see `gguf_deepseek`; the hybrids'
  gated delta-net tensors, see `gguf_hybrid`).

llama / mistral / qwen2 / mixtral run as `general.architecture = "llama"` (the graph adds
Qwen2's q/k/v biases; Mixtral's experts are stacked), the rest under their own names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGUFWriter

from greentune.errors import UserError
from greentune.export import gguf_deepseek, gguf_gpt_oss, gguf_hybrid


def _head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def _gemma_check(cfg: dict) -> None:
    # llama.cpp scales queries by 1/sqrt(head_dim) (Gemma's 27B models alone use n_embd/n_head)
    scalar = cfg.get("query_pre_attn_scalar")
    if scalar is not None and scalar != _head_dim(cfg):
        raise UserError(
            f"GGUF export of {cfg['model_type']}: query_pre_attn_scalar {scalar} differs from "
            f"head_dim {_head_dim(cfg)}, which llama.cpp's graph assumes"
        )
    n_layer = cfg["num_hidden_layers"]
    every = 6 if cfg["model_type"] == "gemma3_text" else 2
    default = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n_layer)]
    if cfg.get("layer_types") and list(cfg["layer_types"]) != default:
        raise UserError(
            f"GGUF export of {cfg['model_type']}: layer_types {cfg['layer_types']} differ from the "
            f"sliding/full pattern (every {every}th layer full) that llama.cpp uses"
        )


def _gemma3_check(cfg: dict) -> None:
    _gemma_check(cfg)
    local = ((cfg.get("rope_parameters") or {}).get("sliding_attention") or {}).get(
        "rope_theta", cfg.get("rope_local_base_freq", 10000.0)
    )
    if float(local) != 10000.0:
        raise UserError(
            f"GGUF export of gemma3_text: the sliding layers' rope theta {local} is not 10000, "
            "which llama.cpp fixes for them"
        )
    if cfg.get("final_logit_softcapping") or cfg.get("attn_logit_softcapping"):
        raise UserError("GGUF export of gemma3_text: logit soft-capping is not in llama.cpp's gemma3 graph")


def _gemma3_keys(w: GGUFWriter, cfg: dict) -> None:
    if cfg.get("sliding_window"):
        w.add_sliding_window(int(cfg["sliding_window"]))


def _gemma2_keys(w: GGUFWriter, cfg: dict) -> None:
    _gemma3_keys(w, cfg)
    if cfg.get("attn_logit_softcapping"):
        w.add_attn_logit_softcapping(float(cfg["attn_logit_softcapping"]))
    if cfg.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))


def _phi3_check(cfg: dict) -> None:
    if cfg.get("sliding_window"):
        raise UserError("GGUF export of phi3: a sliding window is not exported yet (set sliding_window null)")


def _phi3_keys(w: GGUFWriter, cfg: dict) -> None:
    orig = cfg.get("original_max_position_embeddings")
    if orig:
        w.add_rope_scaling_orig_ctx_len(int(orig))


def _granite_keys(w: GGUFWriter, cfg: dict) -> None:
    w.add_embedding_scale(float(cfg.get("embedding_multiplier", 1.0)))
    w.add_residual_scale(float(cfg.get("residual_multiplier", 1.0)))
    w.add_attention_scale(float(cfg.get("attention_multiplier", 1.0 / _head_dim(cfg) ** 0.5)))
    w.add_logit_scale(float(cfg.get("logits_scaling", 1.0)))


def _every_layer_moe(cfg: dict) -> None:
    if int(cfg.get("decoder_sparse_step", 1)) != 1 or cfg.get("mlp_only_layers"):
        raise UserError(
            f"GGUF export of {cfg['model_type']}: dense layers among the MoE layers "
            "(decoder_sparse_step / mlp_only_layers) are not exported yet"
        )


def _qwen2moe_check(cfg: dict) -> None:
    _every_layer_moe(cfg)
    if cfg.get("norm_topk_prob"):
        raise UserError(
            "GGUF export of qwen2_moe: llama.cpp's qwen2moe graph does not renormalise the "
            "top-k router weights (norm_topk_prob true)"
        )


def _qwen2moe_keys(w: GGUFWriter, cfg: dict) -> None:
    w.add_expert_feed_forward_length(int(cfg["moe_intermediate_size"]))
    w.add_expert_shared_feed_forward_length(int(cfg["shared_expert_intermediate_size"]))


def _qwen3moe_check(cfg: dict) -> None:
    _every_layer_moe(cfg)
    if not cfg.get("norm_topk_prob", True):
        raise UserError(
            "GGUF export of qwen3_moe: llama.cpp's qwen3moe graph renormalises the top-k router "
            "weights, this model does not (norm_topk_prob false)"
        )


def _qwen3moe_keys(w: GGUFWriter, cfg: dict) -> None:
    w.add_expert_feed_forward_length(int(cfg["moe_intermediate_size"]))


def _olmoe_check(cfg: dict) -> None:
    if cfg.get("num_key_value_heads", cfg["num_attention_heads"]) != cfg["num_attention_heads"]:
        raise UserError(
            "GGUF export of olmoe: llama.cpp's olmoe graph needs num_key_value_heads == "
            "num_attention_heads (its k-norm spans all heads), as published OLMoE models have"
        )
    if cfg.get("norm_topk_prob"):
        raise UserError(
            "GGUF export of olmoe: llama.cpp's olmoe graph does not renormalise the top-k "
            "router weights (norm_topk_prob true)"
        )


@dataclass(frozen=True)
class Family:
    """How llama.cpp runs one HF model_type (see the module docstring)."""

    arch: MODEL_ARCH
    interleaved_rope: bool = False
    norm_offset: float = 0.0
    moe: bool = False
    keys: Callable[[GGUFWriter, dict], None] | None = None
    check: Callable[[dict], None] | None = None
    #: (tensors, source, arch, layer) → appends a layer's expert tensors, for a family whose
    #: experts are not the stacked gate/up/down of `gguf_tensors._experts` (gpt-oss)
    experts: Callable | None = None
    # Arch fields read otherwise than the common way (config → {field: value}); see gguf_deepseek
    overrides: Callable[[dict], dict] | None = None
    # HF tensors stored otherwise: (cfg, hname, layer, shape, load) → [(gguf name, shape, load)] | None
    split: Callable | None = None
    head_lengths: bool = True  # the common attention.{key,value}_length keys (MLA writes its own)
    rope_scaling: tuple[str, ...] = ()  # rope scaling types beyond linear/llama3 that `keys` writes
    moe_layers: Callable[[dict], list[int]] | None = None  # layers with experts (None: all)

    @property
    def name(self) -> str:
        """`general.architecture`, e.g. "qwen3moe"."""
        return MODEL_ARCH_NAMES[self.arch]


FAMILIES: dict[str, Family] = {
    "llama": Family(MODEL_ARCH.LLAMA, interleaved_rope=True),
    "mistral": Family(MODEL_ARCH.LLAMA, interleaved_rope=True),
    "qwen2": Family(MODEL_ARCH.LLAMA, interleaved_rope=True),
    "mixtral": Family(MODEL_ARCH.LLAMA, interleaved_rope=True, moe=True),
    "granite": Family(MODEL_ARCH.GRANITE, interleaved_rope=True, keys=_granite_keys),
    "qwen3": Family(MODEL_ARCH.QWEN3),
    "gemma2": Family(MODEL_ARCH.GEMMA2, norm_offset=1.0, keys=_gemma2_keys, check=_gemma_check),
    "gemma3_text": Family(MODEL_ARCH.GEMMA3, norm_offset=1.0, keys=_gemma3_keys, check=_gemma3_check),
    "phi3": Family(MODEL_ARCH.PHI3, keys=_phi3_keys, check=_phi3_check),
    "olmo2": Family(MODEL_ARCH.OLMO2),
    "qwen2_moe": Family(MODEL_ARCH.QWEN2MOE, moe=True, keys=_qwen2moe_keys, check=_qwen2moe_check),
    "qwen3_moe": Family(MODEL_ARCH.QWEN3MOE, moe=True, keys=_qwen3moe_keys, check=_qwen3moe_check),
    "olmoe": Family(MODEL_ARCH.OLMOE, moe=True, check=_olmoe_check),
    # DeepSeek-V3-style: sigmoid, bias-corrected, group-limited routers (gguf_deepseek)
    "deepseek_v3": Family(
        MODEL_ARCH.DEEPSEEK2,
        moe=True,
        keys=gguf_deepseek.deepseek_keys,
        check=gguf_deepseek.deepseek_check,
        overrides=gguf_deepseek.arch_overrides,
        split=gguf_deepseek.split,
        head_lengths=False,
        rope_scaling=("yarn",),
    ),
    "glm4_moe": Family(
        MODEL_ARCH.GLM4_MOE,
        moe=True,
        keys=gguf_deepseek.glm4moe_keys,
        check=gguf_deepseek.glm4moe_check,
        overrides=gguf_deepseek.arch_overrides,
        split=gguf_deepseek.split,
    ),
}
FAMILIES["gpt_oss"] = Family(
    MODEL_ARCH.GPT_OSS,
    moe=True,
    keys=gguf_gpt_oss.keys,
    check=gguf_gpt_oss.check,
    experts=gguf_gpt_oss.experts,
)


# issue 17: GraniteMoE, PhiMoE, ERNIE-4.5-MoE (their rows live in gguf_families_moe)
from greentune.export.gguf_families_moe import MOE_FAMILIES  # noqa: E402

FAMILIES.update(MOE_FAMILIES)
# issue 17: the hybrid linear-attention MoE families (gated delta net + full attention, gguf_hybrid)
for _mt, _arch in (("qwen3_next", MODEL_ARCH.QWEN3NEXT), ("qwen3_5_moe_text", MODEL_ARCH.QWEN35MOE)):
    FAMILIES[_mt] = Family(
        _arch,
        norm_offset=1.0,
        moe=True,
        keys=gguf_hybrid.keys,
        check=gguf_hybrid.check,
        split=gguf_hybrid.split,
    )


def family_of(cfg: dict) -> Family:
    """The row for `cfg["model_type"]`; UserError naming the supported model types otherwise."""
    mt = cfg.get("model_type")
    fam = FAMILIES.get(mt)
    if fam is None:
        raise UserError(f"GGUF export supports model types {sorted(FAMILIES)}; this model is {mt!r}")
    if fam.check is not None:
        fam.check(cfg)
    return fam
