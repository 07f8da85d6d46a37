"""The training data's content, as part of a run's identity.

A resumed run continues at a saved position in the packed data; if the data file changed
in place since, that position points into other text and the result is silently neither
run. So a run stores the size and sha256 of its data (`data-identity.json`) and
`--resume` refuses when they differ. A full hash, not a sample: a change of one byte in
the middle counts. It costs a fraction of a second per 200 MB, against minutes to tokenise it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import UserError
from .fsutil import atomic_write_json

IDENTITY_FILE = "data-identity.json"


def _digest_path(path: Path) -> dict | None:
    """Size and sha256 of a file, or of a folder's files (names and contents, sorted); None
    for what is not a local path (nothing to hash)."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file())
    else:
        return None
    h, size = hashlib.sha256(), 0
    for f in files:
        if f != path:
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
        size += f.stat().st_size
    return {"bytes": size, "sha256": h.hexdigest()}


def data_identity(sources: dict[str, str | None]) -> dict:
    """`{"train": {...}, "eval": {...}}` for the recipe's data paths (None ones left out)."""
    return {k: {"path": str(v), **d} for k, v in sources.items()
            if v is not None and (d := _digest_path(Path(v))) is not None}


def check_unchanged(run_dir: Path, current: dict) -> None:
    """Refuse to resume `run_dir` on data whose content differs from what it started with."""
    stored_path = run_dir / IDENTITY_FILE
    try:
        stored = json.loads(stored_path.read_text())
    except (FileNotFoundError, ValueError, OSError):  # a run from before identities were kept
        return
    for key, was in stored.items() if isinstance(stored, dict) else ():
        now = current.get(key)
        if isinstance(was, dict) and now is not None and (was.get("sha256"), was.get("bytes")) != (
                now["sha256"], now["bytes"]):
            raise UserError(f"--resume: data.{key} {now['path']} changed since this run started "
                            f"({was.get('bytes')} -> {now['bytes']} bytes, content hash differs); "
                            "restore it or start a new run with another --run-dir")


def store(run_dir: Path, current: dict) -> None:
    atomic_write_json(run_dir / IDENTITY_FILE, current)
