"""greentune's MoE path against transformers' own model, for every MoE family row, in fp32 on the CPU.

Per family (the MoE rows of tests/families/rows.py, each router as transformers implements it:
Mixtral / Qwen / OLMoE softmax top-k with or without renormalisation, GraniteMoE's softmax over
the top-k logits, PhiMoE's sparsemixer, ERNIE's correction-biased selection with shared
experts and a dense first layer), `prepare_moe_` (SparseExperts, expert LoRA, router trained
in full, RouterMonitor with the aux loss) is applied to a copy of transformers' eager model:

- with the LoRA at its init (B = 0) logits and every gradient (attention, norms, embeddings,
  router, the fused expert tensors, the shared experts) equal transformers' within 1e-5, in
  eval mode and in training mode (PhiMoE's training-mode sparsemixer samples its experts with
  Gumbel noise and scales their gradients: both models draw from the same seed);
- the aux loss equals transformers' own `aux_loss` (output_router_logits=True);
- after one optimiser step on the expert LoRA, the merged experts reproduce the LoRA model.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).parent.parent / "families"))
import rows  # noqa: E402

from greentune.moe import prepare_moe_, sparse_experts  # noqa: E402

MOE_ROWS = [pytest.param(r, id=r.model_type) for r in rows.ROWS if r.moe]
IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
VOCAB = 96


def _prepare_with_expert_lora(model, **kw):
    """`prepare_moe_` with expert LoRA r4 alpha 8 on every experts module (as attach_adapters does)."""
    from greentune.adapters.expert_lora import add_expert_lora_

    monitor = prepare_moe_(model, lora_on_experts=True, **kw)
    add_expert_lora_(model, 4, 8.0, 0.0)
    return monitor


def _model(row, seed=0):
    torch.manual_seed(seed)
    cfg = row.make(VOCAB, IDS, 32, 32)
    cfg._experts_implementation = "eager"
    if row.model_type == "phimoe":  # a wide jitter band: training-mode sampling really picks among several
        cfg.router_jitter_noise = 0.5
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # spread the routers (random init is near-uniform: every choice a near-tie)
        for n, p in model.named_parameters():
            if n.endswith(("gate.weight", "router.weight", "router.layer.weight")) and p.dim() == 2:
                p.mul_(20.0)
            if n.endswith("e_score_correction_bias"):
                p.copy_(torch.linspace(-0.05, 0.05, p.numel()).view_as(p))
    return model


def _run(model, ids, train: bool, seed: int = 1):
    model.train(train)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("row", MOE_ROWS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_forward_and_gradients_match_transformers(row, train):
    ref = _model(row)
    for p in ref.parameters():
        p.requires_grad_(True)
    ours = copy.deepcopy(ref)
    mon = _prepare_with_expert_lora(ours, router="full", aux_loss_coef=1.0)
    n_moe = len(sparse_experts(ours))
    assert n_moe == len(mon.routers) >= 1
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    out_ref, g_ref = _run(ref, ids, train)
    out, g = _run(ours, ids, train)
    torch.testing.assert_close(out.logits, out_ref.logits, atol=1e-5, rtol=0)
    aux = mon.pop_aux_loss()
    if getattr(out_ref, "aux_loss", None) is not None:
        torch.testing.assert_close(aux, out_ref.aux_loss.float(), atol=1e-5, rtol=1e-5)
    use = mon.pop_stats()["expert_use"]
    assert len(use) == n_moe and all(abs(sum(f) - 1) < 1e-5 for f in use.values())
    base = {n: v for n, v in g.items() if ".lora." not in n}
    # gpt-oss's expert biases are frozen base tensors in greentune's sparse path (buffers, no grad)
    g_ref = {
        n: v
        for n, v in g_ref.items()
        if not n.endswith(("experts.gate_up_proj_bias", "experts.down_proj_bias"))
    }
    assert base.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(base[name], g_ref[name], atol=1e-5, rtol=0, msg=name)
    lora = [n for n in g if ".lora.A_" in n or ".lora.B_" in n]
    assert any(".lora.B_" in n and g[n].abs().sum() > 0 for n in lora)  # the expert LoRA learns
    if train and row.model_type == "phimoe":  # the sparsemixer did sample (another seed, other experts)
        other, _ = _run(ours, ids, train, seed=2)
        assert (other.logits - out.logits).abs().max() > 1e-3


@pytest.mark.parametrize("row", MOE_ROWS)
def test_trained_expert_lora_merges_into_the_experts(row):
    model = _model(row)
    _prepare_with_expert_lora(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    torch.manual_seed(1)
    model(ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        before = model(ids).logits
        for _, m in sparse_experts(model):
            m.fuse()
        after = model(ids).logits
    assert all(m.lora is None for _, m in sparse_experts(model))
    torch.testing.assert_close(after, before, atol=1e-4, rtol=0)
