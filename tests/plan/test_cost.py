"""The cost model's arithmetic, recomputed by hand on tiny configs."""

from __future__ import annotations

import pytest

from greentune.errors import UserError
from greentune.models.facts import arch_facts
from greentune.models.tiny import tiny_config
from greentune.plan.cost import (
    BPW,
    Site,
    Technique,
    Workload,
    activation_elements,
    estimate,
    flops_per_token,
    lora_params,
    memory_breakdown,
)
from greentune.plan.hardware import GB, Hardware

H, L, HEADS, KV, HD, FF, V = 64, 2, 4, 2, 16, 128, 517
GPU = Hardware(
    name="test gpu",
    kind="gpu",
    memory_gb=10,
    bandwidth_gbs=100,
    bf16_tflops=1,
    fp32_tflops=0.5,
    power_w=100,
    host_w=50,
    site="datacentre",
    source="test",
)
CPU = Hardware(
    name="test cpu",
    kind="cpu",
    memory_gb=10,
    bandwidth_gbs=10,
    bf16_tflops=0.1,
    fp32_tflops=0.1,
    power_w=20,
    host_w=5,
    site="desk",
    source="test",
)
SITE = Site("X", grid_g_per_kwh=500, offsite_l_per_kwh=1.0, pue=1.5, wue_onsite=2.0)


@pytest.fixture(scope="module")
def llama():
    return arch_facts(tiny_config("llama", vocab_size=V))


@pytest.fixture(scope="module")
def mixtral():
    return arch_facts(tiny_config("mixtral", vocab_size=V, experts=4, top_k=2))


def _n_mm():
    return L * (H * H + 2 * H * KV * HD + H * H + 3 * H * FF) + V * H


def test_bits_per_weight():
    assert BPW["q8_0"] == (32 * 8 + 16) / 32 and BPW["q4_0"] == (32 * 4 + 16) / 32
    assert BPW["q4_k"] == (2 + 2 + 12 + 128) * 8 / 256
    assert BPW["nf4"] == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)


def test_lora_params_match_peft(llama):
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=V))
    mods = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=mods))
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    total, active, adapted = lora_params(llama, Technique("t", rank=8, targets=("attn", "mlp")))
    assert total == active == trainable == L * 8 * ((H + H) * 2 + (H + KV * HD) * 2 + (H + FF) * 3)
    assert adapted == L * (2 * H * H + 2 * H * KV * HD + 3 * H * FF)


def test_expert_lora_is_active_for_top_k_only(mixtral):
    total, active, _ = lora_params(mixtral, Technique("t", rank=4, targets=("experts",)))
    per_expert = 4 * ((H + FF) * 2 + (FF + H))
    assert total == L * 4 * per_expert and active == L * 2 * per_expert


def test_training_flops_per_token(llama):
    T = 256
    n, a = _n_mm(), 2 * L * 2 * HEADS * HD * (T + 1) / 2
    p = lora_params(llama, Technique("t", targets=("attn", "mlp")))[1]
    assert llama.active_matmul_params == n
    assert flops_per_token(llama, Technique("f", "full"), T, False) == pytest.approx(6 * n + 3 * a)
    lora = Technique("l", "lora", targets=("attn", "mlp"))
    assert flops_per_token(llama, lora, T, False) == pytest.approx(4 * n + 3 * a + 6 * p)
    assert flops_per_token(llama, lora, T, True) == pytest.approx(
        4 * n + 3 * a + 6 * p + 2 * (n - V * H) + a + 2 * p
    )


def test_activation_elements(llama, mixtral):
    dense = 4 * H + (HEADS + KV) * HD * 2 + 4 * FF
    assert activation_elements(llama) == (L * dense + H, dense)
    moe = 4 * H + (HEADS + KV) * HD * 2 + 2 * (H + 4 * FF) + 4
    assert activation_elements(mixtral) == (L * moe + H, moe)


def test_memory_breakdown_lora_q4k_and_full(llama):
    w = Workload(tokens=10_000, seq_len=32, micro_batch=2)
    t = Technique("q", "lora", "q4_k", rank=8, targets=("attn", "mlp"))
    m = memory_breakdown(llama, t, w, GPU)
    matmul = L * (2 * H * H + 2 * H * KV * HD + 3 * H * FF)
    table = V * H * (6.5625 / 8 if llama.tied_embeddings else (4.5 + 6.5625) / 8)  # Q4_K embedding, Q6_K head
    norms = llama.total_params - matmul - llama.embedding_params
    assert m["weights"] == pytest.approx(matmul * 4.5 / 8 + table + norms * 2)
    p = lora_params(llama, t)[0]
    assert (m["trainable"], m["grads"], m["optimizer"]) == (4 * p, 4 * p, 8 * p)
    toks = 2 * 32
    per_tok, largest = activation_elements(llama)
    logits = toks * V * (2 + 8)
    assert m["activations"] == toks * per_tok * 2 + logits
    assert m["activations_checkpointed"] == toks * (L * H + largest) * 2 + logits
    assert m["dequant_transient"] == H * FF * 2  # the largest single matrix, in bf16
    states = m["weights"] + m["trainable"] + m["grads"] + m["optimizer"]
    assert m["total"] == pytest.approx(1 * GB + (states + m["dequant_transient"] + m["activations"]) * 1.05)
    f = memory_breakdown(llama, Technique("f", "full"), w, GPU)
    assert f["weights"] + f["grads"] + f["optimizer"] == llama.total_params * 16  # 2 + 2 + 4 + 8
    c = memory_breakdown(llama, Technique("f", "full"), w, CPU)
    assert c["weights"] + c["grads"] + c["optimizer"] == llama.total_params * 16  # 4 + 4 + 8, fp32
    # a CPU dequantises a block of rows at a time (quant.linear.CHUNK_WEIGHTS), never a whole matrix
    assert memory_breakdown(llama, t, w, CPU)["dequant_transient"] == (1 << 20) * 4


def test_estimate_time_energy_carbon_water(llama):
    w = Workload(tokens=1_000_000, seq_len=64, micro_batch=4)
    t = Technique("q", "lora", "nf4", rank=8, targets=("attn", "mlp"))
    e = estimate(llama, t, w, GPU, SITE, utilisation=0.5)
    assert not e.checkpointing
    fpt = flops_per_token(llama, t, 64, False)
    assert e.total_flops == fpt * 1_000_000
    n_q = L * (2 * H * H + 2 * H * KV * HD + 3 * H * FF) + V * H  # the quantised head is dequantised too
    dq = w.micro_steps * 2 * n_q * (4.127 / 8 + 2 * 2)
    assert e.seconds == pytest.approx(e.total_flops / (1e12 * 0.5) + dq / 100e9)
    assert e.power_w == 100 * 0.8 + 50 and e.peak_power_w == 150
    assert e.it_kwh == pytest.approx(130 * e.seconds / 3.6e6)
    assert e.facility_kwh == pytest.approx(e.it_kwh * 1.5)
    assert e.kg_co2e == pytest.approx(e.facility_kwh * 0.5)
    assert e.water_l == pytest.approx(e.it_kwh * 2.0 + e.facility_kwh * 1.0)
    assert e.fits


def test_constraints_give_reasons(llama):
    w = Workload(tokens=10**9, seq_len=64, micro_batch=4)
    e = estimate(llama, Technique("l"), w, GPU, SITE, power_cap_w=120, deadline_h=0.001)
    assert e.reasons[0] == "power 150 W > cap 120 W" and e.reasons[1].startswith("time ")
    small = Hardware(**{**GPU.__dict__, "memory_gb": 0.5})
    e = estimate(llama, Technique("l"), w, small, SITE)
    assert e.reasons and e.reasons[0].startswith("memory ") and e.checkpointing


def test_relora_merges_and_multi_gpu(llama):
    w = Workload(tokens=64 * 4 * 1000, seq_len=64, micro_batch=4)
    lora = estimate(llama, Technique("l", "lora"), w, GPU, SITE, utilisation=0.5)
    relora = estimate(llama, Technique("r", "relora", merge_every=100), w, GPU, SITE, utilisation=0.5)
    adapted = lora_params(llama, Technique("r", "relora"))[2]
    # 1000 steps, a merge after steps 100 … 900 (none after the last: the trainer's rule)
    assert relora.total_flops - lora.total_flops == pytest.approx(2 * 16 * adapted * 9)
    two = estimate(llama, Technique("l", "lora"), w, GPU, SITE, devices=2, utilisation=0.5)
    assert two.seconds == pytest.approx(lora.seconds / 2)
    assert two.memory["weights"] == pytest.approx(lora.memory["weights"] / 2)
    assert two.peak_power_w == 2 * 100 + 50
    with pytest.raises(UserError, match="needs GPUs"):
        estimate(llama, Technique("l"), w, CPU, SITE, devices=2)


def test_upcycle_plans_the_moe_model(llama, mixtral):
    w = Workload(tokens=10_000, seq_len=32, micro_batch=2)
    e = estimate(llama, Technique("u", "lora", "q4_k", upcycle=(4, 2)), w, GPU, SITE)
    assert e.total_params == mixtral.total_params
    expert_lora = lora_params(mixtral, Technique("t", targets=("attn", "mlp", "experts")))[0]
    router = L * 4 * H
    assert e.trainable_params == expert_lora + router


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(method="full", quant_base="q4_k"), "cannot keep a quantised base"),
        (dict(targets=("attn", "lm_head")), "unknown LoRA target"),
        (dict(quant_base="q3"), "unknown quant_base"),
        (dict(method="dora"), "unknown method"),
    ],
)
def test_bad_technique(kw, msg):
    with pytest.raises(UserError, match=msg):
        Technique("bad", **kw)


def test_cpu_dequant_chunk_is_the_quantised_linears_own():
    from greentune.plan.cost import CPU_DEQUANT_CHUNK_WEIGHTS
    from greentune.quant.linear import CHUNK_WEIGHTS

    assert CPU_DEQUANT_CHUNK_WEIGHTS == CHUNK_WEIGHTS


def test_relora_into_a_quantised_base_pays_the_quantiser_on_a_cpu(llama):
    """Each merge re-quantises every adapted weight: the quantiser's CPU-seconds over the cores."""
    from dataclasses import replace

    from greentune.plan.cost import MERGE_CPU_S_PER_WEIGHT, QUANTISE_CPU_S_PER_WEIGHT

    w = Workload(tokens=64 * 4 * 1000, seq_len=64, micro_batch=4)
    t = Technique("r", "relora", "q4_k", merge_every=100)
    cpu2 = replace(CPU, cores=2)
    e = estimate(llama, t, w, cpu2, SITE, utilisation=0.5)
    adapted = lora_params(llama, t)[2]
    rate = QUANTISE_CPU_S_PER_WEIGHT["q4_k"] + MERGE_CPU_S_PER_WEIGHT
    assert e.requant_seconds == pytest.approx(9 * adapted * rate / 2)
    assert e.seconds == pytest.approx(e.compute_seconds + e.dequant_seconds + e.requant_seconds)
    assert estimate(llama, t, w, GPU, SITE, utilisation=0.5).requant_seconds == 0.0
    assert (
        estimate(llama, Technique("l", "lora", "q4_k"), w, cpu2, SITE, utilisation=0.5).requant_seconds == 0.0
    )
