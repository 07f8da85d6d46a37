"""Architecture facts from configs: exact parameter counts against real tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from greentune.errors import UserError
from greentune.models import tiny
from greentune.models.facts import arch_facts

ARCHS = ["llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "olmoe"]

MIXTRAL_8X7B = dict(
    model_type="mixtral",
    architectures=["MixtralForCausalLM"],
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=32768,
    rope_theta=1e6,
    sliding_window=None,
    tie_word_embeddings=False,
)


@pytest.mark.parametrize("arch", ARCHS)
def test_total_params_match_real_tiny_model(arch, tmp_path):
    model = tiny.build_tiny_model(arch, tmp_path, vocab_size=517, layers=3)
    real = sum(p.numel() for p in model.parameters())
    assert arch_facts(tmp_path).total_params == real  # from config.json on disk
    assert arch_facts(model.config).total_params == real  # from a PretrainedConfig
    assert arch_facts(json.loads((tmp_path / "config.json").read_text())).total_params == real


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_active_params_skip_unrouted_experts(arch, tmp_path):
    model = tiny.build_tiny_model(arch, tmp_path, vocab_size=517, experts=4, top_k=2)
    f = arch_facts(model.config)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert f.expert_params == experts
    assert f.active_params == f.total_params - experts // 2  # 2 of 4 experts skipped
    assert (f.experts, f.top_k, f.moe_layers) == (4, 2, 2)


def test_qwen_sparse_step_and_mlp_only_layers():
    import transformers as tf
    from transformers import AutoModelForCausalLM

    common = dict(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
    )
    for cfg in [
        tf.Qwen2MoeConfig(
            **common,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            decoder_sparse_step=2,
            mlp_only_layers=[5],
        ),
        tf.Qwen3MoeConfig(
            **common,
            num_experts=4,
            num_experts_per_tok=1,
            moe_intermediate_size=16,
            decoder_sparse_step=1,
            mlp_only_layers=[0, 1],
            head_dim=8,
        ),
    ]:
        model = AutoModelForCausalLM.from_config(cfg)
        f = arch_facts(cfg)
        assert f.total_params == sum(p.numel() for p in model.parameters())
        assert f.moe_layers == sum(1 for n, _ in model.named_parameters() if n.endswith("experts.down_proj"))


def test_deepseek_v3_mla_and_shared_experts():
    import transformers as tf
    from transformers import AutoModelForCausalLM

    cfg = tf.DeepseekV3Config(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=48,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_shared_experts=1,
        first_k_dense_replace=1,
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_group=1,
        topk_group=1,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    f = arch_facts(cfg)
    assert f.total_params == sum(p.numel() for p in model.parameters())
    assert (f.head_dim, f.v_head_dim, f.moe_layers, f.shared_intermediate) == (16, 8, 2, 16)


def test_mixtral_8x7b_real_config():
    f = arch_facts(MIXTRAL_8X7B)
    h, i, v, L, e = 4096, 14336, 32000, 32, 8
    attn = 2 * h * h + 2 * h * 1024  # q, o: 4096²; k, v: 4096×(8·128)
    expert = 3 * h * i
    per_layer = attn + e * expert + e * h + 2 * h  # + router + 2 RMSNorms
    assert f.total_params == L * per_layer + 2 * v * h + h == 46_702_792_704
    assert f.active_params == f.total_params - L * (e - 2) * expert == 12_879_925_248
    assert round(f.total_params / 1e9, 1) == 46.7 and round(f.active_params / 1e9, 1) == 12.9
    assert f.active_matmul_params == L * (attn + 2 * expert + e * h) + v * h
    assert (f.experts, f.top_k, f.kv_heads, f.head_dim, f.embedding_params) == (8, 2, 8, 128, 2 * v * h)


def test_forward_flops_formula():
    f = arch_facts(tiny.tiny_config("llama", vocab_size=517))
    n_mm = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128) + 517 * 64
    assert f.active_matmul_params == n_mm
    T = 256
    attn = 2 * 2 * 4 * (16 + 16) * (T + 1) / 2  # layers·2·heads·(d_qk+d_v)·(T+1)/2
    assert f.forward_flops_per_token(T) == pytest.approx(2 * n_mm + attn, rel=0, abs=1e-6)
    assert f.attention_flops_per_token(T, causal=False) == pytest.approx(2 * 2 * 4 * 32 * T)


def test_sliding_window_mean_attended():
    f = arch_facts(tiny.tiny_config("llama", vocab_size=517))
    T, W = 10, 4
    assert f.mean_attended(T, window=W) == sum(min(i, W) for i in range(1, T + 1)) / T
    assert f.mean_attended(T) == sum(range(1, T + 1)) / T


def test_tied_embeddings_counted_once():
    import transformers as tf
    from transformers import AutoModelForCausalLM

    cfg = tf.LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    f = arch_facts(cfg)
    assert f.tied_embeddings and f.embedding_params == 300 * 32
    assert f.total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "bad",
    [
        {"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 8},
        {"model_type": "t5", "is_encoder_decoder": True},
        {"hidden_size": 8},
    ],
)
def test_not_a_causal_lm_is_a_user_error(bad):
    with pytest.raises(UserError, match="not a decoder-only causal LM"):
        arch_facts(bad)


def test_missing_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no model config"):
        arch_facts(tmp_path / "nowhere")


def test_upcycled_facts_match_a_real_mixtral():
    dense = arch_facts(tiny.tiny_config("llama", vocab_size=517))
    moe_cfg = tiny.tiny_config("mixtral", vocab_size=517, experts=4, top_k=2)
    up, real = dense.upcycled(4, 2), arch_facts(moe_cfg)
    assert (up.total_params, up.active_params, up.active_matmul_params) == (
        real.total_params,
        real.active_params,
        real.active_matmul_params,
    )
    assert (up.experts, up.top_k, up.moe_layers) == (4, 2, 2)
    with pytest.raises(UserError, match="already a mixture"):
        real.upcycled(4, 2)


def test_config_json_missing_keys_take_class_defaults():
    """Older hub configs omit keys (Qwen1.5-MoE has no qkv_bias): the class default applies."""
    import transformers as tf
    from transformers import AutoModelForCausalLM

    cfg = tf.Qwen2MoeConfig(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
    )
    d = cfg.to_dict()
    d.pop("qkv_bias")
    real = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    assert arch_facts(d).total_params == real


@pytest.mark.parametrize("qk_norm", [True, False])
def test_glm4_moe_counts_match_transformers(qk_norm):
    """GLM-4.5: q/k/v biases, optional per-head q/k norms, shared expert, first layer dense."""
    import transformers as tf
    from transformers import AutoModelForCausalLM

    cfg = tf.Glm4MoeConfig(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=48,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_shared_experts=1,
        first_k_dense_replace=1,
        attention_bias=True,
        use_qk_norm=qk_norm,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    f = arch_facts(cfg)
    assert f.total_params == sum(p.numel() for p in model.parameters())
    assert (f.head_dim, f.moe_layers, f.shared_intermediate, f.experts) == (16, 2, 16, 4)


def test_an_all_moe_config_needs_no_dense_intermediate_size():
    """Qwen3.5-MoE's config (every layer routed) has no `intermediate_size`; a dense layer needs one."""
    import transformers as tf

    cfg = tf.Qwen3_5MoeTextConfig(
        vocab_size=300, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
    ).to_dict()
    assert "intermediate_size" not in cfg
    model = tf.AutoModelForCausalLM.from_config(tf.Qwen3_5MoeTextConfig(**cfg))
    assert arch_facts(cfg).total_params == sum(p.numel() for p in model.parameters())
    with pytest.raises(UserError, match="intermediate_size"):
        arch_facts(
            {
                "model_type": "llama",
                "vocab_size": 300,
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
            }
        )
