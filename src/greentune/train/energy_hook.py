"""The training loop's energy hook: per-step joules in metrics, ledger intervals, the budget.

Wiring (in the pipeline)::

    hook = EnergyHook(meter, ledger, interval_steps=recipe.energy.interval_steps,
                      budget_kwh=recipe.energy.budget_kwh)
    run_training(..., hooks=[hook, ...])

What it does:

* the meter is read every `interval_steps` steps (each read costs the estimate fallback a
  scan of the process table, ~1 % of a small step), or every step when a budget is set, so
  that the budget stops at the step that reaches it; the metrics line of each step that read
  it gets ``joules`` (cumulative IT joules of training so far, carried across `--resume`
  through the checkpoint), ``step_joules`` (the joules per step since the previous read,
  including whatever the loop did in between: eval, checkpointing) and ``joules_steps``
  (how many steps that read covers);
* every `interval_steps` steps, and at the end or interruption, appends one ``train``
  row to the ledger for the interval;
* when the ledger's IT kWh (all phases, all sessions) plus the open interval reach
  `budget_kwh`, it records the interval and asks the loop to stop, which checkpoints.

In a distributed job (`ctx`), joules are summed over ranks, so metrics, ledger rows and
the budget all see the whole job; every rank calls the hook at the same steps.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from greentune.energy.ledger import J_PER_KWH, Ledger
from greentune.energy.meter import Meter, Window
from greentune.train.hooks import TrainHook

log = logging.getLogger(__name__)

_STATE_KEY = "energy.train_joules"


class EnergyHook(TrainHook):
    """Meters training steps into `metrics.jsonl` and `ledger.jsonl`; stops at the budget.

    Args:
        meter: the run's meter.
        ledger: the run's ledger.
        interval_steps: training steps per ledger row.
        budget_kwh: IT kWh after which training stops (None: no budget).
        phase: the ledger phase name of training rows.
    """

    def __init__(
        self,
        meter: Meter,
        ledger: Ledger,
        interval_steps: int = 10,
        budget_kwh: float | None = None,
        phase: str = "train",
        ctx=None,
    ):
        if interval_steps < 1:
            raise ValueError(f"interval_steps must be >= 1, got {interval_steps}")
        self.meter, self.ledger = meter, ledger
        self.ctx = ctx  # a train.distributed.DistContext, or None for a single process
        self.interval_steps, self.budget_kwh, self.phase = interval_steps, budget_kwh, phase
        self.train_joules = 0.0  # cumulative over all sessions of this run, J
        self.window: Window | None = None
        self.window_steps = 0
        self.recorded_kwh = 0.0
        self.last_total = 0.0
        self.read_every = 1 if budget_kwh is not None else interval_steps
        self.unread_steps = 0

    def _total(self) -> float:
        return sum(self.meter.read().values())

    def _job_sum(self, joules: float) -> float:
        """`joules` summed over the ranks of the job (this process's alone otherwise)."""
        return self.ctx.sum(joules)[0] if self.ctx is not None and self.ctx.active else joules

    def on_start(self, step: int) -> None:
        self.recorded_kwh = self.ledger.totals()["it_kwh"]
        self.window, self.window_steps = self.meter.start(self.phase), 0
        self.last_total = self._total()

    def _flush(self) -> None:
        if self.window is None:
            return
        m = self.window.end()
        self.window = None
        if self.window_steps:
            row = self.ledger.record(m)
            self.recorded_kwh += row["it_kwh"]
        self.window_steps = 0

    def after_step(self, step: int, optimizer) -> dict:
        self.window_steps += 1
        self.unread_steps += 1
        if step % self.read_every and step % self.interval_steps:
            return {}  # every rank skips the same steps: the job sum stays a collective of all
        now = self._total()
        joules, self.last_total = self._job_sum(max(0.0, now - self.last_total)), now
        self.train_joules += joules
        n, self.unread_steps = self.unread_steps, 0
        if step % self.interval_steps == 0:
            self._flush()
            self.window = self.meter.start(self.phase)
        return {"joules": self.train_joules, "step_joules": joules / n, "joules_steps": n}

    def should_stop(self) -> str | None:
        if self.budget_kwh is None or self.window is None:
            return None
        open_kwh = self._job_sum(sum(self.window.peek().values())) / J_PER_KWH
        if self.recorded_kwh + open_kwh < self.budget_kwh:
            return None
        self._flush()
        self.window = self.meter.start(self.phase)
        msg = self.ledger.budget_message(self.budget_kwh)
        log.warning(msg)
        return msg

    @contextmanager
    def separate_phase(self, name: str):
        """Meter a sub-phase inside training (e.g. a ReLoRA merge) as its own ledger row.

        The open training interval is closed first and a new one opened after, and the
        sub-phase's joules are kept out of the training joules, so nothing is counted twice.
        """
        self._catch_up()
        self._flush()
        with self.meter.phase(name) as window:
            yield window
        self.recorded_kwh += self.ledger.record(window.result)["it_kwh"]
        self.last_total = self._total()
        self.window = self.meter.start(self.phase)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        self._catch_up()  # the checkpoint's cumulative joules include every step before it
        return {_STATE_KEY: torch.tensor(self.train_joules, dtype=torch.float64)}

    def restore_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if _STATE_KEY in tensors:
            self.train_joules = float(tensors[_STATE_KEY])

    def _catch_up(self) -> None:
        """Add the joules of steps since the last read to the training total (ranks alike)."""
        if self.unread_steps:
            now = self._total()
            self.train_joules += self._job_sum(max(0.0, now - self.last_total))
            self.last_total, self.unread_steps = now, 0

    def on_end(self, step: int) -> None:
        self._catch_up()
        self._flush()
