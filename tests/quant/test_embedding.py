"""Quantised token embedding and lm_head (tied and untied), chunked matmul, native dequantise kernels."""

from __future__ import annotations

import contextlib
import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from greentune.quant import (
    QuantEmbedding,
    QuantLinear,
    QuantTiedHead,
    get_format,
    kernels,
    load_quantized,
    quantize_model_,
)
from greentune.quant.dequantize import dequantize_model_


def _embedding(vocab=300, dim=256, padding_idx=None):
    emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
    with torch.no_grad():
        emb.weight.normal_(0, 0.05)
    return emb


@pytest.mark.parametrize("fmt", ["q4_k", "q6_k", "q8_0", "q4_0", "nf4"])
def test_lookup_equals_the_dequantised_table(fmt):
    emb = _embedding(padding_idx=3)
    q = QuantEmbedding.from_embedding(emb, fmt)
    f = get_format(fmt)
    assert q.qweight.dtype == torch.uint8 and tuple(q.qweight.shape) == f.packed_shape((300, 256))
    table = q.dequantize()
    assert torch.equal(table, f.dequantize(f.quantize(emb.weight), (300, 256)))  # round trip
    ids = torch.tensor([[0, 3, 299, 7], [7, 7, 1, 250]])
    out = q(ids)
    assert out.shape == (2, 4, 256) and out.dtype == torch.float32
    assert torch.equal(out, F.embedding(ids, table))
    assert q.padding_idx == 3
    err = (table - emb.weight).abs().max()
    assert err < {"q8_0": 0.002, "q6_k": 0.006}.get(fmt, 0.03), err


def test_embedding_refuses_formats_that_are_not_row_local():
    with pytest.raises(ValueError, match="row-local"):
        QuantEmbedding(10, 64, "nf4_dq")


def _llama(tie=False, hidden=256, vocab=512):
    from transformers import AutoModelForCausalLM

    from greentune.models.tiny import tiny_config

    config = tiny_config("llama", vocab_size=vocab, hidden=hidden, intermediate=512)
    config.tie_word_embeddings = tie
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _reference(model, quantised):
    """`model` with every weight replaced by `quantised`'s dequantised one."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in quantised.named_modules():
            if isinstance(m, QuantLinear | QuantEmbedding):
                ref.get_submodule(name).weight.copy_(m.dequantize())
    return ref


def test_quantize_model_quantises_embedding_and_head_as_q4_k_m():
    model = _llama()
    ref_model = copy.deepcopy(model)
    counts = quantize_model_(model, "q4_k")
    assert (
        isinstance(model.model.embed_tokens, QuantEmbedding) and model.model.embed_tokens.fmt.name == "q4_k"
    )
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.fmt.name == "q6_k"
    assert (counts["embedding"], counts["fallback"]) == (1, 0)
    assert not [n for n, p in model.named_parameters() if p.dim() > 1]  # no float matrix left
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        out, ref = model(ids).logits, _reference(ref_model, model)(ids).logits
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_tied_embeddings_one_table_in_the_head_format():
    model = _llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref_model = copy.deepcopy(model)
    counts = quantize_model_(model, "q4_k")
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantTiedHead)
    assert emb.fmt.name == "q6_k" and head.qweight is emb.qweight  # llama.cpp: token_embd takes output's type
    assert counts["embedding"] == 1 and counts["linear"] == 14
    assert [k for k in model.state_dict() if "embed" in k or "lm_head" in k] == ["model.embed_tokens.qweight"]
    ids = torch.randint(0, 512, (2, 12))
    ref = _reference(ref_model, model)
    assert ref.lm_head.weight is ref.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
    # copies keep the sharing; merging into the head changes the shared table
    twin = copy.deepcopy(model)
    assert twin.lm_head.embedding is twin.model.embed_tokens
    before = emb.qweight.clone()
    head.add_(torch.full(head.weight_shape, 0.05))
    assert not torch.equal(emb.qweight, before)


@pytest.mark.parametrize("tie", [False, True])
def test_dequantize_model_restores_plain_modules_and_returns_their_bytes(tie):
    from gguf import GGMLQuantizationType as T

    model = _llama(tie=tie)
    quantize_model_(model, "q4_k")
    table = model.model.embed_tokens.dequantize()
    emb_bytes = model.model.embed_tokens.qweight.clone()
    head_bytes = None if tie else model.lm_head.qweight.clone()
    packed = dequantize_model_(model)
    assert type(model.model.embed_tokens) is nn.Embedding and type(model.lm_head) is nn.Linear
    assert torch.equal(model.model.embed_tokens.weight, table)
    assert torch.equal(packed["model.embed_tokens.weight"][1], emb_bytes)
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert packed["model.embed_tokens.weight"][0] == T.Q6_K and "lm_head.weight" not in packed
    else:
        assert packed["model.embed_tokens.weight"][0] == T.Q4_K
        assert packed["lm_head.weight"][0] == T.Q6_K and torch.equal(packed["lm_head.weight"][1], head_bytes)


@pytest.mark.parametrize("tie", [False, True])
def test_lora_on_a_quantised_head_trains_and_merges(tie):
    """No recipe targets lm_head, but a LoRA on it works: gradients flow, fuse_ re-quantises."""
    from greentune.adapters.lora import LoRALinear

    model = _llama(tie=tie)
    quantize_model_(model, "q8_0")
    model.lm_head = LoRALinear(model.lm_head, rank=4, alpha=8)
    with torch.no_grad():
        model.lm_head.lora_B.normal_(0, 0.02)
    ids = torch.randint(0, 512, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.lm_head.lora_A.grad is not None and model.lm_head.lora_B.grad is not None
    with torch.no_grad():
        before = model(ids).logits
        expected = model.lm_head.base.dequantize() + model.lm_head.delta()
        model.lm_head.fuse_()
        model.lm_head = model.lm_head.base
        after = model(ids).logits
    assert (model.lm_head.dequantize() - expected).abs().max() < 0.003  # Q8_0's error
    if tie:  # one table: the merge moved the input embedding too, as with tied fp32 weights
        assert torch.equal(model.model.embed_tokens.dequantize(), model.lm_head.dequantize())
    else:
        assert (after - before).abs().max() < 0.05


def test_load_quantized_streams_embedding_and_head(tmp_path, tokenizer):
    for tie in (False, True):
        model = _llama(tie=tie, vocab=len(tokenizer))
        d = tmp_path / f"tie{tie}"
        model.save_pretrained(d)
        got = load_quantized(d, "q4_k")
        expected = copy.deepcopy(model)
        quantize_model_(expected, "q4_k")
        assert sorted(got.state_dict()) == sorted(expected.state_dict())
        for k, v in expected.state_dict().items():
            assert torch.equal(got.state_dict()[k], v), k
        assert isinstance(got.lm_head, QuantTiedHead if tie else QuantLinear)
        if tie:
            assert got.lm_head.embedding is got.model.embed_tokens
        ids = torch.randint(0, len(tokenizer), (1, 10))
        with torch.no_grad():
            assert torch.equal(got(ids).logits, expected(ids).logits)


def test_chunked_matmul_matches_the_dense_product(monkeypatch):
    """Big weights are multiplied a block of rows at a time (here forced on a small one)."""
    from greentune.quant import linear

    monkeypatch.setattr(linear, "CHUNK_WEIGHTS", 512 * 40)  # 40 rows per chunk, 3 chunks
    lin = nn.Linear(512, 100, bias=True)
    q = QuantLinear.from_linear(lin, "q4_k")
    W = q.dequantize()
    x = torch.randn(2, 7, 512, requires_grad=True)
    y = q(x)
    assert torch.allclose(y, F.linear(x, W) + q.bias, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(x.grad, (g @ W), atol=1e-5)
    with torch.no_grad():  # the no-grad path chunks too
        assert torch.allclose(q(x), y, atol=1e-6)


def test_chunked_products_share_one_dequantise_buffer_per_thread(monkeypatch):
    """Every chunked product on a thread dequantises into the same kept buffer (no fresh
    mapping per call), results unchanged; another thread gets its own."""
    import threading

    from greentune.quant import linear

    if kernels.library() is None:
        pytest.skip("the C kernels could not be built")
    monkeypatch.setattr(linear, "CHUNK_WEIGHTS", 512 * 40)
    monkeypatch.setattr(linear, "_scratch", threading.local())
    a = QuantLinear.from_linear(nn.Linear(512, 100), "q4_k")
    b = QuantLinear.from_linear(nn.Linear(1024, 70), "q6_k")  # 20 rows × 1024: as many floats
    xa, xb = torch.randn(3, 512, requires_grad=True), torch.randn(3, 1024)
    ya = a(xa)
    ptr = linear._scratch.buf.data_ptr()
    yb = b(xb)
    ya.sum().backward()  # the input gradient chunks too
    assert linear._scratch.buf.data_ptr() == ptr and linear._scratch.buf.numel() == 512 * 40
    assert torch.allclose(ya, F.linear(xa, a.dequantize(), a.bias), atol=1e-5)
    assert torch.allclose(yb, F.linear(xb, b.dequantize(), b.bias), atol=1e-5)
    assert torch.allclose(xa.grad, a.dequantize().sum(0).expand(3, -1), atol=1e-5)
    other = []
    t = threading.Thread(target=lambda: (b(xb), other.append(linear._scratch.buf.data_ptr())))
    t.start()
    t.join()
    assert other and other[0] != ptr


@pytest.mark.parametrize("fmt", ["q4_k", "q6_k", "q8_0", "q4_0", "nf4"])
def test_native_dequantise_is_bit_identical(fmt):
    """The C kernels give the plain-torch values bit for bit, subnormal and zero scales included."""
    f = get_format(fmt)
    w = torch.randn(48, 512) * 0.05
    w[0] = 0
    w[1] = 1e-7 * torch.randn(512)  # f16 scales underflow to subnormals
    w[2, :256] = torch.linspace(-65000, 65000, 256)  # near the f16 range's top
    q = f.quantize(w)
    assert kernels.library() is not None, "the C kernels could not be built"
    assert torch.equal(f.dequantize(q, w.shape, native=True), f.dequantize(q, w.shape))
    rows = q[5:17]  # a row slice, as the chunked matmul passes
    assert torch.equal(f.dequantize(rows, (12, 512), native=True), f.dequantize(rows, (12, 512)))


def test_native_policy(monkeypatch):
    f, cpu = get_format("q4_k"), torch.device("cpu")
    monkeypatch.delenv(kernels.ENV, raising=False)
    assert kernels.wanted(f, cpu) and kernels.wanted(get_format("nf4"), cpu)
    assert not kernels.wanted(get_format("nf4_dq"), cpu)  # no kernel: its scales span rows
    assert not kernels.wanted(f, torch.device("meta"))
    monkeypatch.setenv(kernels.ENV, "0")
    assert not kernels.wanted(f, cpu)


# ---- GGUF export of a quantised base: the training bytes, loaded by llama.cpp ----------------------


def _llamacpp_greedy(path, prompt, n, banned):
    import xllamacpp as x

    p = x.CommonParams()
    p.model.path = str(path)
    p.n_ctx = 64
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = 2
    p.warmup = False
    with contextlib.redirect_stderr(open(os.devnull, "w")):
        server = x.Server(p)
    r = server.handle_completions(
        {
            "prompt": list(prompt),
            "max_tokens": n,
            "temperature": 0,
            "n_probs": 1,
            "cache_prompt": False,
            "logit_bias": [[int(b), False] for b in banned],
        }
    )
    del server
    return [c["id"] for c in r["choices"][0]["logprobs"]["content"]]


@pytest.mark.parametrize("tie", [False, True])
def test_gguf_export_reuses_embedding_and_head_bytes_and_runs_in_llamacpp(tmp_path, tokenizer, tie):
    pytest.importorskip("xllamacpp", reason="llama.cpp binding (pip install xllamacpp, in the test extra)")
    from gguf import GGUFReader

    from greentune.export import write_gguf
    from greentune.models.tiny import build_tiny_model

    d = tmp_path / "base"
    build_tiny_model(
        "llama", d, tokenizer=tokenizer, hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2
    )
    if tie:
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(d)
        m.config.tie_word_embeddings = True
        m.tie_weights()
        m.save_pretrained(d)
    model = load_quantized(d, "q4_k")
    assert isinstance(model.lm_head, QuantTiedHead if tie else QuantLinear)
    packed = dequantize_model_(model)
    path = write_gguf(
        model, tmp_path / "model-q4_k_m.gguf", "q4_k_m", tokenizer=tokenizer, prequantized=packed
    )
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    names = {"token_embd.weight": "model.embed_tokens.weight"}
    if not tie:
        names["output.weight"] = "lm_head.weight"
    else:
        assert "output.weight" not in tensors
    for gguf_name, hf_name in names.items():
        t = tensors[gguf_name]
        assert t.tensor_type == packed[hf_name][0]
        written = np.asarray(t.data).view(np.uint8).reshape(packed[hf_name][1].shape)
        assert np.array_equal(written, packed[hf_name][1].numpy()), gguf_name
    assert tensors["token_embd.weight"].tensor_type.name == ("Q6_K" if tie else "Q4_K")

    prompt = [5, 6, 7, 8, 9, 10, 40, 41]
    # ban tokens the server would merge into the next one (not whole UTF-8) and special ones
    banned = sorted(
        {i for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i])}
        | {int(i) for i in tokenizer.added_tokens_decoder}
    )
    gen = _llamacpp_greedy(path, prompt, 8, banned)
    assert len(gen) == 8
    # llama.cpp's greedy choices are (up to near-ties) PyTorch's on the same dequantised weights
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + gen])).logits[0].float(), -1)
    logp[:, banned] = -torch.inf
    for j, tid in enumerate(gen):
        row = logp[len(prompt) - 1 + j]
        assert float(row.max() - row[tid]) < 0.3, (j, tid)


def test_native_dequantise_into_a_given_buffer():
    """`kernels.dequantize_blocks(out=...)` writes the same values into the caller's buffer (the
    chunked matmul reuses one buffer for all chunks) and checks its shape."""
    f = get_format("q4_k")
    w = torch.randn(8, 512) * 0.05
    blocks = f.quantize(w).reshape(-1, f.type_size)
    out = torch.full((blocks.shape[0], f.block_size), float("nan"))
    got = kernels.dequantize_blocks(f, blocks, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(out, f._dequantize_blocks(blocks))
    with pytest.raises(ValueError, match="out must be"):
        kernels.dequantize_blocks(f, blocks, out=torch.empty(blocks.shape[0], 3))
