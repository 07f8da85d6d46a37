"""Savings measured, not asserted: a short full fine-tune on the same machine as counterfactual.

`measure_full_finetune` trains a fresh copy of the model with *all* parameters trainable
(AdamW) on the run's own batch for a few steps, under the meter, and returns its J/token,
s/token and peak memory. `savings_table` multiplies those by the run's tokens and sets
them against what the run's ledger measured:

    full-fine-tune kWh ≈ J/token(full, measured) × run tokens / 3.6e6
    saved % = 100 × (full − run) / full

The method string travels with every number ("full fine-tune estimated from N measured
steps"), and so does whether the joules were themselves an estimate.
"""
from __future__ import annotations

import gc
import threading
from pathlib import Path
from typing import Callable

import psutil

from greentune.energy.ledger import J_PER_KWH
from greentune.energy.meter import Meter
from greentune.fsutil import atomic_write_json


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

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def measure_full_finetune(model_factory: Callable[[], "torch.nn.Module"], batch: dict, steps: int = 3, *,
                          warmup_steps: int = 1, lr: float = 1e-5, meter: Meter | None = None) -> dict:
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
        del model
        gc.collect()
        if own_meter:
            meter.close()


def _row(quantity: str, unit: str, this_run: float, full: float, method: str, estimate: bool) -> dict:
    saved = full - this_run
    return {"quantity": quantity, "unit": unit, "this_run": this_run, "full_fine_tune": full,
            "saved": saved, "saved_pct": (100.0 * saved / full) if full > 0 else None,
            "method": method, "estimate": estimate}


def savings_table(run_tokens: int, run_joules: float, run_seconds: float, full: dict,
                  run_peak_mem_bytes: int | None = None, run_estimate: bool = False) -> list[dict]:
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
        _row("energy", "kWh", run_joules / J_PER_KWH, full["j_per_token"] * run_tokens / J_PER_KWH, method, est),
        _row("time", "s", float(run_seconds), full["s_per_token"] * run_tokens, method, False),
    ]
    if run_peak_mem_bytes is not None:
        rows.append(_row("peak memory", "bytes", float(run_peak_mem_bytes), float(full["peak_mem_bytes"]),
                         f"measured: {full.get('peak_mem_kind', 'peak memory')} of the full fine-tune steps", False))
    return rows


def save_savings(run_dir: str | Path, full: dict, rows: list[dict]) -> Path:
    """Write `run_dir/savings.json` ({"full_fine_tune": full, "rows": rows}) atomically; the report reads it."""
    path = Path(run_dir) / "savings.json"
    atomic_write_json(path, {"full_fine_tune": full, "rows": rows})
    return path
