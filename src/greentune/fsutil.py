"""Crash-safe file writing: write to a temporary name in the same folder, fsync, rename.

A reader (or a resumed run) therefore sees either the old file or the complete new one,
never a half-written one, even after SIGKILL.

Temporary names carry the writer's PID (`.NAME.greentune-PID-XXXX.tmp`), so that
`remove_stale_temps` can delete what a killed greentune left behind, and nothing else: not
another live process's temp, not a file greentune did not name.

`tempfile` creates its files 0600 and folders 0700 whatever the umask; the temporary names
here are given the modes an ordinary `open`/`mkdir` would (0666/0777 less the umask), so
what is renamed into place is as readable as any other file the user writes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from greentune.errors import user_os_error
from greentune.faults import maybe_fault

_TEMP_RE = re.compile(r"^\..+\.greentune-(\d+)-[^/]*\.tmp$")


def temp_prefix(path: str | Path) -> str:
    """The prefix of this process's temporary names for `path` (see `remove_stale_temps`)."""
    return f".{Path(path).name}.greentune-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temp files and folders in `folder` (not below) that a greentune process,
    no longer running, left when it was killed mid-write; return what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMP_RE.match(p.name)
        if not m or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask (read by setting and restoring it; there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mkstemp_beside(path: Path) -> tuple[int, str]:
    """An open temporary file next to `path`, with the umask's ordinary file mode; a full disk
    or a read-only folder is a `UserError` naming `path` (see `errors.user_os_error`)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise user_os_error(err, path) from None
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def temp_file_beside(path: str | Path) -> Path:
    """A new empty hidden file next to `path` (umask mode), for writers that open it by name."""
    fd, tmp = _mkstemp_beside(Path(path))
    os.close(fd)
    return Path(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = _mkstemp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        maybe_fault(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise user_os_error(err, path) from None
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def temp_sibling(path: str | Path) -> Path:
    """A new empty hidden folder next to `path`, for `atomic_dir`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent))
    except OSError as err:
        raise user_os_error(err, path) from None
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


@contextmanager
def atomic_dir(path: str | Path, tmp: str | Path | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path` in one rename.

    Files written inside are fsynced before the rename. On error the temporary folder is
    removed and `path` is left as it was. `tmp`: a folder from `temp_sibling(path)` that
    others (e.g. other ranks) already wrote into.
    """
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else temp_sibling(path)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        maybe_fault(f"write:{path.name}")
        if path.exists():
            old = path.with_name(temp_prefix(path) + "old.tmp")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):  # a full disk or read-only folder: one line naming `path`
            raise user_os_error(err, path) from None
        raise


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line and fsync it, so a SIGKILL loses at most the line in flight."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise user_os_error(err, path) from None


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSON-lines file written by `append_jsonl`, ignoring a torn last line."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out
