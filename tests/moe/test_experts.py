"""SparseExperts against transformers' eager experts: outputs and gradients (atol 1e-5)."""

import copy

import pytest
import torch
import transformers as tf
from expert_store import FakeStore

from greentune.moe import SparseExperts, replace_experts_, sparse_experts


def _load(path):
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager")


def _forward_backward(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("fixture", ["tiny_mixtral_dir", "tiny_qwen2_moe_dir"])
def test_model_outputs_and_gradients_match_eager(fixture, request):
    ref = _load(request.getfixturevalue(fixture))
    ours = copy.deepcopy(ref)
    assert replace_experts_(ours) == 2
    assert len(sparse_experts(ours)) == 2
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ids = torch.randint(0, ref.config.vocab_size, (2, 24))
    logits_ref, grads_ref = _forward_backward(ref, ids)
    logits, grads = _forward_backward(ours, ids)
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=0)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=0, msg=name)


def test_parameters_are_shared_not_copied(tiny_mixtral_dir):
    model = _load(tiny_mixtral_dir)
    before = model.model.layers[0].mlp.experts.gate_up_proj
    replace_experts_(model)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, SparseExperts)
    assert experts.gate_up_proj is before
    assert replace_experts_(model) == 0  # idempotent


def _hf_experts(E=8, H=32, FF=48):
    cfg = tf.MixtralConfig(hidden_size=H, intermediate_size=FF, num_local_experts=E, num_experts_per_tok=2)
    cfg._experts_implementation = "eager"
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    m = MixtralExperts(cfg)
    torch.nn.init.normal_(m.gate_up_proj, std=0.05)
    torch.nn.init.normal_(m.down_proj, std=0.05)
    return m


def test_unused_experts_module_level():
    """E=8, k=2 with experts 3, 5, 6, 7 never routed: same output and grads, zero grads for them."""
    hf = _hf_experts()
    ours = SparseExperts.from_hf(hf)
    N = 40
    x = torch.randn(N, 32, requires_grad=True)
    idx = torch.tensor([[0, 1], [2, 4], [1, 0], [4, 2]]).repeat(N // 4, 1)
    w = torch.softmax(torch.randn(N, 2), -1).requires_grad_()
    y_ref = hf(x, idx, w)
    gx_ref, gw_ref, gp_ref = torch.autograd.grad(y_ref.square().sum(), (x, w, hf.gate_up_proj))
    y = ours(x, idx, w)
    gx, gw, gp = torch.autograd.grad(y.square().sum(), (x, w, ours.gate_up_proj))
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(gw, gw_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(gp, gp_ref, atol=1e-5, rtol=0)
    assert gp[[3, 5, 6, 7]].abs().sum() == 0


def test_unused_experts_in_a_model(tmp_path, tokenizer):
    """A tiny Mixtral with E=8, k=2 whose router can only pick experts 0-3."""
    from greentune.models.tiny import build_tiny_model

    build_tiny_model("mixtral", tmp_path, tokenizer=tokenizer, experts=8, top_k=2)
    ref = _load(tmp_path)
    with torch.no_grad():
        for layer in ref.model.layers:
            u = torch.randn(ref.config.hidden_size)
            # x·u > 0 -> experts {2, 0}; x·u < 0 -> {3, 1}; experts 4-7 have logit 0 and always lose
            layer.mlp.gate.weight.copy_(torch.stack([u, -u, 2 * u, -2 * u] + [torch.zeros_like(u)] * 4))
    ours = copy.deepcopy(ref)
    replace_experts_(ours)
    ids = torch.randint(0, ref.config.vocab_size, (2, 20))
    logits_ref, grads_ref = _forward_backward(ref, ids)
    logits, grads = _forward_backward(ours, ids)
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=0)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=0, msg=name)
    for layer in ours.model.layers:
        g = layer.mlp.experts.gate_up_proj.grad
        assert g[4:].abs().sum() == 0 and g[:4].abs().sum() > 0


def test_store_weights_give_same_outputs_and_input_grads():
    hf = _hf_experts()
    ours = SparseExperts.from_hf(hf)
    stored = SparseExperts(hf.gate_up_proj.detach().clone(), hf.down_proj.detach().clone(), hf.act_fn)
    stores = {n: FakeStore(getattr(ours, f"{n}_proj")) for n in ("gate_up", "down")}
    for n, s in stores.items():
        stored.set_weight_store_(n, s)
    x = torch.randn(30, 32, requires_grad=True)
    idx = torch.stack([torch.randperm(8)[:2] for _ in range(30)])
    w = torch.rand(30, 2)
    (gx_ref,) = torch.autograd.grad(ours(x, idx, w).sum(), x)
    y = stored(x, idx, w)
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, ours(x, idx, w), atol=1e-6, rtol=0)
    torch.testing.assert_close(gx, gx_ref, atol=1e-6, rtol=0)
    used = len(set(idx.reshape(-1).tolist()))
    assert stores["down"].calls == 2 * used  # one forward + one backward, one expert at a time
    with pytest.raises(ValueError, match="shape"):
        stored.set_weight_store_("down", stores["gate_up"])


def test_empty_batch():
    ours = SparseExperts.from_hf(_hf_experts())
    y = ours(torch.zeros(0, 32), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert y.shape == (0, 32)


def test_bf16_matches_eager_within_bf16_rounding():
    """The GPU compute dtype: same routing, outputs within bf16 rounding of transformers' eager."""
    hf = _hf_experts(E=4, H=32, FF=48).to(torch.bfloat16)
    ours = SparseExperts.from_hf(hf)
    x = torch.randn(16, 32, dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(16)])
    w = torch.softmax(torch.randn(16, 2), -1)  # the routers return fp32 weights
    y, y_ref = ours(x, idx, w), hf(x, idx, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe"])
def test_other_moe_architectures(arch, tmp_path):
    from greentune.models.tiny import build_tiny_model

    build_tiny_model(arch, tmp_path, vocab_size=128, hidden=32, intermediate=48, heads=4, kv_heads=2)
    ref = _load(tmp_path)
    ours = copy.deepcopy(ref)
    assert replace_experts_(ours) == 2
    ids = torch.randint(0, 128, (2, 12))
    logits_ref, grads_ref = _forward_backward(ref, ids)
    logits, grads = _forward_backward(ours, ids)
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=0)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("quantise_first", [True, False])
def test_quantised_experts_q8_0(tiny_mixtral_dir, quantise_first):
    """greentune.quant's QuantExperts3D as the store, installed before or after the swap:
    same logits and input gradients as transformers' eager loop over the same quantised weights."""
    from greentune.quant.experts import QuantExperts3D
    from greentune.quant.replace import quantize_model_

    ref = _load(tiny_mixtral_dir)
    quantize_model_(ref, "q8_0")
    assert isinstance(ref.model.layers[0].mlp.experts.gate_up_proj, QuantExperts3D)
    if quantise_first:
        ours = copy.deepcopy(ref)
        assert replace_experts_(ours) == 2
    else:
        ours = _load(tiny_mixtral_dir)
        replace_experts_(ours)
        quantize_model_(ours, "q8_0")
    experts = ours.model.layers[1].mlp.experts
    assert isinstance(experts, SparseExperts) and isinstance(experts.down_proj, QuantExperts3D)
    emb_ref, emb = (m.get_input_embeddings() for m in (ref, ours))
    ids = torch.randint(0, ref.config.vocab_size, (2, 16))
    outs = []
    for model, emb_layer in ((ref, emb_ref), (ours, emb)):
        x = emb_layer(ids).detach().requires_grad_()
        logits = model(inputs_embeds=x).logits
        outs.append((logits, torch.autograd.grad(logits.square().mean(), x)[0]))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-6, rtol=1e-4)


def test_fuse_into_quantised_store(tiny_mixtral_dir):
    """ReLoRA's merge on a Q8_0 store: W_e ← Q(W_e + s·B_e·A_e); logits move by quantisation error only."""
    from greentune.adapters.expert_lora import add_expert_lora_
    from greentune.quant.replace import quantize_model_

    model = _load(tiny_mixtral_dir)
    quantize_model_(model, "q8_0")
    replace_experts_(model)
    add_expert_lora_(model, r=4, alpha=8)
    with torch.no_grad():
        for _, m in sparse_experts(model):
            m.lora.B_down.normal_(0, 0.05)
            m.lora.B_gate_up.normal_(0, 0.05)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    before = model(ids).logits
    experts = model.model.layers[0].mlp.experts
    expected = experts.weight("down", 1) + experts.lora.delta("down", 1)
    for _, m in sparse_experts(model):
        m.fuse(restart=True)
    after = experts.weight("down", 1)
    assert (after - expected).abs().max() <= expected.abs().max() / 127  # one Q8_0 step
    assert experts.lora.B_down.abs().sum() == 0
    assert (model(ids).logits - before).abs().max() < 2e-2


@pytest.mark.parametrize("with_lora", [False, True])
def test_grouped_gemm_path_equals_the_per_expert_loop(monkeypatch, with_lora):
    """The GPU's grouped_mm path, forced on the CPU in fp32: same output and gradients as the
    loop, also with experts that get no tokens (3, 5, 6, 7) and with expert LoRA."""
    from greentune.adapters.expert_lora import ExpertLoRA
    from greentune.moe import experts as experts_mod

    hf = _hf_experts(H=32, FF=48)
    ours = SparseExperts.from_hf(hf)
    if with_lora:
        ours.lora = ExpertLoRA(8, 32, 48, r=4, alpha=8)
        with torch.no_grad():
            ours.lora.B_gate_up.normal_(std=0.1)
            ours.lora.B_down.normal_(std=0.1)
    N = 40
    x = torch.randn(N, 32)
    idx = torch.tensor([[0, 1], [2, 4], [1, 0], [4, 2]]).repeat(N // 4, 1)
    w = torch.softmax(torch.randn(N, 2), -1)
    params = [ours.gate_up_proj.requires_grad_()] + (list(ours.lora.parameters()) if with_lora else [])

    def run(mode):
        monkeypatch.setattr(experts_mod, "GROUPED_MM", mode)
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        assert ours._grouped_ok(xi) == (mode == "always")
        y = ours(xi, idx, wi)
        return (y, *torch.autograd.grad(y.square().sum(), (xi, wi, *params)))

    for got, want in zip(run("always"), run("never")):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
