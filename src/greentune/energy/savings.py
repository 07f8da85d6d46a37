"""Savings measured, not asserted: a short full fine-tune on the same machine as counterfactual.

`measure_full_finetune` trains a fresh copy of the model with *all* parameters trainable
(AdamW) on the run's own batch for a few steps, under the meter, and returns its J/token,
s/token and peak memory. `savings_table` multiplies those by the run's tokens and sets
them against what the run's ledger measured:

    full-fine-tune kWh ≈ J/token(full, measured) × run tokens / 3.6e6
    saved % = 100 × (full − run) / full

The method string travels with every number ("full fine-tune estimated from N measured
steps"), and so does whether the joules were themselves an estimate.

**At any size** (`full_finetune_counterfactual`, what a run calls): the counterfactual never
allocates what cannot fit. The planner's memory model (`plan.cost.memory_breakdown`, full
fine-tune, the run's batch) is set against the memory this process may use
(`plan.hardware.run_memory_bytes`: a CUDA device's memory, on the CPU the available RAM;
``GREENTUNE_MEMORY_GB`` caps it). In order:

1. the whole model fits: load it and measure it, as above;
2. else a slice fits, k < L decoder layers of the same shapes (built from the config with
   ``num_hidden_layers=k``, random weights: only time, energy and memory matter), same
   batch: measure it and a slice of no layers (embedding, final norm, head), and scale by
   layer count, ``cost = cost₀ + L · (cost_k − cost₀) / k`` per token (the non-layer parts
   counted once); method "full fine-tune measured on k of L layers, scaled". A model whose
   layers differ in shape (dense and MoE layers mixed) is not sliced;
3. else the calibrated planner models it (`plan.cost.estimate`, this machine's calibrated
   utilisation and power when there are any): method "modelled by the planner", an estimate.

When the whole model was not measured, its peak memory is the planner's.
"""

from __future__ import annotations

import copy
import gc
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from greentune.energy.ledger import J_PER_KWH
from greentune.energy.meter import Meter
from greentune.fsutil import atomic_write_json
from greentune.run_dir import RunDir

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: decoder layers in a measured slice (fewer when the model has no more, or they do not fit)
SLICE_LAYERS = 2


class PeakRss:
    """Samples this process's RSS in a thread; `peak` is the largest seen, bytes."""

    def __init__(self, interval_s: float = 0.02):
        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def measure_full_finetune(
    model_factory: Callable[[], torch.nn.Module],
    batch: dict,
    steps: int = 3,
    *,
    warmup_steps: int = 1,
    lr: float = 1e-5,
    meter: Meter | None = None,
) -> dict:
    """Time and meter `steps` steps of full fine-tuning of a fresh model on `batch`.

    Args:
        model_factory: returns the model (a Hugging Face causal LM: `model(**batch).loss`),
            already on the device the run used.
        batch: dict with ``input_ids`` and ``labels`` (and optionally ``attention_mask``),
            the same shape as a training batch of the run.
        steps: measured optimiser steps (after `warmup_steps` unmeasured ones, which
            allocate the AdamW state and warm caches).
        lr: AdamW learning rate (the values do not matter, the cost does).
        meter: a meter to use; None makes `Meter.auto(scope="self")` and closes it.

    Returns:
        dict(j_per_token, s_per_token, peak_mem_bytes, peak_mem_kind, steps, tokens_per_step,
        seconds, joules {component: J}, source {component: name}, estimate, trainable_params,
        method="full fine-tune estimated from N measured steps").
        Tokens are ``input_ids.numel()`` per step (tokens processed, padding included).
    """
    import torch

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    own_meter = meter is None
    meter = meter or Meter.auto(scope="self")
    model = model_factory()
    try:
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        model.train()
        device = params[0].device
        inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        tokens_per_step = int(inputs["input_ids"].numel())
        opt = torch.optim.AdamW(params, lr=lr)
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)

        def step() -> None:
            loss = model(**inputs).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        with PeakRss() as rss:
            for _ in range(warmup_steps):
                step()
            with meter.phase("full-finetune-probe") as window:
                for _ in range(steps):
                    step()
        m = window.result
        peak = int(torch.cuda.max_memory_allocated(device)) if cuda else int(rss.peak)
        tokens = tokens_per_step * steps
        return {
            "j_per_token": m.total_joules / tokens,
            "s_per_token": m.seconds / tokens,
            "peak_mem_bytes": peak,
            "peak_mem_kind": "torch.cuda.max_memory_allocated" if cuda else "process peak RSS (sampled)",
            "steps": steps,
            "tokens_per_step": tokens_per_step,
            "seconds": m.seconds,
            "joules": dict(m.joules),
            "source": dict(m.source),
            "estimate": m.is_estimate,
            "trainable_params": sum(p.numel() for p in params),
            "method": f"full fine-tune estimated from {steps} measured steps",
        }
    finally:
        model = None  # drop the model (the `step` closure shares this binding) before collecting
        gc.collect()
        if own_meter:
            meter.close()


def _sliced_config(config, layers: int):
    """`config` with `layers` decoder layers (per-layer lists cut to match)."""
    cfg = copy.deepcopy(config)
    total = cfg.num_hidden_layers
    for key, value in list(vars(cfg).items()):
        if isinstance(value, list) and len(value) == total and key != "architectures":
            setattr(cfg, key, value[:layers])
    cfg.num_hidden_layers = layers
    return cfg


def full_finetune_memory(config, batch_rows: int, seq_len: int, device) -> float:
    """The planner's peak bytes of a full fine-tune of `config` on a batch of `batch_rows` × `seq_len`."""
    from greentune.models.facts import arch_facts
    from greentune.plan.cost import Technique, Workload, memory_breakdown
    from greentune.plan.hardware import this_hardware_for

    w = Workload(tokens=batch_rows * seq_len, seq_len=seq_len, micro_batch=batch_rows)
    hw = this_hardware_for(device)
    return memory_breakdown(arch_facts(config.to_dict()), Technique("full", "full"), w, hw)["total"]


def _random_slice_factory(config, layers: int, device):
    """Builds the first `layers` layers' model with random weights (the RNG of the run is
    left as it was: the weights' values do not matter, only their shapes)."""

    def build():
        import torch
        from transformers import AutoModelForCausalLM

        from greentune.models.loader import compute_dtype

        with torch.random.fork_rng(devices=[]):
            return AutoModelForCausalLM.from_config(
                _sliced_config(config, layers), dtype=compute_dtype(device)
            ).to(device)

    return build


_SLICE_KEYS = ("j_per_token", "s_per_token", "peak_mem_bytes", "trainable_params")


def _measure_slice(config, k: int, device, batch: dict, steps: int, meter, whole_bytes: float) -> dict:
    """Measure k layers and no layers, and scale to the model's L (module docstring)."""
    from greentune.models.facts import arch_facts

    total_layers = config.num_hidden_layers
    part = measure_full_finetune(_random_slice_factory(config, k, device), batch, steps, meter=meter)
    base = measure_full_finetune(_random_slice_factory(config, 0, device), batch, steps, meter=meter)
    out = dict(part)
    for key in ("j_per_token", "s_per_token"):
        per_layer = (part[key] - base[key]) / k
        if per_layer > 0:
            out[key] = base[key] + total_layers * per_layer
        else:  # a noisy machine measured the layers as free: scale the whole slice instead
            out[key] = part[key] * total_layers / k
    out.update(
        peak_mem_bytes=int(whole_bytes),
        peak_mem_kind="modelled by the planner (a full copy would not fit)",
        trainable_params=arch_facts(config.to_dict()).total_params,
        method=f"full fine-tune measured on {k} of {total_layers} layers, scaled",
        slice={
            "layers": k,
            "of": total_layers,
            "weights": "random: only time, energy and memory matter",
            "measured": {key: part[key] for key in _SLICE_KEYS},
            "no_layers": {key: base[key] for key in _SLICE_KEYS},
        },
    )
    return out


def _modelled(config, device, batch: dict, steps: int, whole_bytes: float) -> dict:
    """The calibrated planner's full fine-tune of the whole model on this machine."""
    from greentune.models.facts import arch_facts
    from greentune.plan.calibrate import load_calibration, utilisation_for
    from greentune.plan.cost import Technique, Workload, estimate
    from greentune.plan.hardware import this_hardware_for
    from greentune.plan.recommend import site_factors

    rows, seq = batch["input_ids"].shape
    facts = arch_facts(config.to_dict())
    hw = this_hardware_for(device)
    t = Technique("full", "full")
    w = Workload(tokens=rows * seq * steps, seq_len=seq, micro_batch=rows)
    cal = load_calibration(hw)
    found = utilisation_for(hw, facts, t)
    util = found[0] if found else (cal.utilisation if cal else None)
    e = estimate(facts, t, w, hw, site_factors(hw), 1, util, cal.power_w if cal else None)
    tokens = w.tokens
    basis = found[1] if found else (cal.method if cal else "default utilisation, uncalibrated")
    return {
        "j_per_token": e.it_kwh * J_PER_KWH / tokens,
        "s_per_token": e.seconds / tokens,
        "peak_mem_bytes": int(whole_bytes),
        "peak_mem_kind": "modelled by the planner",
        "steps": 0,
        "tokens_per_step": rows * seq,
        "seconds": e.seconds,
        "joules": {"all": e.it_kwh * J_PER_KWH},
        "source": {"all": "planner"},
        "estimate": True,
        "trainable_params": facts.total_params,
        "method": "modelled by the planner",
        "planner": {
            "utilisation": e.utilisation,
            "utilisation_basis": basis,
            "power_w": e.power_w,
            "calibrated": cal is not None,
        },
    }


def full_finetune_counterfactual(
    model_dir,
    device,
    batch: dict,
    steps: int = 3,
    *,
    meter: Meter | None = None,
    memory_bytes: float | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """The run's counterfactual, measured whole, on a slice, or modelled (module docstring).

    Args:
        model_dir: the base the run fine-tuned (a local Hugging Face model folder).
        device: where the run trained.
        batch: the run's first batch (``input_ids``, ``labels``, ``attention_mask``).
        memory_bytes: the memory that may be used; default `plan.hardware.run_memory_bytes`.
    Returns:
        `measure_full_finetune`'s dict; its ``method`` says which of the three it was, and
        ``fit`` what was compared (bytes).
    """
    from greentune.models import loader
    from greentune.models.facts import arch_facts
    from greentune.plan.hardware import GB, run_memory_bytes

    config = loader.load_config(loader.check_model_dir(model_dir), trust_remote_code)
    rows, seq = batch["input_ids"].shape
    source = "given"
    if memory_bytes is None:
        memory_bytes, source = run_memory_bytes(device)
    whole = full_finetune_memory(config, rows, seq, device)
    fit = {"available_bytes": memory_bytes, "available_source": source, "whole_bytes": whole}
    if whole <= memory_bytes:
        out = measure_full_finetune(
            lambda: loader.load_model(model_dir, device=device, trust_remote_code=trust_remote_code),
            batch,
            steps,
            meter=meter,
        )
        return {**out, "fit": fit}
    facts = arch_facts(config.to_dict())
    uniform = facts.moe_layers in (0, facts.layers)
    layers = config.num_hidden_layers
    for k in range(min(SLICE_LAYERS, layers - 1), 0, -1) if uniform else ():
        need = full_finetune_memory(_sliced_config(config, k), rows, seq, device)
        if need <= memory_bytes:
            log.info(
                "savings: a full fine-tune needs %.2f GB > %.2f GB (%s); measuring %d of %d layers",
                whole / GB,
                memory_bytes / GB,
                source,
                k,
                layers,
            )
            return {
                **_measure_slice(config, k, device, batch, steps, meter, whole),
                "fit": {**fit, "slice_bytes": need},
            }
    log.info(
        "savings: a full fine-tune needs %.2f GB > %.2f GB (%s)%s; modelled by the planner",
        whole / GB,
        memory_bytes / GB,
        source,
        "" if uniform else ", and its layers differ in shape",
    )
    return {**_modelled(config, device, batch, steps, whole), "fit": fit}


def _row(quantity: str, unit: str, this_run: float, full: float, method: str, estimate: bool) -> dict:
    saved = full - this_run
    return {
        "quantity": quantity,
        "unit": unit,
        "this_run": this_run,
        "full_fine_tune": full,
        "saved": saved,
        "saved_pct": (100.0 * saved / full) if full > 0 else None,
        "method": method,
        "estimate": estimate,
    }


def savings_table(
    run_tokens: int,
    run_joules: float,
    run_seconds: float,
    full: dict,
    run_peak_mem_bytes: int | None = None,
    run_estimate: bool = False,
) -> list[dict]:
    """Rows comparing the run with full fine-tuning of the same tokens.

    Args:
        run_tokens: tokens the run trained on (same definition as `tokens_per_step`).
        run_joules: IT joules of the run's training (from the ledger), joules.
        run_seconds: the run's training time, seconds.
        full: the dict from `measure_full_finetune`.
        run_peak_mem_bytes: the run's peak memory, bytes (adds a memory row).
        run_estimate: whether the run's joules were modelled.

    Returns:
        list of dict(quantity, unit, this_run, full_fine_tune, saved, saved_pct, method,
        estimate); quantities ``energy`` (kWh), ``time`` (s) and, when given, ``peak memory``
        (bytes).
    """
    method = full["method"]
    est = bool(full.get("estimate")) or run_estimate
    rows = [
        _row(
            "energy", "kWh", run_joules / J_PER_KWH, full["j_per_token"] * run_tokens / J_PER_KWH, method, est
        ),
        _row("time", "s", float(run_seconds), full["s_per_token"] * run_tokens, method, False),
    ]
    if run_peak_mem_bytes is not None:
        rows.append(
            _row(
                "peak memory",
                "bytes",
                float(run_peak_mem_bytes),
                float(full["peak_mem_bytes"]),
                f"measured: {full.get('peak_mem_kind', 'peak memory')} of the full fine-tune steps",
                False,
            )
        )
    return rows


def save_savings(run_dir: str | Path, full: dict, rows: list[dict]) -> Path:
    """Write `run_dir/savings.json` ({"full_fine_tune": full, "rows": rows}) atomically; the report reads
    it."""
    path = RunDir(run_dir).savings
    atomic_write_json(path, {"full_fine_tune": full, "rows": rows})
    return path
