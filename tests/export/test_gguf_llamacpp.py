"""GGUF exports run in llama.cpp (xllamacpp) and agree with PyTorch on the same weights.

PyTorch runs the HF model with the GGUF's own tensors dequantised by `gguf.quants` (see
helpers.hf_model_from_gguf). What remains between the two is llama.cpp's arithmetic: f32
is exact to ~1e-5; f16 weights make llama.cpp round activations to f16 (~1e-2 nats); quantised
weights make it quantise activations to 8 bits per block of 32/256 (~0.1 nats with these
deliberately spread-out logits). Each 4-bit export is also compared with the original float
model, to show the tolerance is far below the 4-bit weight error itself (for q8_0 the weight
error and llama.cpp's 8-bit activation error are of the same size). For quantised MoE
exports the comparison stops at the first position where two experts' router logits are
within 0.02 of the top-k boundary: that rounding can route a token to another expert.
"""

from __future__ import annotations

import helpers
import pytest
import torch

pytest.importorskip("xllamacpp", reason="llama.cpp binding (pip install xllamacpp, in the test extra)")

PROMPT = [5, 6, 7, 8, 9, 10, 40, 41]
N_GEN = 20

# (fixture, quant, max |Δ logprob| of the top-5 candidates against PyTorch, ties allowed)
CASES = [
    ("scaled_llama_dir", "f32", 1e-4, 1e-4),
    ("scaled_llama_dir", "f16", 2e-2, 2e-2),
    ("scaled_llama_dir", "q8_0", 0.3, 0.3),
    ("scaled_llama_dir", "q4_0", 0.3, 0.3),
    ("wide_llama_dir", "q4_k_m", 0.3, 0.3),
    ("scaled_mistral_dir", "f16", 2e-2, 2e-2),
    ("scaled_qwen2_dir", "f32", 1e-4, 1e-4),
    ("scaled_mixtral_dir", "f32", 1e-4, 1e-4),
    ("scaled_mixtral_dir", "f16", 2e-2, 2e-2),
    ("scaled_mixtral_dir", "q8_0", 0.3, 0.3),
    ("wide_mixtral_dir", "q4_k_m", 0.3, 0.3),
]


@pytest.mark.parametrize("fixture,quant,atol,tie", CASES, ids=[f"{c[0].split('_')[1]}-{c[1]}" for c in CASES])
def test_llamacpp_matches_pytorch(request, gguf_cache, banned, fixture, quant, atol, tie):
    model_dir = request.getfixturevalue(fixture)
    summary = gguf_cache(model_dir, quant)
    model = helpers.hf_model_from_gguf(summary.path, model_dir)
    llama = helpers.Llama(summary.path)
    moe_q = "mixtral" in fixture and quant not in ("f32", "f16")
    worst, agree, compared = helpers.compare_with_torch(
        llama, model, PROMPT, banned, n=N_GEN, atol=atol, tie=tie, router_margin=0.02 if moe_q else None
    )
    # greedy generation of 20 tokens: every choice is PyTorch's argmax (or a tie within `tie`)
    assert compared == N_GEN or moe_q
    assert agree >= compared - 3, (agree, compared)
    if quant in ("f32", "f16"):
        assert agree == N_GEN
    elif quant.startswith("q4"):
        from transformers import AutoModelForCausalLM

        original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        worst_orig, _, _ = helpers.compare_with_torch(
            llama, original, PROMPT, banned, n=N_GEN, atol=100, tie=100
        )
        assert worst_orig > 3 * worst, (worst_orig, worst)
    llama.close()


def test_q4_k_m_mix(gguf_cache, wide_llama_dir, wide_mixtral_dir):
    """llama.cpp's Q4_K_M choices for 2 layers: use_more_bits(1, 2) holds, (0, 2) does not."""
    types = gguf_cache(wide_llama_dir, "q4_k_m").types
    assert types["output.weight"] == "Q6_K"
    assert types["token_embd.weight"] == "Q4_K"
    assert types["blk.0.attn_v.weight"] == "Q4_K" and types["blk.1.attn_v.weight"] == "Q6_K"
    assert types["blk.0.ffn_down.weight"] == "Q4_K" and types["blk.1.ffn_down.weight"] == "Q6_K"
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["blk.0.ffn_gate.weight"] == "Q4_K"
    assert types["blk.0.attn_norm.weight"] == "F32"
    moe = gguf_cache(wide_mixtral_dir, "q4_k_m").types
    assert moe["blk.0.ffn_gate_inp.weight"] == "F32"
    assert moe["blk.1.ffn_down_exps.weight"] == "Q6_K" and moe["blk.0.ffn_up_exps.weight"] == "Q4_K"


def test_q4_k_m_falls_back_on_short_rows(gguf_cache, scaled_llama_dir):
    """Rows of 64/128 are not whole 256-blocks: Q4_K → Q5_0, Q6_K → Q8_0, as llama.cpp does."""
    s = gguf_cache(scaled_llama_dir, "q4_k_m")
    assert s.types["blk.0.attn_q.weight"] == "Q5_0"
    assert s.types["blk.1.attn_v.weight"] == "Q8_0"
    assert s.types["output.weight"] == "Q8_0"
    llama = helpers.Llama(s.path)
    assert len(llama.greedy(PROMPT, 4)) == 4
    llama.close()


def test_bits_per_weight(gguf_cache, wide_llama_dir):
    bpw = {q: gguf_cache(wide_llama_dir, q).bits_per_weight for q in ("f16", "q8_0", "q4_0", "q4_k_m")}
    assert 16.0 <= bpw["f16"] < 16.1  # norms stay f32
    assert 8.5 <= bpw["q8_0"] < 8.6
    assert 4.5 <= bpw["q4_0"] < 5.0  # output.weight at Q6_K (6.56 bpw)
    assert 4.5 < bpw["q4_k_m"] < 5.5


def test_tokenizer_matches_hf_in_llamacpp(gguf_cache, scaled_llama_dir, tokenizer):
    """Byte-level BPE with pre-tokenizer "gpt-2": llama.cpp splits text exactly as HF."""
    llama = helpers.Llama(gguf_cache(scaled_llama_dir, "f16").path)
    for text in [
        "Return the list of   items.\n\nArgs:\n    x: an int",
        "naïve café ☃ 123456 x",
        "def f(a, b):\n\treturn a+b  # it's",
        "<|user|>\nhi<|end|>\n",
    ]:
        assert (
            llama.tokenize(text, add_special=False) == tokenizer(text, add_special_tokens=False)["input_ids"]
        )
    llama.close()


def test_sentencepiece_tokenizer_in_llamacpp(spm_llama_dir, tmp_path):
    """BPE with byte fallback and "▁" → tokenizer.ggml.model "llama" with scores; llama.cpp tokenizes
    (including <0xNN> byte fallback and the BOS HF adds) exactly as HF."""
    from transformers import AutoTokenizer

    from greentune.export import export_gguf

    tok = AutoTokenizer.from_pretrained(spm_llama_dir)
    s = export_gguf(spm_llama_dir, tmp_path / "spm.gguf", "f16")
    assert s.vocab["model"] == "llama" and s.vocab["add_bos"] is True
    llama = helpers.Llama(s.path)
    for text in [
        "Hello world, naïve café ☃ x",
        "Return the list of   items.\n\nArgs:\n    x: an int",
        " leading space",
        "Ünïcödé → ∑ 漢字",
    ]:
        assert llama.tokenize(text) == tok(text)["input_ids"], text
    llama.close()


def test_llama3_rope_scaling(tmp_path, scaled_llama_dir, banned):
    """rope_type "llama3" (Llama 3.1/3.2) is written as llama.cpp's rope_freqs tensor."""
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    from greentune.export import export_gguf

    d = tmp_path / "llama3-rope"
    shutil.copytree(scaled_llama_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    (d / "config.json").write_text(json.dumps(cfg))
    s = export_gguf(d, tmp_path / "r.gguf", "f32")
    assert "rope_freqs.weight" in s.types
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(scaled_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():  # the scaling does change this model's outputs
        ids = torch.tensor([PROMPT])
        assert (model(ids).logits - plain(ids).logits).abs().max() > 1e-2
    llama = helpers.Llama(s.path)
    worst, agree, _ = helpers.compare_with_torch(llama, model, PROMPT, banned, n=N_GEN, atol=1e-4, tie=1e-4)
    assert agree == N_GEN
    llama.close()


def test_generate_helper(gguf_cache, scaled_llama_dir, tokenizer):
    from greentune.export import llamacpp

    assert llamacpp.available()
    out = llamacpp.generate(gguf_cache(scaled_llama_dir, "q8_0").path, "Return the", max_tokens=8)
    assert out.seconds > 0 and isinstance(out.text, str)
    assert out.n_tokens == 8 and out.tokens_per_second > 0
