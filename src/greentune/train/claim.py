"""Claiming a run dir for a recipe, before any work: the lock for the run's life, the temp
files a killed earlier process left, a resume refused on changed data or another recipe,
and the recipe written down. A refusal is one `UserError`, and on every rank of a job."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from greentune import data_identity
from greentune.errors import UserError
from greentune.fsutil import atomic_write_text, remove_stale_temps
from greentune.ownership import RUN, check_run_dir, mark
from greentune.recipe import Recipe
from greentune.run_dir import RunDir
from greentune.runlock import RunLock
from greentune.train import checkpoint
from greentune.train.distributed import DistContext

log = logging.getLogger(__name__)


def _first_difference(a, b, prefix="") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return prefix.rstrip(".") if a != b else None


def prepare_run_dir(run_dir: Path, recipe: Recipe, resume: bool) -> None:
    """Claim `run_dir` for this recipe: refuse another recipe's run, or an accidental overwrite."""
    check_run_dir(run_dir)  # never a folder of the user's: its files would be replaced below
    run = RunDir(run_dir)
    recipe_path = run.recipe_file
    if recipe_path.exists():
        try:
            old = Recipe.model_validate(yaml.safe_load(recipe_path.read_text()) or {}).identity()
        except Exception:  # an unreadable or older recipe is simply "different"
            old = {}
        diff = _first_difference(old, recipe.identity())
        if diff:
            raise UserError(
                f"run dir {run_dir} belongs to a different recipe (differs at '{diff}'); "
                "choose another --run-dir"
            )
        if not resume and checkpoint.list_checkpoints(run.checkpoints):  # progress to lose
            raise UserError(
                f"run dir {run_dir} already holds a run; pass --resume to continue it "
                "or choose another --run-dir"
            )
    elif resume:
        raise UserError(f"--resume: {run_dir} holds no run (no recipe.yaml)")
    run_dir.mkdir(parents=True, exist_ok=True)
    mark(run_dir, RUN)
    if not resume:
        for stale in RunDir.STALE_ON_RESTART:
            (run_dir / stale).unlink(missing_ok=True)
    atomic_write_text(recipe_path, yaml.safe_dump(recipe.dump(), sort_keys=False))


def claim_run_dir(run_dir: Path, recipe: Recipe, resume: bool, ctx: DistContext) -> RunLock | None:
    """Rank 0 locks `run_dir` for the run's life, removes the temp files of a killed earlier
    process, refuses a resume on changed data, and prepares the dir; a refusal stops every
    rank. Returns the lock on rank 0 (None on the others)."""
    held = []

    def claim():
        check_run_dir(run_dir)  # before the lock file is written into someone else's folder
        lock = RunLock.acquire(run_dir)
        try:
            for folder in (run_dir, RunDir(run_dir).export):
                for p in remove_stale_temps(folder):
                    log.info("removed %s, left by a killed run", p)
            data = data_identity.data_identity({"train": recipe.data.train, "eval": recipe.data.eval})
            if resume:
                data_identity.check_unchanged(run_dir, data)
            prepare_run_dir(run_dir, recipe, resume)
            data_identity.store(run_dir, data)
        except BaseException:
            lock.release()
            raise
        held.append(lock)

    ctx.on_main(claim)
    return held[0] if held else None


@contextmanager
def claimed(run_dir: Path, recipe: Recipe, resume: bool, ctx: DistContext) -> Iterator[None]:
    """`claim_run_dir` for the life of the block: the lock is released however it ends."""
    lock = claim_run_dir(run_dir, recipe, resume, ctx)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
