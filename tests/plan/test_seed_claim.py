"""The seed's claim — Mixtral 8x7B, QLoRA 4-bit, one server under 1 kW, 10 h — recomputed from the
formulas."""

from __future__ import annotations

import math

import pytest

from greentune.plan.seed_claim import seed_claim

# Mixtral 8x7B's real config
L, H, FF, E, K, HEADS, KV, HD, V = 32, 4096, 14336, 8, 2, 32, 8, 128, 32000
R, T, MB = 16, 512, 8  # LoRA rank, sequence length, micro-batch
U = 0.35  # utilisation assumed for a GPU (not calibrated)


def _by_name(claim, name):
    return next(g for g in claim.gpus if g.hardware.name == name)


@pytest.fixture(scope="module")
def claim():
    return seed_claim(
        hours=10, power_cap_w=1000, technique="qlora-q4_k", seq_len=T, micro_batch=MB, utilisation=U
    )


def test_parameter_counts(claim):
    f = claim.combinations.facts
    attn = 2 * H * H + 2 * H * KV * HD
    expert = 3 * H * FF
    assert f.total_params == L * (attn + E * expert + E * H + 2 * H) + 2 * V * H + H
    assert f.active_matmul_params == L * (attn + K * expert + E * H) + V * H


def test_tokens_in_ten_hours_on_h100(claim):
    n = L * (2 * H * H + 2 * H * KV * HD + K * 3 * H * FF + E * H) + V * H  # active matmul weights
    a = L * 2 * HEADS * (HD + HD) * (T + 1) / 2  # causal attention FLOPs
    p = L * R * (2 * (H + H) + 2 * (H + KV * HD) + K * 3 * (H + FF))  # active LoRA params
    fpt = 4 * n + 3 * a + 6 * p + (2 * (n - V * H) + a + 2 * p)  # LoRA + checkpoint recompute
    n_q = L * (2 * H * H + 2 * H * KV * HD + E * 3 * H * FF + E * H) + V * H  # quantised weights + head
    dequant_per_token = 3 * n_q * (4.5 / 8 + 2 * 2) / (T * MB) / 3350e9  # 3 passes, Q4_K → bf16
    seconds_per_token = fpt / (989.4e12 * U) + dequant_per_token
    expected = math.floor(10 * 3600 / seconds_per_token / (T * MB)) * T * MB
    h100 = _by_name(claim, "NVIDIA H100 SXM5 80GB")
    assert h100.estimate.checkpointing  # 77.6 GB without it > 76 GB usable
    assert h100.tokens == pytest.approx(expected, abs=T * MB)
    assert 125e6 < h100.tokens < 145e6
    e = h100.estimate
    assert e.hours <= 10 and e.peak_power_w == 700 + 200 <= 1000
    assert e.it_kwh == pytest.approx((700 * 0.8 + 200) * e.seconds / 3.6e6)
    assert e.facility_kwh == pytest.approx(e.it_kwh * 1.58)
    assert e.kg_co2e == pytest.approx(e.facility_kwh * 481 / 1000)
    assert e.water_l == pytest.approx(e.it_kwh * 1.8 + e.facility_kwh * 0.82)


def test_which_gpus_fit(claim):
    quantised = L * (2 * H * H + 2 * H * KV * HD + E * 3 * H * FF + E * H) * 4.5 / 8
    rest = V * H * (4.5 + 6.5625) / 8 + (L * 2 * H + H) * 2  # Q4_K embedding, Q6_K head
    for name in ("NVIDIA GeForce RTX 4090 24GB", "NVIDIA GeForce RTX 3090 24GB", "NVIDIA L4 24GB"):
        g = _by_name(claim, name)
        assert quantised + rest > 24e9 * 0.95 and not g.fits_memory and g.tokens == 0
    fitting = {g.hardware.name for g in claim.gpus if g.tokens}
    assert {
        "NVIDIA H100 SXM5 80GB",
        "NVIDIA H200 SXM 141GB",
        "NVIDIA A100 SXM4 80GB",
        "NVIDIA L40S 48GB",
    } <= fitting
    assert claim.best.hardware.name == "NVIDIA H200 SXM 141GB"
    assert 2 * 700 + 200 > 1000  # a second GPU breaks the 1 kW cap


def test_technique_combinations(claim):
    c = claim.combinations
    assert c.get("full").memory_bytes > L * E * 3 * H * FF * 16 and not c.get("full").fits
    assert not c.get("lora").fits and not c.get("relora").fits  # bf16 base: 93 GB + activations, too slow
    assert c.get("qlora-q4_k").fits and c.recommended in ("qlora-nf4", "qlora-q4_k")
    md = claim.to_markdown()
    assert (
        "## The seed's claim, worked" in md and "### Assumptions" in md and "utilisation 0.350 (given)" in md
    )
