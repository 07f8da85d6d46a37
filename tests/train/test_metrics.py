"""Compute efficiency in every run: FLOPs per token and achieved FLOP/s in metrics.jsonl, the
run's mean utilisation, and the energy meter read at the ledger interval."""

from __future__ import annotations

import json

import pytest
import torch

from greentune.adapters.lora import apply_lora
from greentune.data.packing import BatchStream, PackedData
from greentune.energy.components import Component
from greentune.energy.factors import Factors
from greentune.energy.ledger import Ledger
from greentune.energy.meter import Meter
from greentune.models.facts import arch_facts
from greentune.models.tiny import tiny_config
from greentune.plan.cost import Technique, flops_per_token
from greentune.recipe import TrainConfig
from greentune.train.energy_hook import EnergyHook
from greentune.train.hooks import TrainHook
from greentune.train.loop import run_training
from greentune.train.metrics import efficiency, run_compute, training_flops_per_token


class Counter(Component):
    name, source = "cpu", "rapl"

    def __init__(self):
        self.value, self.reads = 0.0, 0

    def read(self):
        self.reads += 1
        return self.value


class Tick(TrainHook):
    """10 J per training step."""

    def __init__(self, counter):
        self.counter = counter

    def before_step(self, step):
        self.counter.value += 10.0


def _model(arch="llama", **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(arch, vocab_size=128, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, **kw)
    return AutoModelForCausalLM.from_config(cfg), cfg


def _data(n=12, t=16):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (n, t), generator=g)
    return PackedData(ids, ids.clone(), torch.ones_like(ids))


def _train(tmp_path, model, steps=5, interval=2, budget=None):
    counter = Counter()
    meter = Meter([counter], poll_interval_s=0, sync=None)
    hook = EnergyHook(
        meter, Ledger(tmp_path, Factors.for_region("FR")), interval_steps=interval, budget_kwh=budget
    )
    cfg = TrainConfig(steps=steps, batch_size=3, warmup=0, checkpoint_every=100)
    run_training(
        model, BatchStream(_data(), 3, 0), cfg, tmp_path, hooks=[Tick(counter), hook], progress=False
    )
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return lines, counter, hook


def test_every_line_carries_the_facts_flops_and_the_achieved_rate(tmp_path):
    model, cfg = _model()
    apply_lora(model, ["attn"], 4, 8)
    lines, _, _ = _train(tmp_path, model)
    facts = arch_facts(cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = training_flops_per_token(facts, trainable, 16)
    # the planner's own formula for this technique counts the same adapter: the same number
    assert expected == flops_per_token(facts, Technique("t", "lora", "none", 4, ("attn",)), 16, False)
    assert (
        expected == 4 * facts.active_matmul_params + 3 * facts.attention_flops_per_token(16) + 6 * trainable
    )
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]
    for m in lines:
        assert m["flops_per_token"] == expected
        assert m["step_tokens"] == 3 * 16
        # step_seconds is written to 0.1 ms, flops_per_s from the unrounded time t, |t - s| <= 5e-5:
        # |F/t - F/s| <= (F/s) · 5e-5 / (s - 5e-5) (t may be the smaller; a few-ms step makes it ~1 %)
        sec = m["step_seconds"]
        bound = m["step_tokens"] * expected / sec * (5e-5 / (sec - 5e-5) + 1e-6)
        assert m["flops_per_s"] == pytest.approx(m["step_tokens"] * expected / m["step_seconds"], abs=bound)
    eff = efficiency(lines, peak_flops=1e12)
    work = sum(m["step_tokens"] for m in lines) * expected
    assert eff["mean_flops_per_s"] == pytest.approx(work / sum(m["step_seconds"] for m in lines))
    assert eff["utilisation"] == pytest.approx(eff["mean_flops_per_s"] / 1e12)
    comp = run_compute(lines, "cpu")
    assert comp["peak_flops"] > 0 and comp["utilisation"] == pytest.approx(
        comp["mean_flops_per_s"] / comp["peak_flops"]
    )


def test_expert_lora_counts_the_top_k_experts_a_token_uses(tmp_path):
    from greentune.adapters.expert_lora import add_expert_lora_
    from greentune.moe.prepare import prepare_moe_

    model, cfg = _model("mixtral", experts=4, top_k=2)
    apply_lora(model, ["attn"], 4, 8)
    dense = sum(p.numel() for p in model.parameters() if p.requires_grad)
    prepare_moe_(model, lora_on_experts=True)
    add_expert_lora_(model, 4, 8, 0.0)
    experts = sum(p.numel() for p in model.parameters() if p.requires_grad) - dense
    lines, _, _ = _train(tmp_path, model, steps=2)
    facts = arch_facts(cfg)
    assert lines[0]["flops_per_token"] == pytest.approx(
        training_flops_per_token(facts, dense + experts * 2 / 4, 16)
    )
    # (the planner's `lora_params` counts separate gate and up pairs; greentune shares one, as PEFT does)


def test_the_meter_is_read_at_the_ledger_interval_and_every_joule_is_kept(tmp_path):
    model, _ = _model()
    apply_lora(model, ["attn"], 4, 8)
    lines, _, hook = _train(tmp_path, model, steps=5, interval=2)
    read = [m for m in lines if "joules" in m]
    assert [m["step"] for m in read] == [2, 4]  # not every step
    assert all(m["joules_steps"] == 2 and m["step_joules"] == pytest.approx(10.0) for m in read)
    assert read[-1]["joules"] == pytest.approx(40.0)
    ledger = Ledger(tmp_path, Factors.for_region("FR"))
    train_j = sum(sum(r["joules"].values()) for r in ledger.rows() if r["phase"] == "train")
    # step 5's joules (read at the end) are in the ledger and in the checkpointed total too
    assert hook.train_joules == pytest.approx(train_j) == pytest.approx(50.0)


def test_a_budget_still_reads_every_step(tmp_path):
    model, _ = _model()
    apply_lora(model, ["attn"], 4, 8)
    lines, _, _ = _train(tmp_path, model, steps=3, interval=10, budget=1.0)
    assert [m["joules_steps"] for m in lines] == [1, 1, 1]
