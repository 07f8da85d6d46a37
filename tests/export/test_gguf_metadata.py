"""GGUF files re-read with gguf.GGUFReader: metadata, shapes, types, prequantized bytes, errors."""

from __future__ import annotations

import json

import helpers
import numpy as np
import pytest
import torch
from gguf import GGUFReader

from greentune.errors import UserError
from greentune.export import export_gguf, write_gguf
from greentune.export.gguf_tensors import qk_permutation
from greentune.models.tiny import CHAT_TEMPLATE


def _raw(path):
    r = GGUFReader(path)
    return r, {t.name: t for t in r.tensors}


def test_llama_metadata_and_shapes(gguf_cache, scaled_llama_dir, tokenizer):
    meta, tensors, types = helpers.read_gguf(gguf_cache(scaled_llama_dir, "q8_0").path)
    assert meta["general.architecture"] == "llama"
    expected = {
        "llama.context_length": 256,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": 128,
        "llama.rope.dimension_count": 16,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.vocab_size": len(tokenizer),
        "general.quantization_version": 2,
        "general.file_type": 7,
    }
    for k, v in expected.items():
        assert meta[k] == v, k
    assert meta["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert "llama.expert_count" not in meta
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert len(meta["tokenizer.ggml.tokens"]) == len(tokenizer)
    assert meta["tokenizer.ggml.tokens"][300] == tokenizer.convert_ids_to_tokens(300)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert len(meta["tokenizer.ggml.merges"]) == len(merges) > 200
    assert (
        meta["tokenizer.ggml.merges"][0] == " ".join(merges[0]) if isinstance(merges[0], list) else merges[0]
    )
    assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert meta["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids("<|end|>")
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE
    tt = meta["tokenizer.ggml.token_type"]
    assert tt[tokenizer.bos_token_id] == 3 and tt[300] == 1
    assert tensors["token_embd.weight"].shape == (len(tokenizer), 64)
    assert tensors["blk.1.attn_k.weight"].shape == (32, 64)
    assert tensors["blk.0.ffn_down.weight"].shape == (64, 128)
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert len(tensors) == 3 + 2 * 9


def test_unquantised_has_no_quantization_version(gguf_cache, scaled_llama_dir):
    meta, _, types = helpers.read_gguf(gguf_cache(scaled_llama_dir, "f16").path)
    assert "general.quantization_version" not in meta and meta["general.file_type"] == 1
    assert types["blk.0.attn_q.weight"] == "F16" and types["output_norm.weight"] == "F32"


def test_mixtral_metadata_and_expert_stacking(gguf_cache, scaled_mixtral_dir):
    from safetensors import safe_open

    meta, t, _ = helpers.read_gguf(gguf_cache(scaled_mixtral_dir, "f32").path)
    assert meta["llama.expert_count"] == 4 and meta["llama.expert_used_count"] == 2
    assert meta["llama.rope.freq_base"] == pytest.approx(1e6)
    assert t["blk.0.ffn_gate_exps.weight"].shape == (4, 128, 64)
    assert t["blk.0.ffn_up_exps.weight"].shape == (4, 128, 64)
    assert t["blk.0.ffn_down_exps.weight"].shape == (4, 64, 128)
    assert t["blk.0.ffn_gate_inp.weight"].shape == (4, 64)
    with safe_open(scaled_mixtral_dir / "model.safetensors", "pt") as f:
        p = "model.layers.1.block_sparse_moe.experts.2"
        np.testing.assert_array_equal(
            t["blk.1.ffn_gate_exps.weight"][2], f.get_tensor(f"{p}.w1.weight").numpy()
        )
        np.testing.assert_array_equal(
            t["blk.1.ffn_up_exps.weight"][2], f.get_tensor(f"{p}.w3.weight").numpy()
        )
        np.testing.assert_array_equal(
            t["blk.1.ffn_down_exps.weight"][2], f.get_tensor(f"{p}.w2.weight").numpy()
        )
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight").numpy()
        np.testing.assert_array_equal(t["blk.0.attn_q.weight"], q[qk_permutation(64, 4)])


def test_in_memory_fused_experts_give_the_same_file(tmp_path, scaled_mixtral_dir, tokenizer):
    """transformers v5 fuses experts in memory (gate_up_proj [E, 2I, H]); the export is byte-identical."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(scaled_mixtral_dir, dtype=torch.float32)
    assert "model.layers.0.mlp.experts.gate_up_proj" in model.state_dict()
    a = write_gguf(scaled_mixtral_dir, tmp_path / "a.gguf", "q8_0", name="m")
    b = write_gguf(model, tmp_path / "b.gguf", "q8_0", tokenizer=tokenizer, name="m")
    assert a.read_bytes() == b.read_bytes()


def test_prequantized_tensors_are_written_byte_for_byte(tmp_path, scaled_mixtral_dir):
    """Train on what you ship: given block bytes are copied (rows permuted for q, stacked for experts)."""
    from safetensors import safe_open

    from greentune.quant.formats import get_format

    pre, raw = {}, {}
    with safe_open(scaled_mixtral_dir / "model.safetensors", "pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        raw["q"] = get_format("q4_0").quantize(q).numpy()
        pre["model.layers.0.self_attn.q_proj.weight"] = ("q4_0", raw["q"].tobytes())
        ws = [f.get_tensor(f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight") for e in range(4)]
        raw["w1"] = [get_format("q8_0").quantize(w).numpy() for w in ws]
        for e in range(4):
            pre[f"model.layers.1.block_sparse_moe.experts.{e}.w1.weight"] = (get_format("q8_0"), raw["w1"][e])
    s = export_gguf(scaled_mixtral_dir, tmp_path / "pre.gguf", "f16", prequantized=pre)
    assert s.types["blk.0.attn_q.weight"] == "Q4_0" and s.types["blk.1.ffn_gate_exps.weight"] == "Q8_0"
    assert s.types["blk.1.attn_q.weight"] == "F16"
    _, t = _raw(s.path)
    np.testing.assert_array_equal(np.asarray(t["blk.0.attn_q.weight"].data), raw["q"][qk_permutation(64, 4)])
    np.testing.assert_array_equal(np.asarray(t["blk.1.ffn_gate_exps.weight"].data), np.stack(raw["w1"]))


def test_prequantized_must_cover_all_experts(tmp_path, scaled_mixtral_dir):
    from greentune.quant.formats import get_format

    w = torch.zeros(128, 64)
    pre = {"model.layers.1.block_sparse_moe.experts.0.w1.weight": ("q8_0", get_format("q8_0").quantize(w))}
    with pytest.raises(UserError, match="all or none"):
        write_gguf(scaled_mixtral_dir, tmp_path / "x.gguf", "f16", prequantized=pre)


def test_user_errors(tmp_path, scaled_llama_dir, tokenizer):
    from safetensors.torch import save_file
    from transformers import GPT2Config, GptOssConfig

    with pytest.raises(UserError, match="unknown GGUF quant"):
        write_gguf(scaled_llama_dir, tmp_path / "x.gguf", "q3_k")
    gpt2 = tmp_path / "gpt2"  # no GGUF mapping: refused from its config alone
    GPT2Config().save_pretrained(gpt2)
    save_file({"placeholder": torch.zeros(1)}, str(gpt2 / "model.safetensors"))
    tokenizer.save_pretrained(gpt2)
    with pytest.raises(
        UserError, match="GGUF export supports model types .*'qwen3_moe'.*this model is 'gpt2'"
    ):
        write_gguf(gpt2, tmp_path / "x.gguf", "f16")
    gpt_oss = tmp_path / "gpt_oss"  # a clamp llama.cpp's gpt-oss graph does not have: refused
    GptOssConfig(swiglu_limit=5.0).save_pretrained(gpt_oss)
    save_file({"placeholder": torch.zeros(1)}, str(gpt_oss / "model.safetensors"))
    tokenizer.save_pretrained(gpt_oss)
    with pytest.raises(UserError, match="swiglu_limit 5.0 differ"):
        write_gguf(gpt_oss, tmp_path / "x.gguf", "f16")
    with pytest.raises(UserError, match="config.json"):
        write_gguf(tmp_path, tmp_path / "x.gguf")
    with pytest.raises(UserError, match="not a tensor"):
        write_gguf(scaled_llama_dir, tmp_path / "x.gguf", prequantized={"nope.weight": ("q8_0", b"")})
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


def test_unknown_pre_tokenizer_is_refused(tmp_path, scaled_llama_dir, tokenizer):
    import copy

    from tokenizers import pre_tokenizers
    from transformers import AutoModelForCausalLM

    tok = copy.deepcopy(tokenizer)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(use_regex=True)]
    )
    model = AutoModelForCausalLM.from_pretrained(scaled_llama_dir)
    with pytest.raises(UserError, match="tokenizer_pre"):
        write_gguf(model, tmp_path / "x.gguf", tokenizer=tok)
    path = write_gguf(model, tmp_path / "x.gguf", tokenizer=tok, tokenizer_pre="gpt-2")
    assert GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "gpt-2"


@pytest.mark.parametrize(
    "regex,name", [("LLAMA3_REGEX", "llama-bpe"), ("QWEN2_REGEX", "qwen2"), ("O200K_REGEX", "gpt-4o")]
)
def test_pre_tokenizer_names_from_structure(regex, name):
    """Llama-3 / Qwen2 / gpt-oss (o200k) tokenizer.json layout: Split(regex) then ByteLevel without regex."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from greentune.export import gguf_vocab

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(getattr(gguf_vocab, regex)), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    assert gguf_vocab.detect_pre(json.loads(t.to_str())) == name
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    with pytest.raises(UserError):
        gguf_vocab.detect_pre(json.loads(t.to_str()))
