"""GGUF of the DeepSeek-V3-style families: what llama.cpp reads, and the one-line refusals.

The end-to-end checks (train, merge, export, llama.cpp and mlx-lm match PyTorch) are rows of
tests/families; here: the metadata and tensor layout llama.cpp's deepseek2 / glm4moe
loaders require, the "deepseek-v3" pre-tokenizer (a tokenizer built with DeepSeek-V3's
pre-tokenizer tokenizes in llama.cpp exactly as in HF), and configurations refused in one
line instead of written to run differently.
"""

from __future__ import annotations

import json

import helpers
import numpy as np
import pytest
import torch
import transformers as tf

from greentune.errors import UserError
from greentune.export import export_gguf
from greentune.export.gguf_vocab import DEEPSEEK3_REGEXES

pytest.importorskip("xllamacpp", reason="llama.cpp binding (pip install xllamacpp, in the test extra)")


def _deepseek(tokenizer, **extra):
    kw = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        routed_scaling_factor=2.5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    kw.update(extra)
    return tf.DeepseekV3Config(**kw)


def _save(cfg, tokenizer, out):
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory, tokenizer):
    return _save(_deepseek(tokenizer), tokenizer, tmp_path_factory.mktemp("deepseek"))


def test_deepseek2_keys_and_mla_tensors(deepseek_dir, tmp_path):
    s = export_gguf(deepseek_dir, tmp_path / "m.gguf", "f32")
    meta, t, _ = helpers.read_gguf(s.path)
    a = "deepseek2"
    assert meta["general.architecture"] == a
    want = {
        "leading_dense_block_count": 1,
        "expert_count": 4,
        "expert_used_count": 2,
        "expert_shared_count": 1,
        "expert_feed_forward_length": 32,
        "feed_forward_length": 96,
        "expert_gating_func": 2,  # sigmoid
        "expert_weights_norm": True,
        "expert_group_count": 2,
        "expert_group_used_count": 1,
        "attention.head_count_kv": 1,
        "attention.q_lora_rank": 32,
        "attention.kv_lora_rank": 32,
        "attention.key_length": 32 + 8,
        "attention.value_length": 32,
        "attention.key_length_mla": 16 + 8,
        "attention.value_length_mla": 16,
        "rope.dimension_count": 8,
    }
    assert {k: meta[f"{a}.{k}"] for k in want} == want
    assert meta[f"{a}.expert_weights_scale"] == pytest.approx(2.5)
    # layer 0 dense, layer 1 MoE with its bias; kv_b split per head into k_b (transposed) and v_b
    assert "blk.0.ffn_gate.weight" in t and "blk.0.ffn_gate_exps.weight" not in t
    assert t["blk.1.ffn_gate_exps.weight"].shape == (4, 32, 64)
    assert t["blk.1.exp_probs_b.bias"].shape == (4,)
    assert not any("attn_kv_b" in n for n in t)
    from safetensors.torch import load_file

    kv_b = load_file(deepseek_dir / "model.safetensors")["model.layers.1.self_attn.kv_b_proj.weight"]
    per_head = kv_b.numpy().reshape(4, 16 + 16, 32)
    np.testing.assert_array_equal(t["blk.1.attn_k_b.weight"], per_head[:, :16].transpose(0, 2, 1))
    np.testing.assert_array_equal(t["blk.1.attn_v_b.weight"], per_head[:, 16:])


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"rope_interleave": False}, "rope_interleave false"),
        ({"q_lora_rank": None}, "q_lora_rank null"),
        ({"n_group": 3}, "do not split into n_group=3"),
    ],
)
def test_deepseek_configurations_llamacpp_runs_otherwise_are_refused(tokenizer, tmp_path, extra, message):
    cfg = json.loads(_deepseek(tokenizer, **extra).to_json_string())
    from greentune.export.gguf_families import family_of

    with pytest.raises(UserError, match=message):
        family_of(cfg)


def test_softmax_scoring_is_refused(tokenizer):
    from greentune.export.gguf_families import family_of

    cfg = json.loads(_deepseek(tokenizer).to_json_string())
    cfg["scoring_func"] = "softmax"
    with pytest.raises(UserError, match="scoring_func 'softmax' is not sigmoid"):
        family_of(cfg)


def _deepseek_tokenizer(texts, out):
    """A byte-level BPE behind DeepSeek-V3's pre-tokenizer (three isolating splits, then bytes)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in DEEPSEEK3_REGEXES]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>", "<unk>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=special,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts + ["数字 12345 漢字かなカナ。", "x=1+2; y==3!"] * 5, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(out)
    return tf.AutoTokenizer.from_pretrained(out)


def test_deepseek_v3_pre_tokenizer_in_llamacpp(tmp_path, corpus_texts):
    tok = _deepseek_tokenizer(corpus_texts[:200], tmp_path / "tok")
    d = _save(_deepseek(tok), tok, tmp_path / "model")
    s = export_gguf(d, tmp_path / "m.gguf", "f32")
    meta, _, _ = helpers.read_gguf(s.path)
    assert meta["tokenizer.ggml.pre"] == "deepseek-v3"
    llama = helpers.Llama(s.path)
    try:
        for text in [
            "Return the list of   items.\n\nArgs:\n    x: an int",
            "1234567 digits, 3.14159 and 2026",
            "漢字とかなカナ混じり ok",
            "def f(a, b):\n\treturn a+b  # it's naïve",
            "$x^2 + y_1 <= z|w",
        ]:
            assert (
                llama.tokenize(text, add_special=False) == tok(text, add_special_tokens=False)["input_ids"]
            ), text
    finally:
        llama.close()


def test_deepseek_yarn_runs_in_llamacpp_as_in_pytorch(tmp_path, tokenizer, banned):
    """DeepSeek-V3's published rope: YaRN with mscale = mscale_all_dim (×mscale² on the scores)."""
    yarn = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }
    d = _save(
        _deepseek(tokenizer, rope_parameters=yarn, max_position_embeddings=64), tokenizer, tmp_path / "raw"
    )
    d = helpers.scale_weights(d, tmp_path / "scaled", factor=4.0)
    s = export_gguf(d, tmp_path / "m.gguf", "f32")
    meta, _, _ = helpers.read_gguf(s.path)
    assert meta["deepseek2.rope.scaling.type"] == "yarn" and meta["deepseek2.rope.scaling.factor"] == 4.0
    model = tf.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    llama = helpers.Llama(s.path)
    try:
        prompt = list(range(5, 25))  # past original_max_position_embeddings
        _, agree, n = helpers.compare_with_torch(llama, model, prompt, banned, n=12, atol=1e-4, tie=1e-4)
    finally:
        llama.close()
    assert agree == n == 12
