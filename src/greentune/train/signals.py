"""SIGTERM and SIGINT as a request to stop cleanly, the way schedulers use them.

Slurm, Kubernetes and spot instances send SIGTERM (then SIGKILL after a grace period);
a user presses Ctrl-C (SIGINT). During training (`StopSignals`) either one only sets a
flag: the loop finishes the step in flight, writes a checkpoint and the ledger row, and
the command exits 128 + the signal number (143, 130), so the job can be requeued with
`--resume`. A second signal while the first is pending stops at once (KeyboardInterrupt).
Outside the loop, `raise_on_sigterm` makes SIGTERM an exception, so clean-ups run.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """Raised by the SIGTERM handler of `raise_on_sigterm`; `.signum` is the signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by `signum`: 128 + its number."""
    return 128 + signum


def _raise(signum, frame):
    raise Stopped(signum)


def raise_on_sigterm() -> None:
    """SIGTERM raises `Stopped` (finally blocks and temp clean-ups run) instead of ending the
    process where it stands. Main thread only; elsewhere a no-op."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise)


class StopSignals:
    """While active, SIGTERM/SIGINT set `.signum` instead of interrupting.

    `with StopSignals() as stop: ... if stop.signum: checkpoint and leave` (or `install()` /
    `restore()` around a loop).
    Only the main thread can own signal handlers; elsewhere it never sees a signal.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        log.info("received %s: stopping after this step, with a checkpoint", signal.Signals(signum).name)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for s in HANDLED:
                self._previous[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
