"""CausalLMLoss's fused lm_head + cross-entropy equals the plain HF loss, and falls back when it must."""

import pytest
import torch
import torch.nn.functional as F
from lora_helpers import randomise_lora

from greentune.adapters.lora import LoRALinear, apply_lora, trainable_parameters
from greentune.models.loader import load_model
from greentune.train import fused_head_ce
from greentune.train.fused_head_ce import fused_head, linear_cross_entropy
from greentune.train.loss import CausalLMLoss, count_targets

TOL = 1e-5


def _batch(vocab, rows=3, length=40):
    """Prompt-masked and right-padded rows, as assistant-only packing produces."""
    ids = torch.randint(0, vocab, (rows, length))
    labels = ids.clone()
    labels[0, :12] = -100
    labels[1, 5:9] = -100
    labels[2, 29:] = -100
    mask = torch.ones_like(ids)
    mask[2, 29:] = 0
    return ids, mask, labels


def _loss_and_grads(objective, batch, scale=1.0):
    ids, mask, labels = batch
    params = trainable_parameters(objective.model)
    for p in params.values():
        p.grad = None
    num_items = torch.tensor(float(count_targets(labels)))
    loss = objective(ids, mask, labels, num_items)
    (loss * scale).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in params.items()}


def _assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert abs(loss_a.item() - loss_b.item()) <= TOL
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        assert (grads_a[n] - grads_b[n]).abs().max().item() <= TOL, n


@pytest.fixture
def small_chunks(monkeypatch):
    """Force several chunks per batch so chunk boundaries are exercised."""
    monkeypatch.setattr(fused_head_ce, "CHUNK_ROWS", 1)  # -> MIN_CHUNK_ROWS


@pytest.mark.parametrize("arch_fixture", ["tiny_llama_dir", "tiny_mixtral_dir", "tiny_qwen2_moe_dir"])
def test_fused_loss_and_lora_grads_equal_the_hf_path(request, arch_fixture, small_chunks):
    from greentune.moe import prepare_moe_

    model = load_model(request.getfixturevalue(arch_fixture))
    apply_lora(model, ["attn", "mlp"], rank=4, alpha=8)
    monitor = prepare_moe_(model, aux_loss_coef=0.01) if arch_fixture != "tiny_llama_dir" else None
    randomise_lora(model)
    model.train()
    assert fused_head(model) is not None
    batch = _batch(model.config.vocab_size)

    plain = _loss_and_grads(CausalLMLoss(model, fused=False), batch)
    aux_plain = monitor.pop_aux_loss(batch[1]) if monitor else None
    fused = _loss_and_grads(CausalLMLoss(model), batch)
    aux_fused = monitor.pop_aux_loss(batch[1]) if monitor else None
    _assert_same(plain, fused)
    if monitor:  # the router hook sees the backbone's forward on the fused path too
        assert aux_plain.item() > 0 and abs(aux_plain.item() - aux_fused.item()) <= TOL
        monitor.close()

    with torch.no_grad():  # evaluation: the loss alone, no gradient work
        ids, mask, labels = batch
        n = torch.tensor(float(count_targets(labels)))
        assert abs(CausalLMLoss(model)(ids, mask, labels, n).item() - plain[0].item()) <= TOL


def test_upstream_gradient_scales_the_fused_gradient(tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    apply_lora(model, ["attn"], rank=4, alpha=8)
    randomise_lora(model)
    batch = _batch(model.config.vocab_size)
    once = _loss_and_grads(CausalLMLoss(model), batch)
    thrice = _loss_and_grads(CausalLMLoss(model), batch, scale=3.0)
    for n, g in once[1].items():
        assert torch.allclose(3 * g, thrice[1][n], atol=TOL)


@pytest.mark.parametrize("select_rows", ["always", "never"])  # CPU's row selection, the GPU's masking
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("num_items", [None, 50.0])
def test_linear_cross_entropy_matches_cross_entropy_with_hidden_grads(
    small_chunks, with_bias, num_items, select_rows, monkeypatch
):
    monkeypatch.setattr(fused_head_ce, "SELECT_ROWS", select_rows)
    n, h, v = 70, 16, 40
    hidden = torch.randn(n, h, requires_grad=True)
    weight, bias = torch.randn(v, h), (torch.randn(v) if with_bias else None)
    targets = torch.randint(0, v, (n,))
    targets[::3] = -100
    ours = linear_cross_entropy(hidden, weight, bias, targets, num_items)
    (g_ours,) = torch.autograd.grad(ours, hidden)
    logits = F.linear(hidden, weight, bias)
    if num_items is None:
        ref = F.cross_entropy(logits, targets, ignore_index=-100)
    else:
        ref = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / num_items
    (g_ref,) = torch.autograd.grad(ref, hidden)
    assert abs(ours.item() - ref.item()) <= TOL
    assert (g_ours - g_ref).abs().max().item() <= TOL
    assert g_ours[::3].abs().max().item() == 0  # untargeted rows get no gradient


def test_linear_cross_entropy_refuses_a_trainable_head():
    with pytest.raises(ValueError):
        linear_cross_entropy(
            torch.randn(4, 8), torch.randn(10, 8, requires_grad=True), None, torch.zeros(4, dtype=torch.long)
        )


def test_tied_embeddings(tokenizer, small_chunks):
    from transformers import AutoModelForCausalLM

    from greentune.models.tiny import tiny_config

    config = tiny_config("llama", vocab_size=len(tokenizer))
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    apply_lora(model, ["attn", "mlp"], rank=4, alpha=8)
    randomise_lora(model)
    assert fused_head(model) is not None
    batch = _batch(config.vocab_size)
    _assert_same(
        _loss_and_grads(CausalLMLoss(model, fused=False), batch), _loss_and_grads(CausalLMLoss(model), batch)
    )


def _lora_head(model):
    model.lm_head = LoRALinear(model.lm_head, rank=4, alpha=8)


def _trainable_head(model):
    model.lm_head.weight.requires_grad_(True)


def _quantised_head(model):
    from greentune.quant.replace import quantize_model_

    quantize_model_(model, "q8_0", skip=("embed_tokens",))


def _router_logits_in_loss(model):
    model.config.output_router_logits = True


def _hooked_head(model):
    model.lm_head.register_forward_hook(lambda m, args, out: out * 2)


@pytest.mark.parametrize(
    "change", [_lora_head, _trainable_head, _quantised_head, _router_logits_in_loss, _hooked_head]
)
def test_fallback_to_the_hf_path(tiny_mixtral_dir, change):
    model = load_model(tiny_mixtral_dir)
    apply_lora(model, ["attn"], rank=4, alpha=8)
    randomise_lora(model)
    change(model)
    assert fused_head(model) is None
    ids, mask, labels = _batch(model.config.vocab_size)
    n = torch.tensor(float(count_targets(labels)))
    ours = CausalLMLoss(model)(ids, mask, labels, n)
    theirs = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n).loss
    assert torch.equal(ours, theirs)


def test_chunk_rows_on_cpu_and_elsewhere():
    """512 rows on CPU while their logits fit 256 MiB (fewer for large vocabularies, never
    under 64); on an accelerator about 2^26 logits a chunk."""
    cpu, gpu = torch.device("cpu"), torch.device("meta")  # any non-CPU device takes the device rule
    assert fused_head_ce.chunk_rows(8192, cpu) == fused_head_ce.chunk_rows(32000, cpu) == 512
    assert fused_head_ce.chunk_rows(151936, cpu) == (1 << 26) // 151936 == 441
    assert fused_head_ce.chunk_rows(10**7, cpu) == 64
    assert fused_head_ce.chunk_rows(8192, gpu) == 8192
