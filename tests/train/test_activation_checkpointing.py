"""Activation checkpointing (train/activation_checkpointing.py): the same gradients with and
without it for dense, MoE and quantised models (dropout too), the router counted once, the
peak memory measured lower, `auto` decided by the planner's memory model and written down,
and the planner reading the recipe's setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lora_helpers import randomise_lora

from greentune.adapters.expert_lora import add_expert_lora_
from greentune.adapters.lora import apply_lora
from greentune.models.loader import load_model
from greentune.moe import prepare_moe_
from greentune.quant import load_quantized
from greentune.train.activation_checkpointing import enable_, predicted_memory
from greentune.train.loss import CausalLMLoss, count_targets

PROBE = Path(__file__).with_name("_checkpointing_memory_probe.py")


def _build(model_dir, quant, targets, dropout, moe):
    torch.manual_seed(0)
    model = load_quantized(model_dir, quant) if quant != "none" else load_model(model_dir)
    apply_lora(model, list(targets), 4, 8.0, dropout)
    randomise_lora(model)
    monitor = None
    if moe:
        monitor = prepare_moe_(model, router="full", aux_loss_coef=0.05, lora_on_experts="experts" in targets)
        if "experts" in targets:
            add_expert_lora_(model, r=4, alpha=8.0, dropout=dropout)
        with torch.no_grad():  # expert LoRA's B starts at zero: make it count
            for n, p in model.named_parameters():
                if p.requires_grad and ".lora.B_" in n:
                    p.add_(torch.randn_like(p) * 0.05)
    return model, monitor


def _inside_layer_calls(model):
    """Count forwards of each decoder layer's attention (inside the checkpointed forward)."""
    calls = []
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(lambda *a: calls.append(1))
    return calls


def _grads(model_dir, checkpointing, quant="none", targets=("attn", "mlp"), dropout=0.0, moe=False):
    model, monitor = _build(model_dir, quant, targets, dropout, moe)
    if checkpointing:
        enable_(model)
    calls = _inside_layer_calls(model)
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (3, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 18:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    torch.manual_seed(123)  # the dropout masks
    loss = CausalLMLoss(model)(ids, mask, labels, torch.tensor(float(count_targets(labels))))
    aux = None
    if monitor is not None:
        aux = monitor.pop_aux_loss(mask)
        loss = loss + aux
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    stats = monitor.pop_stats() if monitor is not None else None
    return grads, len(calls), loss.item(), (aux.item() if aux is not None else None), stats


def _assert_same_grads(off, on):
    assert off.keys() == on.keys() and off
    for name in off:
        scale = off[name].abs().max().item()
        assert scale > 0, f"{name}: no gradient, the comparison would prove nothing"
        rel = (on[name] - off[name]).abs().max().item() / scale
        assert rel <= 1e-6, f"{name}: relative difference {rel:.2e}"


LAYERS = 2  # the tiny fixtures' decoder layers


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_dense_lora_gradients_equal_with_and_without(tiny_llama_dir, dropout):
    off, n_off, loss_off, _, _ = _grads(tiny_llama_dir, False, dropout=dropout)
    on, n_on, loss_on, _, _ = _grads(tiny_llama_dir, True, dropout=dropout)
    assert n_off == LAYERS and n_on == 2 * LAYERS  # each layer really was recomputed
    assert loss_on == loss_off
    _assert_same_grads(off, on)


def test_moe_expert_lora_router_and_aux_loss_equal_and_counted_once(tiny_mixtral_dir):
    """Experts LoRA, a trained router and the aux loss; dropout on, so the recompute's masks matter."""
    kw = dict(targets=("attn", "experts"), dropout=0.1, moe=True)
    off, n_off, loss_off, aux_off, stats_off = _grads(tiny_mixtral_dir, False, **kw)
    on, n_on, loss_on, aux_on, stats_on = _grads(tiny_mixtral_dir, True, **kw)
    assert n_on == 2 * n_off
    assert any(".gate." in n for n in on) and any("lora" in n and "experts" in n for n in on)
    assert aux_on == aux_off and aux_off > 0 and loss_on == loss_off
    assert stats_on == stats_off  # expert use from the forward only, not the recompute
    tokens = 3 * 24 - 6  # the mask's real tokens
    # every layer's use sums to 1 over its k·tokens slots: nothing counted twice or dropped
    assert set(stats_on["expert_use"]) == {str(i) for i in range(LAYERS)}
    _assert_same_grads(off, on)
    assert tokens > 0


@pytest.mark.parametrize(
    "model, targets", [("tiny_llama_dir", ("attn", "mlp")), ("tiny_mixtral_dir", ("attn", "experts"))]
)
def test_quantised_base_gradients_equal(request, model, targets):
    """LoRA on a q4_0 base (`_DequantMatmul`) and on quantised experts (`_StoreLinear`)."""
    d = request.getfixturevalue(model)
    moe = model == "tiny_mixtral_dir"
    off, n_off, *_ = _grads(d, False, quant="q4_0", targets=targets, dropout=0.1, moe=moe)
    on, n_on, *_ = _grads(d, True, quant="q4_0", targets=targets, dropout=0.1, moe=moe)
    assert n_on == 2 * n_off
    _assert_same_grads(off, on)


def test_eval_and_no_grad_do_not_recompute(tiny_llama_dir):
    model, _ = _build(tiny_llama_dir, "none", ("attn",), 0.0, False)
    enable_(model)
    calls = _inside_layer_calls(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    model.eval()
    model(ids, labels=ids).loss.backward()
    model.train()
    with torch.no_grad():
        model(ids)
    assert len(calls) == 2 * LAYERS


@pytest.mark.slow
def test_peak_memory_drops(tmp_path, tokenizer):
    """The same step measured with and without checkpointing, in one fresh process (peak RSS)."""
    from greentune.models import tiny

    d = tmp_path / "model"
    tiny.build_tiny_model(
        "llama", d, tokenizer=tokenizer, layers=6, hidden=128, intermediate=512, max_positions=512
    )
    out = subprocess.run(
        [sys.executable, str(PROBE), str(d), "4", "256"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.splitlines()[-1])
    on, off = r["on"], r["off"]
    assert on["loss"] == off["loss"]
    # The planner predicts the activations a step keeps; the measured drop must be a real
    # share of the difference it predicts (not noise).
    predicted_drop = r["predicted_activations"] - r["predicted_activations_checkpointed"]
    assert off["step_bytes"] - on["step_bytes"] > 0.5 * predicted_drop, r


# ---------------------------------------------------------------- auto, and the planner


def _recipe(tmp_path, base, data, **train):
    from greentune.recipe import Recipe

    return Recipe.model_validate(
        {
            "base_model": str(base),
            "data": {"train": str(data), "max_seq_len": 32},
            "method": {"lora": {"rank": 4, "alpha": 8, "targets": ["attn"]}},
            "train": {"steps": 2, "batch_size": 2, "lr": 1e-3, "warmup": 0, "checkpoint_every": 2, **train},
            "energy": {"measure_savings": False},
        }
    )


def _between(mem) -> str:
    """A memory limit (GB) in which the run fits only with checkpointing."""
    from greentune.plan.hardware import GB

    return f"{(mem['total'] + mem['total_checkpointed']) / 2 / GB:.12f}"


def test_auto_turns_it_on_when_the_planner_says_it_would_not_fit(
    tmp_path, tiny_llama_dir, text_jsonl, monkeypatch, caplog
):
    from greentune.pipeline import train

    recipe = _recipe(tmp_path, tiny_llama_dir, text_jsonl)
    mem = predicted_memory(recipe, "cpu")
    assert mem["total_checkpointed"] < mem["total"]
    monkeypatch.setenv("GREENTUNE_MEMORY_GB", _between(mem))
    with caplog.at_level("INFO", logger="greentune.train.activation_checkpointing"):
        train(recipe, tmp_path / "run", progress=False)
    decision = json.loads((tmp_path / "run" / "summary.json").read_text())["activation_checkpointing"]
    assert decision["setting"] == "auto" and decision["enabled"] is True
    assert decision["memory_bytes"] == pytest.approx(mem["total"])
    assert decision["available_source"].startswith("GREENTUNE_MEMORY_GB=")
    assert any(
        "activation checkpointing on: auto: on, the planner predicts" in r.getMessage()
        for r in caplog.records
    )


def test_auto_leaves_it_off_when_it_fits_and_the_recipe_overrides(
    tmp_path, tiny_llama_dir, text_jsonl, monkeypatch
):
    from greentune.train.activation_checkpointing import decide

    recipe = _recipe(tmp_path, tiny_llama_dir, text_jsonl)
    monkeypatch.delenv("GREENTUNE_MEMORY_GB", raising=False)
    d = decide(recipe, "cpu")
    assert not d.enabled and d.reason.startswith("auto: off") and "available RAM" in d.available_source
    monkeypatch.setenv("GREENTUNE_MEMORY_GB", _between(predicted_memory(recipe, "cpu")))
    assert decide(recipe, "cpu").enabled
    assert not decide(
        _recipe(tmp_path, tiny_llama_dir, text_jsonl, activation_checkpointing=False), "cpu"
    ).enabled
    monkeypatch.delenv("GREENTUNE_MEMORY_GB")
    forced = decide(_recipe(tmp_path, tiny_llama_dir, text_jsonl, activation_checkpointing=True), "cpu")
    assert forced.enabled and forced.setting == "true" and forced.reason == "the recipe sets it true"


def test_recipe_rejects_other_values(tmp_path, tiny_llama_dir, text_jsonl):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        _recipe(tmp_path, tiny_llama_dir, text_jsonl, activation_checkpointing="sometimes")


@pytest.mark.parametrize("setting", [True, False, "auto"])
def test_planner_uses_the_recipes_setting(tmp_path, tiny_llama_dir, setting):
    from greentune.plan.catalogue import model_facts
    from greentune.plan.command import read_recipe
    from greentune.plan.recommend import plan

    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base_model": str(tiny_llama_dir),
                "data": {"train": "x.jsonl"},
                "train": {"activation_checkpointing": setting},
            }
        )
    )
    rec = read_recipe(path)
    assert rec.activation_checkpointing == (None if setting == "auto" else setting)
    facts, label = model_facts(rec.base_model)
    result = plan(
        facts,
        label,
        workload=rec.workload(),
        hardware="H100",
        extra=[rec.technique()],
        extra_checkpointing=rec.activation_checkpointing,
        use_calibration=False,
    )
    mine, alike = result.get(rec.technique().name), result.get("lora")
    assert not alike.checkpointing  # a tiny model fits: the planner leaves it off
    assert mine.checkpointing is (setting is True)
    if setting is True:  # the recompute is priced in
        assert mine.flops_per_token > alike.flops_per_token
        assert mine.memory_bytes == mine.memory["total_checkpointed"]


def test_planner_respects_false_even_when_it_would_not_fit(tmp_path, tiny_llama_dir):
    from greentune.plan.catalogue import model_facts
    from greentune.plan.command import read_recipe
    from greentune.plan.recommend import plan

    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "base_model": str(tiny_llama_dir),
                "data": {"train": "x.jsonl"},
                "train": {"activation_checkpointing": False},
            }
        )
    )
    rec = read_recipe(path)
    facts, label = model_facts(rec.base_model)
    probe = plan(
        facts, label, workload=rec.workload(), hardware="H100", extra=[rec.technique()], use_calibration=False
    )
    m = probe.get(rec.technique().name).memory
    from greentune.plan.hardware import GB

    gb = (m["total"] + m["total_checkpointed"]) / 2 / GB / 0.95  # H100 usable fraction
    auto = plan(
        facts,
        label,
        workload=rec.workload(),
        hardware="H100",
        extra=[rec.technique()],
        memory_gb=gb,
        use_calibration=False,
    )
    off = plan(
        facts,
        label,
        workload=rec.workload(),
        hardware="H100",
        extra=[rec.technique()],
        memory_gb=gb,
        extra_checkpointing=False,
        use_calibration=False,
    )
    assert auto.get(rec.technique().name).checkpointing and auto.get(rec.technique().name).fits
    e = off.get(rec.technique().name)
    assert not e.checkpointing and not e.fits and e.reasons[0].startswith("memory ")


def test_bad_planner_recipe_value_is_one_line(tmp_path, tiny_llama_dir):
    from greentune.errors import UserError
    from greentune.plan.command import read_recipe

    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump({"base_model": str(tiny_llama_dir), "train": {"activation_checkpointing": 3}})
    )
    with pytest.raises(UserError, match="train.activation_checkpointing must be auto, true or false"):
        read_recipe(path)


# ---------------------------------------------------------------- end to end: resume, DDP, FSDP


def _write(path, base, data, method=None, **train):
    path.write_text(
        yaml.safe_dump(
            {
                "base_model": str(base),
                "data": {"train": str(data), "max_seq_len": 64},
                "method": {
                    "lora": {"rank": 4, "alpha": 8, "targets": ["attn", "mlp"], "dropout": 0.1},
                    **(method or {}),
                },
                "train": {
                    "steps": 6,
                    "batch_size": 4,
                    "lr": 2e-3,
                    "warmup": 1,
                    "checkpoint_every": 3,
                    **train,
                },
                "energy": {"measure_savings": False},
            }
        )
    )
    return path


def _cli(recipe, run_dir, *extra, nproc=None, fault=None):
    cmd = [
        sys.executable,
        "-m",
        "greentune",
        "train",
        str(recipe),
        "--run-dir",
        str(run_dir),
        "--quiet",
        *extra,
    ]
    if nproc:
        cmd += ["--nproc", str(nproc)]
    env = {k: v for k, v in os.environ.items() if k != "GREENTUNE_FAULT"}
    if fault:
        env["GREENTUNE_FAULT"] = fault
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_killed_run_with_checkpointing_resumes_bit_identically(tmp_path, tiny_llama_dir, text_jsonl):
    recipe = _write(tmp_path / "r.yaml", tiny_llama_dir, text_jsonl, activation_checkpointing=True)
    ref = _cli(recipe, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert summary["activation_checkpointing"]["enabled"] is True
    killed = _cli(recipe, tmp_path / "run", fault="checkpoint-write:6")
    assert killed.returncode == -9 and (tmp_path / "run" / "checkpoints" / "step-3").is_dir()
    resumed = _cli(recipe, tmp_path / "run", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _adapter(tmp_path / "ref"), _adapter(tmp_path / "run")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _losses(tmp_path / "run") == _losses(tmp_path / "ref")


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_train_the_same_with_and_without(
    tmp_path, tiny_llama_dir, tiny_mixtral_dir, text_jsonl, parallel
):
    """DDP on a dense base; FSDP2 on a quantised MoE with expert LoRA (its layers sharded)."""
    if parallel == "ddp":
        base, method = tiny_llama_dir, None
    else:
        base, method = (
            tiny_mixtral_dir,
            {
                "quant_base": "q4_0",
                "lora": {"rank": 4, "alpha": 8, "dropout": 0.1, "targets": ["attn", "experts"]},
            },
        )
    runs = {}
    for setting in (False, True):
        recipe = _write(
            tmp_path / f"{setting}.yaml",
            base,
            text_jsonl,
            method,
            parallel=parallel,
            activation_checkpointing=setting,
        )
        proc = _cli(recipe, tmp_path / str(setting), nproc=2)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[setting] = tmp_path / str(setting)
    on = json.loads((runs[True] / "summary.json").read_text())["activation_checkpointing"]
    assert on["enabled"] is True
    assert _losses(runs[True]) == pytest.approx(_losses(runs[False]), rel=1e-6)
    a, b = _adapter(runs[False]), _adapter(runs[True])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_run_may_resume_with_another_setting(tmp_path, tiny_llama_dir, text_jsonl):
    """It changes memory, not results: turning it on to resume a run that ran out of memory is allowed."""
    from greentune.errors import UserError
    from greentune.train.claim import prepare_run_dir

    run = tmp_path / "run"
    prepare_run_dir(run, _recipe(tmp_path, tiny_llama_dir, text_jsonl, activation_checkpointing=False), False)
    prepare_run_dir(run, _recipe(tmp_path, tiny_llama_dir, text_jsonl, activation_checkpointing=True), True)
    with pytest.raises(UserError, match="differs at 'train.lr'"):
        prepare_run_dir(run, _recipe(tmp_path, tiny_llama_dir, text_jsonl, lr=5e-3), True)
