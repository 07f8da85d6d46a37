"""A run's calibration carries the model FLOP/s it achieved, consistent with its utilisation."""

from __future__ import annotations

import pytest

from greentune.models.facts import arch_facts
from greentune.models.tiny import tiny_config
from greentune.plan import calibrate
from greentune.plan.cost import Technique, flops_per_token
from greentune.plan.hardware import find_hardware


def test_observation_records_achieved_flops(tmp_path):
    hw = find_hardware("H100")
    facts = arch_facts(tiny_config("llama", vocab_size=300))
    t = Technique("lora")
    run = calibrate.ObservedRun(tokens=10_000, seconds=2.0, joules=1000.0, seq_len=128)
    cal = calibrate.record_observation(hw, facts, t, run, path=tmp_path / "cal.json")
    assert cal.achieved_flops == pytest.approx(5000 * flops_per_token(facts, t, 128, False))
    assert cal.utilisation == pytest.approx(cal.achieved_flops / hw.peak_flops)  # no dequantisation here
    assert calibrate.load_calibration(hw, tmp_path / "cal.json").achieved_flops == cal.achieved_flops
