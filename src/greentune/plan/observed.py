"""A finished run's measured speed and power, recorded as a planner calibration of this
machine, so the next `greentune plan` starts from what was measured rather than from the
catalogue's peak numbers.

Torch-free like the rest of `plan/`: it reads the run's ledger rows and loop totals only.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from greentune.fsutil import atomic_write_json
from greentune.models.facts import arch_facts
from greentune.plan.calibrate import ObservedRun, record_observation
from greentune.plan.cost import Technique
from greentune.plan.hardware import detect_this
from greentune.run_dir import RunDir

log = logging.getLogger(__name__)


def record_for_planner(
    run_dir: Path, recipe, dense_base: str, result, ledger, checkpointing: bool = False
) -> dict:
    """This run's measured speed and power as a planner calibration: written to the run dir
    and stored for this machine. `recipe` is the run's `Recipe`, `result` its `LoopResult`
    (tokens, seconds), `ledger` its energy `Ledger`."""
    rows = [r for r in ledger.rows() if r["phase"] == "train"]
    joules = sum(sum(r["joules"].values()) for r in rows) if rows else None
    sources = sorted({s for r in rows for s in r["source"].values()})
    observed = ObservedRun(
        result.tokens,
        result.seconds,
        joules,
        recipe.data.max_seq_len,
        micro_batch=max(1, recipe.train.batch_size // recipe.train.grad_accum),
        power_source="+".join(sources) or "ledger",
    )
    technique = Technique.from_recipe(recipe, "observed run")
    cal = record_observation(
        detect_this(), arch_facts(Path(dense_base)), technique, observed, checkpointing=checkpointing
    )
    data = asdict(cal)
    atomic_write_json(RunDir(run_dir).calibration, data)
    return data


def record_for_planner_optional(
    run_dir: Path, recipe, dense_base: str, result, ledger, checkpointing: bool = False
) -> None:
    """`record_for_planner`, as the optional bookkeeping it is: a cache that cannot be
    written (read-only $HOME, a bad GREENTUNE_CACHE) is one warning, not a failed run."""
    try:
        record_for_planner(run_dir, recipe, dense_base, result, ledger, checkpointing)
    except (OSError, ValueError) as err:
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        log.warning(
            "not recorded as a planner calibration: %s%s", getattr(err, "strerror", None) or err, where
        )
