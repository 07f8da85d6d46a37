"""A run's outcome: what `train` returns, and what `summary.json` keeps of it (what the run
trained, how far it got, what it wrote and what it cost)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from greentune.energy.hardware import describe_hardware
from greentune.fsutil import atomic_write_json

ENERGY_KEYS = ("it_kwh", "facility_kwh", "kg_co2e", "water_l", "estimate")


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    tokens: int
    seconds: float
    eval_loss: float | None = None
    stopped: str | None = None
    signal: int | None = None  # the signal (SIGTERM, SIGINT) that stopped training, if one did
    outputs: dict = field(default_factory=dict)
    energy: dict = field(default_factory=dict)

    @classmethod
    def of(cls, run_dir: Path, loop) -> RunResult:
        """The outcome so far of a run whose training loop returned `loop` (a `LoopResult`)."""
        return cls(run_dir, loop.step, loop.tokens, loop.seconds, stopped=loop.stopped, signal=loop.signal)

    @property
    def eval_ppl(self) -> float | None:
        return math.exp(self.eval_loss) if self.eval_loss is not None else None

    def write_summary(
        self, path: Path, recipe, model: dict, job: dict, checkpointing: dict, compute: dict | None = None
    ) -> None:
        """`summary.json` at `path`: `model` holds the trainable parameters and LoRA modules,
        `job` the ranks and parallelism, `checkpointing` the activation checkpointing applied,
        `compute` the model FLOPs per token and achieved FLOP/s (`train.metrics.run_compute`)."""
        atomic_write_json(
            path,
            {
                "base_model": recipe.base_model,
                "base_model_commit": recipe.base_model_commit,
                "steps": self.steps,
                "tokens": self.tokens,
                "seconds": self.seconds,
                "eval_loss": self.eval_loss,
                "eval_ppl": self.eval_ppl,
                **model,
                "outputs": self.outputs,
                "hardware": describe_hardware(),
                **job,
                "activation_checkpointing": checkpointing,
                "compute": compute,
                "energy": {k: self.energy[k] for k in ENERGY_KEYS},
            },
        )
