"""One greentune process per run dir: an exclusive `flock` on `RUN_DIR/.greentune.lock`.

Two trainers on one run dir would interleave metrics and count energy twice in the ledger,
so the second one is refused in one line naming the holder's PID. The kernel drops the
lock when its process dies, however it dies (SIGKILL included), so a lock is never stale;
the file holds the PID only to name the holder. Under torchrun only rank 0 takes it, for
the whole job.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from greentune.errors import UserError, user_os_error
from greentune.run_dir import RunDir

LOCK_NAME = RunDir.LOCK


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


class RunLock:
    """Held from `acquire` to `release` (or this process's end)."""

    def __init__(self, run_dir: Path, fd: int, created: bool):
        self.run_dir, self.path, self._fd, self._created = run_dir, run_dir / LOCK_NAME, fd, created

    @classmethod
    def acquire(cls, run_dir: str | Path) -> RunLock:
        """Lock `run_dir` (created if missing) or raise UserError naming the holder's PID."""
        run_dir = Path(run_dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"--run-dir {run_dir} is a file, not a folder; choose another --run-dir")
        created = not run_dir.exists()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create run dir {run_dir}: {err.strerror}") from None
        path = run_dir / LOCK_NAME
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise UserError(f"cannot lock run dir {run_dir}: {err.strerror} ({path})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise UserError(
                    f"run dir {run_dir} is in use by another greentune process (PID {holder}); "
                    "wait for it to end, or choose another --run-dir"
                ) from None
            try:  # the previous holder may have removed the file between our open and our lock
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as err:  # a full disk: the lock file cannot even hold a PID
            os.close(fd)
            path.unlink(missing_ok=True)
            raise user_os_error(err, run_dir) from None
        return cls(run_dir, fd, created)

    def release(self) -> None:
        """Unlock and remove the lock file (and the run dir, if this lock created it and it stayed empty)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        if self._created:
            try:
                self.run_dir.rmdir()
            except OSError:
                pass
