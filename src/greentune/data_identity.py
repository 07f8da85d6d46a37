"""The training data's content, as part of a run's identity.

A resumed run continues at a saved position in the packed data; if the data file changed
in place since, that position points into other text and the result is silently neither
run. So a run stores the content hash of its data (`data-identity.json`) and
`--resume` refuses when they differ. A full hash, not a sample: a change of one byte in
the middle counts. It costs a fraction of a second per 200 MB, against minutes to tokenise it.
"""

from __future__ import annotations

import json
from pathlib import Path

from greentune.data.token_cache import source_digest
from greentune.errors import UserError
from greentune.fsutil import atomic_write_json
from greentune.run_dir import RunDir

IDENTITY_FILE = RunDir.DATA_IDENTITY


def data_identity(sources: dict) -> dict:
    """`{"train": {"path", "sha256"}, "eval": ...}` for the recipe's data sources (None ones left
    out): the same content digest the token cache is keyed by (a file's or folder's bytes, a
    dataset's fingerprint), so a change that would re-tokenise also refuses a resume."""
    return {
        k: {"path": v.label() if hasattr(v, "label") else str(v), "sha256": source_digest(v)}
        for k, v in sources.items()
        if v is not None
    }


def check_unchanged(run_dir: Path, current: dict) -> None:
    """Refuse to resume `run_dir` on data whose content differs from what it started with."""
    stored_path = run_dir / IDENTITY_FILE
    try:
        stored = json.loads(stored_path.read_text())
    except (FileNotFoundError, ValueError, OSError):  # a run from before identities were kept
        return
    for key, was in stored.items() if isinstance(stored, dict) else ():
        now = current.get(key)
        if isinstance(was, dict) and now is not None and was.get("sha256") != now["sha256"]:
            raise UserError(
                f"--resume: data.{key} {now['path']} changed since this run started "
                "(its content hash differs); restore it or start a new run with another --run-dir"
            )


def store(run_dir: Path, current: dict) -> None:
    atomic_write_json(run_dir / IDENTITY_FILE, current)
