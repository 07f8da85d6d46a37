"""The family matrix: one row per HF model_type greentune trains and exports.

A row builds a tiny config from transformers' own config class (`make(vocab, ids, hidden,
intermediate)`), names the LoRA targets and what the GGUF reader needs to undo the
export: `arch` (the expected `general.architecture`, None where GGUF export is not
supported yet), `interleaved` (q/k rows permuted for llama-style rope) and `norm_offset`
(Gemma stores 1 + w). `f32_atol` / `q_atol` are the llama.cpp-vs-PyTorch log-prob
tolerances (f32 file / quantised file on its own weights; see test_family_matrix for the
Gemma values; MoE rows 0.5, their ×16 routers feed larger activations into that rounding).
`mlx_atol` bounds mlx_lm's float32 logits against PyTorch's (1e-4; 3e-4 for the hybrids, whose
float32 forward PyTorch itself computes only to ~1e-4 of its float64 one, see `_hybrid`);
`mlx_q_frac` the 4-bit float16 export's against PyTorch on its weights, × the largest logit.
Adding a family is one row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import transformers as tf


@dataclass(frozen=True)
class Row:
    model_type: str
    make: Callable[..., tf.PretrainedConfig]
    arch: str | None
    moe: bool = False
    interleaved: bool = False
    norm_offset: float = 0.0
    f32_atol: float = 1e-4
    q_atol: float = 0.3
    mlx: bool = True  # False: `greentune export --format mlx` refuses it in one line
    mlx_atol: float = 1e-4
    mlx_q_frac: float = 0.05
    v_tiled: bool = False  # hybrids: the GGUF holds value heads tiled over key heads (gguf_inverse)
    # quantised files: PyTorch rounds matmul inputs as llama.cpp does (`ggml_activations`; the
    # hybrids' delta net turns that rounding alone into ~1 in log-probability)
    ggml_activations: bool = False

    @property
    def targets(self) -> list[str]:
        return ["attn", "experts"] if self.moe else ["attn", "mlp"]


def _common(vocab, ids, hidden, intermediate, head_dim=True, layers=2):
    kw = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=intermediate,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        **ids,
    )
    if head_dim:
        kw["head_dim"] = hidden // 4
    return kw


def _moe(intermediate, **extra):
    return dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=intermediate, **extra)


ROWS = [
    Row("llama", lambda v, i, h, f: tf.LlamaConfig(**_common(v, i, h, f)), "llama", interleaved=True),
    Row(
        "mistral",
        lambda v, i, h, f: tf.MistralConfig(**_common(v, i, h, f), sliding_window=None),
        "llama",
        interleaved=True,
    ),
    Row(
        "qwen2",
        lambda v, i, h, f: tf.Qwen2Config(**_common(v, i, h, f, head_dim=False)),
        "llama",
        interleaved=True,
    ),
    Row("qwen3", lambda v, i, h, f: tf.Qwen3Config(**_common(v, i, h, f)), "qwen3"),
    Row(
        "gemma2",
        lambda v, i, h, f: tf.Gemma2Config(
            **{**_common(v, i, h, f), "tie_word_embeddings": True},
            query_pre_attn_scalar=h // 4,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        ),
        "gemma2",
        norm_offset=1.0,
        f32_atol=5e-4,
        q_atol=0.75,
    ),
    # 6 layers: five sliding (rope θ 1e4) and one full (θ 1e6), the pattern llama.cpp and mlx-lm assume
    Row(
        "gemma3_text",
        lambda v, i, h, f: tf.Gemma3TextConfig(
            **{**_common(v, i, h, f, layers=6), "tie_word_embeddings": True}, query_pre_attn_scalar=h // 4
        ),
        "gemma3",
        norm_offset=1.0,
        f32_atol=2e-3,
        q_atol=0.75,
    ),
    Row(
        "phi3",
        lambda v, i, h, f: tf.Phi3Config(**_common(v, i, h, f, head_dim=False), sliding_window=None),
        "phi3",
    ),
    Row("olmo2", lambda v, i, h, f: tf.Olmo2Config(**_common(v, i, h, f, head_dim=False)), "olmo2"),
    Row(
        "granite",
        lambda v, i, h, f: tf.GraniteConfig(
            **_common(v, i, h, f, head_dim=False),
            embedding_multiplier=4.0,
            residual_multiplier=0.5,
            attention_multiplier=0.1,
            logits_scaling=2.0,
        ),
        "granite",
        interleaved=True,
    ),
    Row(
        "mixtral",
        lambda v, i, h, f: tf.MixtralConfig(
            **_common(v, i, h, f), num_local_experts=4, num_experts_per_tok=2, sliding_window=None
        ),
        "llama",
        moe=True,
        interleaved=True,
        q_atol=0.5,
    ),
    Row(
        "qwen2_moe",
        lambda v, i, h, f: tf.Qwen2MoeConfig(
            **_common(v, i, h, f, head_dim=False),
            **_moe(f, shared_expert_intermediate_size=f, norm_topk_prob=False),
            decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
        "qwen2moe",
        moe=True,
        q_atol=0.75,
    ),  # + shared expert
    Row(
        "qwen3_moe",
        lambda v, i, h, f: tf.Qwen3MoeConfig(
            **_common(v, i, h, f), **_moe(f, norm_topk_prob=True), decoder_sparse_step=1, mlp_only_layers=[]
        ),
        "qwen3moe",
        moe=True,
        q_atol=0.5,
    ),
    Row(
        "olmoe",
        lambda v, i, h, f: tf.OlmoeConfig(
            **{**_common(v, i, h, f, head_dim=False), "num_key_value_heads": 4},
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
        "olmoe",
        moe=True,
        q_atol=0.5,
    ),
]
# gpt-oss: 2 layers, sliding (window 8, shorter than the test's sequences) then full; YaRN as
# the published models (factor 32 over 8 original positions here); q/k/v/o and expert biases,
# attention sinks, clamped SwiGLU (conftest randomises biases and sinks so all of them matter).
ROWS.append(
    Row(
        "gpt_oss",
        lambda v, i, h, f: tf.GptOssConfig(
            **_common(v, i, h, f),
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 32.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 8,
            },
        ),
        "gpt-oss",
        moe=True,
        q_atol=0.5,
    )
)


def _deepseek_v3(v, i, h, f):
    """Multi-head latent attention (q_a/q_b, kv_a_proj_with_mqa, kv_b_proj), a sigmoid router
    with correction bias choosing 2 of 4 experts within the best of 2 groups, one shared
    expert, first layer dense; every matrix input a whole number of Q4_K blocks."""
    kw = _common(v, i, h, f, head_dim=False, layers=3)
    kw["num_key_value_heads"] = 4
    return tf.DeepseekV3Config(
        **kw,
        moe_intermediate_size=f,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        q_lora_rank=h,
        kv_lora_rank=h,
        qk_nope_head_dim=64,  # mlx-lm re-quantises the k half of kv_b_proj along it: one 64-group
        qk_rope_head_dim=32,
        v_head_dim=h // 4,
    )


def _glm4_moe(v, i, h, f):
    """GLM-4.5's layout: q/k/v biases, per-head q/k norms, half-rotary heads, a sigmoid router with
    correction bias (one group, as GLM-4.5), one shared expert, first layer dense."""
    kw = _common(v, i, h, f, layers=3)
    return tf.Glm4MoeConfig(
        **kw,
        moe_intermediate_size=f,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        attention_bias=True,
        use_qk_norm=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    )


# DeepSeek-V3-style families (sigmoid, bias-corrected, group-limited routers)
ROWS += [
    Row("deepseek_v3", _deepseek_v3, "deepseek2", moe=True, q_atol=0.5),
    Row("glm4_moe", _glm4_moe, "glm4moe", moe=True, q_atol=0.5),
]
# issue 17, more MoE routers: granite's fused input/output experts and multipliers, phimoe's
# sparsemixer (top-2 in eval) with LayerNorm and biases, ernie's dense first layer, shared
# experts and correction-biased selection
ROWS += [
    Row(
        "granitemoe",
        lambda v, i, h, f: tf.GraniteMoeConfig(
            **_common(v, i, h, f, head_dim=False),
            num_local_experts=4,
            num_experts_per_tok=2,
            embedding_multiplier=4.0,
            residual_multiplier=0.5,
            attention_multiplier=0.1,
            logits_scaling=2.0,
        ),
        "granitemoe",
        moe=True,
        interleaved=True,
        q_atol=0.5,
    ),
    Row(
        "phimoe",
        lambda v, i, h, f: tf.PhimoeConfig(
            **_common(v, i, h, f, head_dim=False),
            num_local_experts=4,
            num_experts_per_tok=2,
            attention_bias=True,
            lm_head_bias=True,
            sliding_window=None,
        ),
        None,  # llama.cpp's phimoe graph is not Phi-3.5-MoE's (gguf_families_moe): refused in one line
        moe=True,
    ),
    Row(
        "ernie4_5_moe",
        lambda v, i, h, f: tf.Ernie4_5_MoeConfig(
            **_common(v, i, h, f, head_dim=False, layers=3),
            moe_num_experts=4,
            moe_k=2,
            moe_intermediate_size=f,
            moe_num_shared_experts=1,
            moe_layer_start_index=1,
            moe_layer_end_index=2,
            moe_layer_interval=1,
        ),
        "ernie4_5-moe",
        moe=True,
        q_atol=0.5,
    ),
]


def _hybrid(cls, v, i, h, f):
    """Three gated-delta-net layers and one full-attention layer (Qwen3-Next's 3:1 pattern).

    Float32 rounding: on the untrained base PyTorch's float32 logits differ from its float64 ones
    by up to 1.0e-4 (max logit ~10), mlx_lm's by 0.8-1.4e-4 (other MoE rows: ~5e-6 and ~1e-5), and
    mlx_lm in float64 (its GatherMM swapped for a matmul) comes within 1-3e-5 of PyTorch in
    float64: two float32 implementations agree to ~1.5e-4 (1.3-1.9e-4 after training), hence
    `mlx_atol` 3e-4; a wrong norm offset or conv1d layout moves logits by far more
    (tests/families/test_mlx_hybrid.py, hidden 128, matches within 1e-4). The same sensitivity in
    float16: mlx_lm runs the 4-bit export (float16 scales, norms) within 14-21% of the largest
    logit of PyTorch on those weights (other rows 0.5-2.7%; PyTorch in float16 2-4%, as it still
    computes the delta-net's g and the norms in float32), so `mlx_q_frac` 0.3; computed in
    float32 the same stored values match to ~3e-4 (other rows <= 3.3e-5)."""
    kw = {**_common(v, i, h, f, layers=4), "num_key_value_heads": 2}
    return cls(
        **kw,
        **_moe(f, shared_expert_intermediate_size=f, norm_topk_prob=True),
        decoder_sparse_step=1,
        mlp_only_layers=[],
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=h // 4,
        linear_value_head_dim=h // 4,
    )


# issue 17, hybrid attention: trained (LoRA on q/k/v/o, the delta-net projections, experts);
# GGUF through llama.cpp's qwen3next / qwen35moe (zero-centred norms stored as 1 + w; Qwen3.5's
# value heads tiled, gguf_hybrid); MLX through mlx_hybrid
# what both hybrid rows share: MoE, 1 + w norms, llama.cpp's activation rounding, looser MLX bounds
_HYBRID_ROW = dict(
    moe=True, norm_offset=1.0, q_atol=0.5, ggml_activations=True, mlx_atol=3e-4, mlx_q_frac=0.3
)
ROWS += [
    Row("qwen3_next", lambda v, i, h, f: _hybrid(tf.Qwen3NextConfig, v, i, h, f), "qwen3next", **_HYBRID_ROW),
    Row(
        "qwen3_5_moe_text",
        lambda v, i, h, f: _hybrid(tf.Qwen3_5MoeTextConfig, v, i, h, f),
        "qwen35moe",
        v_tiled=True,
        **_HYBRID_ROW,
    ),
]
BY_TYPE = {r.model_type: r for r in ROWS}
