"""The savings counterfactual never allocates what cannot fit (energy/savings.py
`full_finetune_counterfactual`): the whole model when it fits, else a measured slice of its
layers scaled by layer count, else the calibrated planner; the method says which."""

from __future__ import annotations

import json

import pytest
import torch

from greentune.energy.components import Component
from greentune.energy.meter import Meter
from greentune.energy.savings import (
    _sliced_config,
    full_finetune_counterfactual,
    full_finetune_memory,
    savings_table,
)
from greentune.models import loader
from greentune.plan.hardware import GB


class Watts(Component):
    """10 W of CPU power, by the clock: joules follow the time a window took."""

    name, source = "cpu", "rapl"

    def read(self):
        import time

        return 10.0 * time.perf_counter()


def _batch(vocab, rows=2, seq=32):
    ids = torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def _limits(model_dir, rows=2, seq=32):
    """(whole model, one-layer slice) full fine-tune bytes, as the planner models them."""
    cfg = loader.load_config(model_dir)
    return (
        full_finetune_memory(cfg, rows, seq, "cpu"),
        full_finetune_memory(_sliced_config(cfg, 1), rows, seq, "cpu"),
    )


def _no_whole_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the counterfactual loaded the whole model although it would not fit")

    monkeypatch.setattr(loader, "load_model", refuse)


def test_whole_model_measured_when_it_fits(tiny_llama_dir):
    whole, _ = _limits(tiny_llama_dir)
    full = full_finetune_counterfactual(
        tiny_llama_dir,
        "cpu",
        _batch(512),
        steps=1,
        meter=Meter([Watts()], poll_interval_s=0, sync=None),
        memory_bytes=whole * 1.01,
    )
    assert full["method"] == "full fine-tune estimated from 1 measured steps"
    assert "slice" not in full and full["fit"]["whole_bytes"] == whole


def test_a_slice_is_measured_and_scaled_when_the_whole_would_not_fit(tiny_llama_dir, monkeypatch):
    whole, one_layer = _limits(tiny_llama_dir)
    assert one_layer < whole
    _no_whole_model(monkeypatch)
    full = full_finetune_counterfactual(
        tiny_llama_dir,
        "cpu",
        _batch(512),
        steps=2,
        meter=Meter([Watts()], poll_interval_s=0, sync=None),
        memory_bytes=(whole + one_layer) / 2,
    )
    assert full["method"] == "full fine-tune measured on 1 of 2 layers, scaled"
    sl = full["slice"]
    assert sl["layers"] == 1 and sl["of"] == 2 and sl["weights"].startswith("random")
    assert sl["no_layers"]["trainable_params"] < sl["measured"]["trainable_params"]
    for key in ("j_per_token", "s_per_token"):
        part, base = sl["measured"][key], sl["no_layers"][key]
        expected = base + 2 * (part - base) if part > base else 2 * part
        assert full[key] == pytest.approx(expected)
        assert full[key] > part  # two layers cost more than one
    assert full["estimate"] is False and full["source"] == {"cpu": "rapl"}
    assert full["peak_mem_bytes"] == int(whole) and "planner" in full["peak_mem_kind"]
    from greentune.models.facts import arch_facts

    assert full["trainable_params"] == arch_facts(tiny_llama_dir).total_params
    rows = savings_table(1000, 5.0, 1.0, full)
    assert rows[0]["method"] == full["method"] and rows[0]["full_fine_tune"] > 0


def test_the_planner_models_it_when_not_even_a_slice_fits(tiny_llama_dir, monkeypatch, tmp_path):
    from greentune.models.facts import arch_facts
    from greentune.plan.cost import DEFAULT_UTILISATION, Technique, Workload, estimate
    from greentune.plan.hardware import this_hardware_for
    from greentune.plan.recommend import site_factors

    _, one_layer = _limits(tiny_llama_dir)
    _no_whole_model(monkeypatch)
    monkeypatch.setenv("GREENTUNE_CACHE", str(tmp_path))  # no calibration of this machine
    monkeypatch.setattr(
        "greentune.energy.savings.measure_full_finetune",
        lambda *a, **k: pytest.fail("nothing may be trained when nothing fits"),
    )
    full = full_finetune_counterfactual(
        tiny_llama_dir, "cpu", _batch(512), steps=3, memory_bytes=one_layer * 0.99
    )
    assert full["method"] == "modelled by the planner"
    assert full["estimate"] is True and full["source"] == {"all": "planner"}
    assert full["planner"]["calibrated"] is False
    hw = this_hardware_for("cpu")
    e = estimate(
        arch_facts(tiny_llama_dir),
        Technique("full", "full"),
        Workload(tokens=3 * 64, seq_len=32, micro_batch=2),
        hw,
        site_factors(hw),
        1,
        DEFAULT_UTILISATION["cpu"],
    )
    assert full["s_per_token"] == pytest.approx(e.seconds / 192)
    assert full["j_per_token"] == pytest.approx(e.it_kwh * 3.6e6 / 192)
    rows = savings_table(1000, 5.0, 1.0, full)
    assert rows[0]["method"] == "modelled by the planner" and rows[0]["estimate"] is True


def test_a_bad_memory_limit_is_one_line(monkeypatch):
    from greentune.errors import UserError
    from greentune.plan.hardware import run_memory_bytes

    monkeypatch.setenv("GREENTUNE_MEMORY_GB", "lots")
    with pytest.raises(UserError, match="GREENTUNE_MEMORY_GB='lots': expected a positive number of GB"):
        run_memory_bytes("cpu")


@pytest.mark.slow
def test_a_run_whose_full_finetune_would_not_fit_finishes_with_an_honest_savings_row(
    tmp_path, tiny_llama_dir, text_jsonl, monkeypatch
):
    from greentune.pipeline import train
    from greentune.recipe import Recipe

    rows, seq = 2, 32
    recipe = Recipe.model_validate(
        {
            "base_model": str(tiny_llama_dir),
            "data": {"train": str(text_jsonl), "max_seq_len": seq},
            "method": {"lora": {"rank": 4, "alpha": 8, "targets": ["attn"]}},
            "train": {"steps": 2, "batch_size": rows, "lr": 1e-3, "warmup": 0, "checkpoint_every": 2},
            "energy": {"measure_savings": True},
        }
    )
    whole, one_layer = _limits(tiny_llama_dir, rows, seq)
    monkeypatch.setenv("GREENTUNE_MEMORY_GB", f"{(whole + one_layer) / 2 / GB:.12f}")
    _no_whole_model(monkeypatch)  # the run loads its own base through the pipeline's import
    train(recipe, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "savings.json").read_text())
    assert saved["full_fine_tune"]["method"] == "full fine-tune measured on 1 of 2 layers, scaled"
    energy = next(r for r in saved["rows"] if r["quantity"] == "energy")
    assert energy["method"] == "full fine-tune measured on 1 of 2 layers, scaled"
    assert energy["full_fine_tune"] > 0 and energy["this_run"] > 0
    html = (tmp_path / "run" / "report.html").read_text()
    assert "full fine-tune measured on 1 of 2 layers, scaled" in html
    assert "measured on 1 of 2 decoder layers of the same shapes and batch (weights random" in html
    assert "scaled to 2 layers" in html
