"""Measurement windows over a set of energy components.

Example::

    meter = Meter.auto()                      # NVML GPUs + RAPL, else Apple, else estimate
    with meter.phase("train") as window:
        with meter.phase("step") as step:     # windows nest: each reads the counters
            ...                               # at its own start and end
    m = window.result                         # Measurement(phase="train", seconds=..., joules={...})
    meter.close()

At each window edge the meter synchronises the accelerator (pending CUDA/MPS kernels
would otherwise land in the next window), then reads every component's cumulative
counter; a window's joules are end − start per component. A background thread polls the
components that need it (power integration, counter wrap-around, memory integration)
every `poll_interval_s` seconds.
"""

from __future__ import annotations

import enum
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from greentune.energy.components import Component

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Measurement:
    """What one window cost.

    Attributes:
        phase: the window's name (``load``, ``train``, ``export``, ...).
        start, end: wall-clock Unix time of the window's edges, seconds.
        seconds: duration from a monotonic clock, seconds.
        joules: energy per component over the window, joules (``cpu``, ``dram``, ``gpu:0``...).
        source: how each component's joules were obtained (``nvml``, ``nvml-power``,
            ``rapl``, ``apple``, ``estimate``).
    """

    phase: str
    start: float
    end: float
    seconds: float
    joules: dict[str, float] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)

    @property
    def total_joules(self) -> float:
        """Sum over components, joules."""
        return float(sum(self.joules.values()))

    @property
    def is_estimate(self) -> bool:
        """True when any component's joules are modelled rather than read from a counter."""
        return any(s == "estimate" for s in self.source.values())

    def to_dict(self) -> dict:
        return asdict(self)


class WindowState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


class Window:
    """One open-then-closed measurement; `result` exists once it is closed."""

    def __init__(self, meter: Meter, phase: str):
        self.meter = meter
        self.phase = phase
        self.state = WindowState.OPEN
        self._result: Measurement | None = None
        self._wall0, self._mono0, self._joules0 = meter._snapshot()

    def end(self) -> Measurement:
        """Close the window and return its `Measurement` (once; later calls raise)."""
        if self.state is not WindowState.OPEN:
            raise RuntimeError(f"window {self.phase!r}: expected state OPEN, got {self.state.name}")
        wall1, mono1, joules1 = self.meter._snapshot()
        seconds = mono1 - self._mono0
        joules = {k: max(0.0, joules1[k] - self._joules0.get(k, 0.0)) for k in joules1}
        sources = self.meter.sources()
        for name, j in joules.items():
            if j == 0.0 and seconds >= 1.0:
                log.warning(
                    "energy component %s (%s) read 0 J over the %.1f s window %r; "
                    "its counter may not be updating",
                    name,
                    sources[name],
                    seconds,
                    self.phase,
                )
        self._result = Measurement(self.phase, self._wall0, wall1, seconds, joules, sources)
        self.state = WindowState.CLOSED
        return self._result

    def peek(self) -> dict[str, float]:
        """Joules per component since the window opened, without closing it."""
        if self.state is not WindowState.OPEN:
            raise RuntimeError(f"window {self.phase!r}: expected state OPEN, got {self.state.name}")
        now = self.meter.read()
        return {k: max(0.0, now[k] - self._joules0.get(k, 0.0)) for k in now}

    @property
    def result(self) -> Measurement:
        """The measurement; raises if the window is still open."""
        if self._result is None:
            raise RuntimeError(f"window {self.phase!r}: expected state CLOSED, got {self.state.name}")
        return self._result


def _sync_accelerators() -> None:
    """Wait for queued GPU work, without importing torch if the caller never did."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        mps = getattr(torch, "mps", None)
        if mps is not None and torch.backends.mps.is_available():
            mps.synchronize()
    except Exception as e:  # a sync failure must not lose the measurement
        log.debug("accelerator sync failed: %s", e)


class Meter:
    """Reads a fixed set of components; opens nested windows over them.

    Args:
        components: cumulative counters; names must be unique.
        poll_interval_s: seconds between background polls (0 disables the thread).
        sync: called before every read to flush queued accelerator work.
        clock: monotonic seconds; wall: Unix seconds (injectable for tests).
    """

    def __init__(
        self,
        components: list[Component],
        poll_interval_s: float = 1.0,
        sync: Callable[[], None] | None = _sync_accelerators,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        names = [c.name for c in components]
        if len(set(names)) != len(names):
            raise ValueError(f"component names must be unique, got {names}")
        self.components = list(components)
        self.sync = sync
        self.clock = clock
        self.wall = wall
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._failed: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if poll_interval_s > 0 and any(c.needs_polling for c in self.components):
            self._thread = threading.Thread(
                target=self._poll_loop, args=(poll_interval_s,), name="greentune-meter", daemon=True
            )
            self._thread.start()

    @classmethod
    def auto(
        cls,
        *,
        scope: str = "self+children",
        gpus: bool = True,
        powercap_root: str | Path = "/sys/class/powercap",
        pynvml=None,
        apple_module=None,
        poll_interval_s: float = 1.0,
        gpu_index: int | None = None,
        host: bool = True,
    ) -> Meter:
        """The best components this machine offers.

        GPUs: NVML (counter, else power). CPU/DRAM: RAPL, else Apple IOReport, else the
        estimate for the processes in `scope` (``self``, ``children``, ``self+children``).
        RAPL and Apple counters are machine-wide; only the estimate is per process.

        For one rank of a distributed job, so that every device is metered once:
        `gpu_index` keeps only that GPU (the rank's own), and `host=False` leaves the
        machine-wide counters (and, without a CUDA device of its own, the GPUs) to local
        rank 0 — the per-process estimate is still taken, as it charges this process only.
        """
        from greentune.energy.apple import apple_components
        from greentune.energy.estimate import estimate_components
        from greentune.energy.nvml import nvml_components
        from greentune.energy.rapl import rapl_components

        comps: list[Component] = nvml_components(pynvml) if gpus else []
        if gpu_index is not None:
            comps = [c for c in comps if c.name == f"gpu:{gpu_index}"]
        elif not host:
            comps = []
        machine_wide = rapl_components(powercap_root) or apple_components(apple_module)
        if any(c.name.startswith("gpu") for c in machine_wide):
            comps = [c for c in comps if not c.name.startswith("gpu")]  # Apple's GPU is on the SoC
        if machine_wide:
            comps += machine_wide if host else []
        else:
            comps += estimate_components(scope)
        log.info("energy meter: %s", ", ".join(f"{c.name}={c.source}" for c in comps) or "none on this rank")
        return cls(comps, poll_interval_s=poll_interval_s)

    def _poll_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            with self._lock:
                for c in self.components:
                    if c.needs_polling:
                        try:
                            c.poll()
                        except Exception as e:
                            log.debug("polling %s failed: %s", c.name, e)

    def _snapshot(self) -> tuple[float, float, dict[str, float]]:
        if self.sync is not None:
            self.sync()
        joules = {}
        with self._lock:
            for c in self.components:
                try:
                    joules[c.name] = self._last[c.name] = float(c.read())
                except Exception as e:  # a failing sensor must not crash the run it meters
                    if c.name not in self._failed:
                        log.warning(
                            "energy component %s (%s) could not be read (%s); holding its last "
                            "value, so its energy from now on is missing",
                            c.name,
                            c.source,
                            e,
                        )
                        self._failed.add(c.name)
                    joules[c.name] = self._last.get(c.name, 0.0)
        return self.wall(), self.clock(), joules

    def read(self) -> dict[str, float]:
        """Cumulative joules per component since the meter was created."""
        return self._snapshot()[2]

    def sources(self) -> dict[str, str]:
        """Current source per component."""
        return {c.name: c.source for c in self.components}

    def start(self, phase: str) -> Window:
        """Open a window now; close it with `window.end()`."""
        return Window(self, phase)

    @contextmanager
    def phase(self, name: str) -> Iterator[Window]:
        """A window around a block; closed (and measured) even if the block raises."""
        window = self.start(name)
        try:
            yield window
        finally:
            window.end()

    def close(self) -> None:
        """Stop the polling thread and release the components."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for c in self.components:
            try:
                c.close()
            except Exception as e:
                log.debug("closing %s failed: %s", c.name, e)

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
