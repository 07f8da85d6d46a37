"""load_quantized: same model as from_pretrained + quantize_model_, streamed from safetensors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from greentune.errors import UserError
from greentune.models.tiny import build_tiny_model
from greentune.quant import QuantExperts3D, QuantLinear, load_quantized, quantize_model_
from greentune.quant.loading import iter_safetensors


def _assert_same(model_dir, fmt, **kw):
    expected = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    counts = quantize_model_(expected, fmt, **kw)
    got = load_quantized(model_dir, fmt, **kw)
    sd_e, sd_g = expected.state_dict(), got.state_dict()
    assert sorted(sd_e) == sorted(sd_g)
    for k in sd_e:
        assert sd_e[k].dtype == sd_g[k].dtype and torch.equal(sd_e[k], sd_g[k]), k
    assert not any(t.is_meta for t in list(got.parameters()) + list(got.buffers()))
    assert not got.training
    ids = torch.randint(0, 500, (2, 20))
    with torch.no_grad():
        assert torch.equal(expected(ids).logits, got(ids).logits)
    return got, counts


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_mixtral_dir", "tiny_qwen2_moe_dir"])
def test_load_matches_from_pretrained(fixture, request):
    """Tiny models (rows of 64/128): Q8_0 throughout; Mixtral's per-expert w1/w2/w3 and
    Qwen-MoE's experts.N.* checkpoint keys are fused into quantised 3D experts."""
    model, counts = _assert_same(request.getfixturevalue(fixture), "q8_0")
    assert counts["fallback"] == 0
    if fixture != "tiny_llama_dir":
        assert isinstance(model.model.layers[1].mlp.experts.down_proj, QuantExperts3D)
        assert model.config._experts_implementation == "eager"


def test_load_q4_k_sharded_and_biases(tmp_path, tokenizer):
    """Rows of 256: real Q4_K; a checkpoint split into shards; Qwen2 attention biases."""
    d = tmp_path / "qwen2"
    model = build_tiny_model("qwen2", d, tokenizer=tokenizer, hidden=256, intermediate=512, layers=1)
    model.save_pretrained(d, max_shard_size="400KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    got, counts = _assert_same(d, "q4_k")
    assert isinstance(got.model.layers[0].self_attn.q_proj, QuantLinear)
    assert got.model.layers[0].self_attn.q_proj.fmt.name == "q4_k"
    assert got.model.layers[0].self_attn.q_proj.bias is not None
    # 7 projections + lm_head (Q6_K, as llama.cpp's Q4_K_M), the token embedding in Q4_K
    assert (counts["linear"], counts["embedding"], counts["fallback"]) == (8, 1, 0)
    assert (got.lm_head.fmt.name, got.model.embed_tokens.fmt.name) == ("q6_k", "q4_k")


def test_tied_embeddings_are_quantised_once(tmp_path, tokenizer):
    """One table, in the head's format (Q8_0 here); the head reads the embedding's bytes."""
    from greentune.models.tiny import tiny_config
    from greentune.quant import QuantEmbedding, QuantTiedHead

    config = tiny_config("llama", vocab_size=len(tokenizer), hidden=64)
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    got, counts = _assert_same(tmp_path, "q8_0")
    assert isinstance(got.model.embed_tokens, QuantEmbedding) and isinstance(got.lm_head, QuantTiedHead)
    assert got.lm_head.qweight is got.model.embed_tokens.qweight
    assert counts["embedding"] == 1 and not any(k.startswith("lm_head") for k in got.state_dict())


def test_tied_embeddings_stay_tied_when_skipped(tmp_path, tokenizer):
    from greentune.models.tiny import tiny_config

    config = tiny_config("llama", vocab_size=len(tokenizer), hidden=64)
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    got, _ = _assert_same(tmp_path, "q8_0", skip=("lm_head",))
    assert got.lm_head.weight is got.model.embed_tokens.weight
    assert not isinstance(got.lm_head, QuantLinear)


def test_skip_and_missing(tiny_llama_dir, tmp_path):
    got = load_quantized(tiny_llama_dir, "q8_0", skip=("mlp",))
    assert isinstance(got.model.layers[0].self_attn.k_proj, QuantLinear)
    assert type(got.model.layers[0].mlp.up_proj) is torch.nn.Linear
    with pytest.raises(UserError, match="not found"):
        load_quantized(tmp_path / "nope", "q8_0")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    with pytest.raises(UserError, match="no .safetensors"):
        load_quantized(tmp_path / "empty", "q8_0")


def test_iter_safetensors_reads_what_safetensors_reads(tiny_mixtral_dir):
    from safetensors.torch import load_file

    expected = load_file(tiny_mixtral_dir / "model.safetensors")
    got = dict(iter_safetensors(tiny_mixtral_dir / "model.safetensors"))
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_iter_safetensors_frees_each_tensor_before_reading_the_next(tiny_mixtral_dir, monkeypatch):
    """A consumer that drops each tensor never has two of them resident: when the next buffer
    is allocated, nothing holds the previous one (the generator used to keep it until then)."""
    import weakref

    from greentune.quant import loading

    buffers, alive_at_alloc = [], []
    real = loading._anonymous_buffer

    def spy(nbytes):
        alive_at_alloc.append(any(ref() is not None for ref in buffers))
        buf = real(nbytes)
        buffers.append(weakref.ref(buf))
        return buf

    monkeypatch.setattr(loading, "_anonymous_buffer", spy)
    n = 0
    for _, tensor in iter_safetensors(tiny_mixtral_dir / "model.safetensors"):
        del tensor
        n += 1
    assert n > 2 and len(alive_at_alloc) == n
    assert not any(alive_at_alloc)
