"""Candidates, the recommendation, and what would have to change when nothing fits."""

from __future__ import annotations

import pytest

from greentune.models.facts import arch_facts
from greentune.models.tiny import tiny_config
from greentune.plan.catalogue import find_model
from greentune.plan.cost import Technique, Workload
from greentune.plan.hardware import find_hardware
from greentune.plan.recommend import candidates, plan, site_factors


def test_candidates_upcycle_only_dense():
    dense = arch_facts(tiny_config("llama", vocab_size=300))
    moe = arch_facts(tiny_config("mixtral", vocab_size=300))
    names = [t.name for t in candidates(dense)]
    assert names == [
        "full",
        "lora",
        "qlora-nf4",
        "qlora-q4_k",
        "relora",
        "relora-q4_k",
        "upcycle-qlora-q4_k",
        "upcycle-relora-q4_k",
    ]
    assert not any(t.upcycle for t in candidates(moe))


def test_recommends_least_energy_that_fits():
    facts = find_model("llama-3.1-8b").facts()
    r = plan(
        facts,
        "llama-3.1-8b",
        workload=Workload(10_000_000),
        hardware="4090",
        deadline_h=10,
        use_calibration=False,
        utilisation=0.3,
    )
    fitting = [e for e in r.estimates if e.fits]
    assert r.recommended == min(fitting, key=lambda e: (e.facility_kwh, e.seconds)).technique.name
    assert r.why_not["full"].startswith("memory ")
    assert r.get("lora").reasons[0].startswith("memory ")  # 16 GB of bf16 weights + activations > 22.8 GB
    for name, why in r.why_not.items():
        assert why.startswith("fits, but uses") == r.get(name).fits


def test_nothing_fits_says_what_to_change():
    facts = find_model("llama-3.1-70b").facts()
    r = plan(
        facts,
        "llama-3.1-70b",
        workload=Workload(10**9),
        hardware="4090",
        power_cap_w=300,
        deadline_h=1,
        use_calibration=False,
    )
    assert r.recommended is None
    msg = r.what_would_have_to_change()
    assert msg.startswith("nothing fits llama-3.1-70b on NVIDIA GeForce RTX 4090 24GB: the smallest option")
    assert "use more memory or more --gpus" in msg and "over the 300 W cap" in msg and "--deadline-h" in msg


def test_recipe_technique_is_planned_first():
    facts = arch_facts(tiny_config("llama", vocab_size=300))
    extra = Technique("recipe: relora-q8_0", "relora", "q8_0")
    r = plan(facts, "tiny", workload=Workload(1000), hardware="H100", extra=[extra], use_calibration=False)
    assert r.estimates[0].technique == extra and r.recipe_technique == "recipe: relora-q8_0"


def test_desk_defaults_to_no_facility_overhead():
    desk = site_factors(find_hardware("M2 Max"), "FR")
    dc = site_factors(find_hardware("H100"), "FR")
    assert (desk.pue, desk.wue_onsite, desk.grid_g_per_kwh) == (1.0, 0.0, 56)
    assert dc.pue == pytest.approx(1.58) and dc.wue_onsite == pytest.approx(1.8)
    assert site_factors(find_hardware("H100"), "FR", pue=1.1, wue_onsite=0.3).pue == 1.1
