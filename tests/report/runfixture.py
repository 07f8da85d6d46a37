"""A synthetic run directory with known totals, for the report tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

from greentune.energy.factors import Factors
from greentune.energy.ledger import Ledger
from greentune.energy.meter import Measurement
from greentune.energy.savings import save_savings, savings_table
from greentune.fsutil import append_jsonl

RECIPE = """# greentune train recipe.yaml
base_model: ./models/tiny-mixtral
train: {steps: 60, batch_size: 4, lr: 2.0e-4}
energy: {region: FR, pue: 1.1, wue_onsite: 0.3}
"""


def make_run(run_dir: Path, steps: int = 60, with_extras: bool = True) -> dict:
    """Write metrics, ledger (FR, PUE 1.1, WUE 0.3), recipe, savings and summary; return expectations."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(RECIPE)
    ledger = Ledger(run_dir, Factors.for_region("FR", pue=1.1, wue_onsite=0.3))
    src = {"cpu": "estimate", "dram": "estimate"}
    t = 1_790_000_000.0

    def rec(phase, cpu_j, dram_j, seconds):
        nonlocal t
        ledger.record(Measurement(phase, t, t + seconds, seconds, {"cpu": cpu_j, "dram": dram_j}, src))
        t += seconds

    rec("load", 7_200.0, 360.0, 3.0)
    rec("quantise", 3_600.0, 180.0, 2.0)
    per_step_j = 1_800.0
    for _ in range(steps // 10):
        rec("train", per_step_j * 10 * 0.95, per_step_j * 10 * 0.05, 20.0)
    rec("merge", 1_800.0, 90.0, 1.0)
    rec("export", 5_400.0, 270.0, 4.0)
    tokens_per_step = 1024
    for s in range(1, steps + 1):
        line = {
            "step": s,
            "loss": 6.0 * math.exp(-s / 25) + 2.0,
            "lr": 2e-4,
            "tokens": s * tokens_per_step,
            "seconds": 2.0 * s,
            "joules": per_step_j * s,
            "step_joules": per_step_j,
        }
        if s % 20 == 0:
            line["eval_loss"] = line["loss"] + 0.3
        if s == steps:
            line["expert_use"] = {"0": [0.4, 0.3, 0.2, 0.1], "1": [0.25, 0.25, 0.3, 0.2]}
        append_jsonl(run_dir / "metrics.jsonl", line)
    # a step re-run after a resume: the last line for a step wins
    append_jsonl(
        run_dir / "metrics.jsonl",
        {
            "step": steps,
            "loss": 2.5,
            "lr": 2e-4,
            "tokens": steps * tokens_per_step,
            "seconds": 2.0 * steps,
            "joules": per_step_j * steps,
            "step_joules": per_step_j,
            "eval_loss": 2.9,
            "expert_use": {"0": [0.4, 0.3, 0.2, 0.1], "1": [0.25, 0.25, 0.3, 0.2]},
        },
    )
    if with_extras:
        full = {
            "j_per_token": 7.0,
            "s_per_token": 0.004,
            "peak_mem_bytes": 3 * 2**30,
            "peak_mem_kind": "process peak RSS (sampled)",
            "steps": 3,
            "tokens_per_step": 1024,
            "seconds": 12.3,
            "joules": {"cpu": 21504.0},
            "source": {"cpu": "estimate"},
            "estimate": True,
            "method": "full fine-tune estimated from 3 measured steps",
        }
        rows = savings_table(
            steps * tokens_per_step,
            per_step_j * steps,
            2.0 * steps,
            full,
            run_peak_mem_bytes=2**30,
            run_estimate=True,
        )
        save_savings(run_dir, full, rows)
        (run_dir / "summary.json").write_text(
            json.dumps(
                {
                    "steps": steps,
                    "hardware": {
                        "cpu": "AMD EPYC",
                        "logical_cpus": 2,
                        "usable_cpus": 2,
                        "memory_bytes": 8 * 2**30,
                        "gpus": [],
                        "os": "Linux 6.1",
                        "python": "3.11.2",
                    },
                }
            )
        )
    it_j = 7_560 + 3_780 + per_step_j * steps + 1_890 + 5_670
    it_kwh = it_j / 3.6e6
    return {
        "it_kwh": it_kwh,
        "facility_kwh": it_kwh * 1.1,
        "kg_co2e": it_kwh * 1.1 * 56 / 1000,
        "water_l": it_kwh * 0.3 + it_kwh * 1.1 * 0.82,
        "train_kwh": per_step_j * steps / 3.6e6,
        "tokens": steps * tokens_per_step,
        "steps": steps,
    }
