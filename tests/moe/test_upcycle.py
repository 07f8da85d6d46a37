"""Upcycling a dense Llama into a Mixtral: equal logits at init, loads with plain transformers."""

import pytest
import torch
import transformers as tf

from greentune.errors import UserError
from greentune.moe.upcycle import upcycle


@pytest.mark.parametrize("router_init", ["normal", "zeros"])
def test_upcycled_equals_dense_and_loads_as_mixtral(tiny_llama_dir, tmp_path, router_init):
    out = upcycle(tiny_llama_dir, tmp_path / "moe", experts=4, top_k=2, router_init=router_init)
    assert out == tmp_path / "moe"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".moe.*"))  # no temporary folder left behind
    dense = tf.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    moe = tf.MixtralForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert moe.config.num_local_experts == 4 and moe.config.num_experts_per_tok == 2
    ids = torch.randint(0, dense.config.vocab_size, (2, 24))
    torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=0)
    experts = moe.model.layers[0].mlp.experts
    assert torch.equal(experts.gate_up_proj[3], experts.gate_up_proj[0])
    router = moe.model.layers[0].mlp.gate.weight
    assert (router.abs().sum() == 0) == (router_init == "zeros")
    tok = tf.AutoTokenizer.from_pretrained(out)
    assert tok("hello").input_ids == tf.AutoTokenizer.from_pretrained(tiny_llama_dir)("hello").input_ids


def test_top_k_three_of_eight(tiny_llama_dir, tmp_path):
    out = upcycle(tiny_llama_dir, tmp_path / "moe", experts=8, top_k=3)
    dense = tf.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    moe = tf.MixtralForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, dense.config.vocab_size, (1, 16))
    torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=0)


def test_rejects_other_architectures_and_bad_counts(tiny_llama_dir, tiny_mixtral_dir, tmp_path):
    with pytest.raises(UserError, match="cannot upcycle a 'mixtral'"):
        upcycle(tiny_mixtral_dir, tmp_path / "x")
    with pytest.raises(UserError, match="top_k"):
        upcycle(tiny_llama_dir, tmp_path / "x", experts=4, top_k=5)
    with pytest.raises(UserError, match="at least 2"):
        upcycle(tiny_llama_dir, tmp_path / "x", experts=1, top_k=1)
    with pytest.raises(UserError, match="must differ"):
        upcycle(tiny_llama_dir, tiny_llama_dir)
    assert not (tmp_path / "x").exists()


def test_mistral_upcycles(tokenizer, tmp_path):
    from greentune.models.tiny import build_tiny_model

    build_tiny_model("mistral", tmp_path / "dense", tokenizer=tokenizer)
    out = upcycle(tmp_path / "dense", tmp_path / "moe", experts=2, top_k=1)
    dense = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    moe = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(moe).__name__ == "MixtralForCausalLM"
    ids = torch.randint(0, dense.config.vocab_size, (1, 16))
    torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=0)
