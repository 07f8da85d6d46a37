"""The run's `metrics.jsonl` and its compute efficiency.

`MetricsFile` appends one JSON line per step and flushes it (a killed process loses at most
the line being written: the kernel holds what was flushed); it fsyncs only where durability
is needed, before each checkpoint and at the end, because lines after the newest checkpoint
are dropped on `--resume` anyway. An fsync per step cost a disk round trip every step.

Compute efficiency: every line carries ``flops_per_token`` (model FLOPs per trained token,
`training_flops_per_token`) and ``flops_per_s`` (this step's tokens × that / its seconds);
`efficiency` sums a run's lines into its mean achieved FLOP/s and, against a peak, the
utilisation that `summary.json` and the report show.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from greentune.errors import user_os_error


class MetricsFile:
    """An open `metrics.jsonl` in append mode (see the module docstring)."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path, self._f = Path(path), None
        if enabled:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held for the run
            except OSError as err:
                raise user_os_error(err, self.path) from None

    def append(self, record: dict) -> None:
        if self._f is None:
            return
        try:
            self._f.write(json.dumps(record, sort_keys=True) + "\n")
            self._f.flush()
        except OSError as err:
            raise user_os_error(err, self.path) from None

    def sync(self) -> None:
        if self._f is not None:
            try:
                os.fsync(self._f.fileno())
            except OSError as err:
                raise user_os_error(err, self.path) from None

    def close(self) -> None:
        if self._f is not None:
            try:
                self.sync()
            finally:
                self._f.close()
                self._f = None


def training_flops_per_token(
    facts, trainable_params: int, seq_len: int, checkpointing: bool = False, full: bool = False
) -> float:
    """Model FLOPs per trained token of a step, from `models.facts` (the planner's rule,
    `plan.cost.flops_per_token`, with the adapter's parameter count as counted on the model).

    N = active matmul parameters, A = attention FLOPs per token over `seq_len` (causal),
    P = trainable (adapter) parameters: LoRA 4N + 3A + 6P (forward 2N + A, input gradients
    2N + 2A, the adapters' weight gradients); full fine-tuning 6N + 3A; activation
    checkpointing adds the recomputed forward."""
    n = facts.active_matmul_params
    a = facts.attention_flops_per_token(seq_len)
    p = 0 if full else trainable_params
    f = 6.0 * n + 3.0 * a if full else 4.0 * n + 3.0 * a + 6.0 * p
    if checkpointing:
        f += 2.0 * (n - facts.vocab * facts.hidden) + a + 2.0 * p
    return f


def efficiency(records: list[dict], peak_flops: float | None = None) -> dict | None:
    """A run's compute efficiency from its metrics lines: mean achieved FLOP/s (Σ tokens ×
    FLOPs per token / Σ step seconds) and, given the device's peak, the utilisation; None
    when no line carries FLOPs."""
    lines = [r for r in records if "flops_per_token" in r and r.get("step_seconds", 0) > 0]
    if not lines:
        return None
    work = seconds = 0.0
    last_tokens = 0
    for r in sorted(lines, key=lambda r: r["step"]):
        step_tokens = r.get("step_tokens", r["tokens"] - last_tokens)
        last_tokens = r["tokens"]
        work += step_tokens * r["flops_per_token"]
        seconds += r["step_seconds"]
    out = {"flops_per_token": lines[-1]["flops_per_token"], "mean_flops_per_s": work / seconds}
    if peak_flops:
        out["peak_flops"] = float(peak_flops)
        out["utilisation"] = out["mean_flops_per_s"] / float(peak_flops)
    return out


def run_compute(records: list[dict], device="cpu") -> dict | None:
    """`efficiency` of a run's metrics lines against this device's peak FLOP/s (the planner's
    hardware catalogue entry for it, `plan.hardware.this_hardware_for`), named with its source;
    None when no line carries FLOPs."""
    try:
        from greentune.plan.hardware import this_hardware_for

        hw = this_hardware_for(device)
        peak, source = hw.peak_flops, f"{hw.name} (greentune's hardware catalogue)"
    except Exception as e:  # no catalogue entry: the achieved rate alone
        peak, source = None, f"unknown ({e})"
    out = efficiency(records, peak)
    if out is not None and peak:
        out["peak_source"] = source
    return out
