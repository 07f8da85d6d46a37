"""A run's energy, phase by phase: `with phases("merge"): ...` meters the block into the
run's ledger (the training loop's own meter is `train.energy_hook.EnergyHook`, on the same
meter and ledger), and the counterfactual (full
fine-tuning of the same model and batch) is measured on the same meter.

In a job each device is metered by exactly one rank (see `Meter.auto`), so the ranks'
ledgers add up to the job's energy without counting a device twice.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from greentune.energy.factors import Factors
from greentune.energy.ledger import Ledger
from greentune.energy.meter import Meter
from greentune.energy.savings import full_finetune_counterfactual, save_savings, savings_table
from greentune.faults import maybe_fault
from greentune.recipe import Recipe


class Phases:
    """Meters named phases of a run into its ledger: `with phases("merge"): ...`. `ctx` is the
    job's `train.distributed.DistContext` (None: a single process)."""

    def __init__(self, run_dir: Path, recipe: Recipe, ctx=None):
        e = recipe.energy
        self.ctx = ctx
        if ctx is None or ctx.world == 1:
            self.meter = Meter.auto()
        else:  # each device metered by exactly one rank (see Meter.auto)
            import torch  # only a job has ranks to tell apart (energy/ imports without torch)

            self.meter = Meter.auto(
                scope="self",
                host=ctx.local_rank == 0,
                gpu_index=ctx.local_rank if torch.cuda.is_available() else None,
            )
        self.ledger = Ledger(
            run_dir,
            Factors.for_region(
                e.region,
                pue=e.pue,
                wue_onsite=e.wue_onsite,
                grid_g_per_kwh=e.grid_g_per_kwh,
                offsite_l_per_kwh=e.offsite_l_per_kwh,
            ),
            ctx=ctx,
        )

    @contextmanager
    def __call__(self, name: str):
        maybe_fault(f"phase:{name}")
        with self.meter.phase(name) as window:
            yield window
        self.ledger.record(window.result)

    def close(self) -> None:
        self.meter.close()

    def __enter__(self) -> Phases:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def measure_savings(
    phases: Phases, run_dir: Path, base: str, device, batch: dict, tokens: int, seconds: float
) -> None:
    """The counterfactual, measured here: a few steps of full fine-tuning of the same model (or of
    a slice of its layers, or the planner's model of it, when it would not fit) and batch, set
    against the training phase of this run's ledger (`tokens` in `seconds`)."""
    full = full_finetune_counterfactual(
        base, device, batch, steps=3, meter=phases.meter
    )  # never what cannot fit
    rows_train = [r for r in phases.ledger.rows() if r["phase"] == "train"]
    run_joules = sum(sum(r["joules"].values()) for r in rows_train)
    estimate = any(src == "estimate" for r in rows_train for src in r["source"].values())
    save_savings(run_dir, full, savings_table(tokens, run_joules, seconds, full, run_estimate=estimate))
