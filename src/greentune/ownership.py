"""Which folders greentune made, so that it only ever replaces or deletes those.

Every folder greentune writes as a whole (a run dir, an upcycled model) gets a small marker
file, ``.greentune``, naming what it is. A command that would replace or delete an existing
folder first asks `check_replaceable`: an empty or missing folder, or one carrying greentune's
marker of the same kind, may go; anything else is the user's and is refused with one line
naming the path, unless the user passes ``--force``. A folder that holds a model being read
(the source of an upcycle) is never replaced, ``--force`` or not.
"""

from __future__ import annotations

import json
from pathlib import Path

from greentune.errors import UserError
from greentune.fsutil import atomic_write_text
from greentune.run_dir import RunDir
from greentune.runlock import LOCK_NAME

MARKER = RunDir.MARKER


def mark(folder: str | Path, kind: str) -> None:
    """Record in `folder` that greentune made it, as a `kind` ("run", "upcycled-model")."""
    atomic_write_text(Path(folder) / MARKER, json.dumps({"made_by": "greentune", "kind": kind}) + "\n")


def made_by_greentune(folder: str | Path, kind: str) -> bool:
    """True when `folder` carries greentune's marker of this `kind`."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("made_by") == "greentune" and data.get("kind") == kind


def _contains(folder: Path, inner: Path) -> bool:
    folder, inner = folder.resolve(), inner.resolve()
    return inner == folder or folder in inner.parents


def check_replaceable(folder: str | Path, kind: str, force: bool = False, protect: tuple = ()) -> None:
    """Refuse (UserError) to replace `folder` unless greentune made it as `kind`, it is empty, or `force`.

    `protect`: paths that must survive whatever happens; a `folder` containing one is refused always."""
    folder = Path(folder)
    for p in protect:
        if _contains(folder, Path(p)):
            raise UserError(f"{folder} contains {p}, which this command reads; choose another output folder")
    if not folder.exists():
        return
    if not folder.is_dir():
        raise UserError(f"{folder} exists and is not a folder; choose another path")
    if force or made_by_greentune(folder, kind) or not any(folder.iterdir()):
        return
    raise UserError(
        f"{folder} already exists, is not empty and was not made by greentune; "
        "choose another folder or pass --force to replace it"
    )


RUN = "run"


def is_run_dir(folder: str | Path) -> bool:
    """A run dir greentune made: its marker, or (runs from before the marker) its `recipe.yaml`
    next to a `checkpoints/` folder, which only greentune's training loop writes."""
    run = RunDir(folder)
    return made_by_greentune(folder, RUN) or (run.has_recipe() and run.checkpoints.is_dir())


def check_run_dir(folder: str | Path) -> None:
    """Refuse a `--run-dir` that is a file, or an existing non-empty folder that is not a greentune run."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"run dir {folder} is a file, not a folder; choose another --run-dir")
    if folder.is_dir() and any(p.name != LOCK_NAME for p in folder.iterdir()) and not is_run_dir(folder):
        raise UserError(
            f"run dir {folder} already exists, is not empty and is not a greentune run; "
            "choose another --run-dir (greentune never deletes files it did not write)"
        )
