"""The modelled fallback: CPU time × watts per thread, and resident memory × watts per GiB.

Used where no counter exists (containers, VMs, non-root Linux, this project's CI). It is
*attributional*: only the CPU time the metered processes used is charged, not the idle
power of the machine. Every number it produces carries source ``estimate``.

* ``cpu``: E = (user + system CPU-seconds of the process and/or its children) ×
  W per thread, where W per thread = TDP / hardware threads from `cpu_power.csv`, or
  CodeCarbon's default of 4 W per thread for a CPU not in the table.
* ``dram``: E = ∫ RSS(t) dt × 0.375 W/GiB (3 W per 8 GB, CodeCarbon's RAM model before
  v3, after Crucial's figure), integrated with the trapezoid rule at each poll.

Children: CPU time of children that have exited and been waited for is in
`psutil.Process.cpu_times().children_*`; running children (recursively) are added live,
so `greentune meter -- CMD` sees the command's CPU time while it runs.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import psutil

from greentune.energy.components import Component
from greentune.energy.hardware import cpu_model

log = logging.getLogger(__name__)

DEFAULT_W_PER_THREAD = 4.0  # CodeCarbon's DEFAULT_POWER_PER_CORE for an unknown CPU, W per thread
DRAM_W_PER_GIB = 3.0 / 8.0  # 3 W per 8 GB of DDR3/DDR4 (CodeCarbon < v3, Crucial), W per GiB
SCOPES = ("self", "children", "self+children")


@dataclass(frozen=True)
class CpuPower:
    """Watts charged per busy hardware thread, and where the figure comes from."""

    w_per_thread: float
    basis: str


def cpu_power(model: str | None = None) -> CpuPower:
    """Look `model` (default: this CPU) up in `cpu_power.csv`; longest matching name wins."""
    model = model if model is not None else cpu_model()
    text = resources.files("greentune").joinpath("data_files/cpu_power.csv").read_text()
    rows = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    best = None
    for row in rows:
        if row["model"].lower() in model.lower() and (best is None or len(row["model"]) > len(best["model"])):
            best = row
    if best is None:
        return CpuPower(
            DEFAULT_W_PER_THREAD,
            f"{model or 'unknown CPU'} not in table: default {DEFAULT_W_PER_THREAD:g} W per thread "
            "(CodeCarbon)",
        )
    w = float(best["tdp_w"]) / float(best["threads"])
    return CpuPower(
        w, f"{best['model']}: {best['tdp_w']} W TDP / {best['threads']} threads ({best['source']})"
    )


def _processes(proc: psutil.Process, scope: str) -> list[psutil.Process]:
    out = [proc] if scope != "children" else []
    if scope != "self":
        try:
            out += proc.children(recursive=True)
        except psutil.Error:
            pass
    return out


class EstimateCpu(Component):
    """CPU-seconds of a process (and/or its children) × watts per thread.

    Args:
        scope: ``self``, ``children`` or ``self+children``.
        w_per_thread: override of the figure from `cpu_power()`.
        process: the process to watch (default: this one).
    """

    name = "cpu"
    source = "estimate"

    def __init__(
        self,
        scope: str = "self+children",
        w_per_thread: float | None = None,
        process: psutil.Process | None = None,
    ):
        if scope not in SCOPES:
            raise ValueError(f"scope {scope!r} is not one of {SCOPES}")
        self.scope = scope
        power = cpu_power()
        self.w_per_thread = w_per_thread if w_per_thread is not None else power.w_per_thread
        self.basis = power.basis if w_per_thread is None else f"{w_per_thread:g} W per thread (given)"
        self.proc = process or psutil.Process()
        self.start_s = self.cpu_seconds()
        self.last_s = self.start_s

    def cpu_seconds(self) -> float:
        """User + system CPU-seconds so far in scope (monotone: never below the last value)."""
        total = 0.0
        try:
            t = self.proc.cpu_times()
            if self.scope != "children":
                total += t.user + t.system
            if self.scope != "self":
                total += t.children_user + t.children_system
        except psutil.Error:
            pass
        if self.scope != "self":
            for child in _processes(self.proc, "children"):
                try:
                    c = child.cpu_times()
                    total += c.user + c.system + c.children_user + c.children_system
                except psutil.Error:  # exited between listing and reading
                    pass
        return total

    def read(self) -> float:
        self.last_s = max(self.last_s, self.cpu_seconds())
        return (self.last_s - self.start_s) * self.w_per_thread


class EstimateDram(Component):
    """Resident memory integrated over time × watts per GiB (polled)."""

    name = "dram"
    source = "estimate"
    needs_polling = True

    def __init__(
        self,
        scope: str = "self+children",
        w_per_gib: float = DRAM_W_PER_GIB,
        process: psutil.Process | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if scope not in SCOPES:
            raise ValueError(f"scope {scope!r} is not one of {SCOPES}")
        self.scope = scope
        self.w_per_gib = w_per_gib
        self.proc = process or psutil.Process()
        self.clock = clock
        self.total_j = 0.0
        self.last_t = clock()
        self.last_gib = self.rss_gib()

    def rss_gib(self) -> float:
        """Resident memory in scope, GiB."""
        rss = 0
        for p in _processes(self.proc, self.scope):
            try:
                rss += p.memory_info().rss
            except psutil.Error:
                pass
        return rss / 2**30

    def poll(self) -> None:
        now, gib = self.clock(), self.rss_gib()
        self.total_j += (self.last_gib + gib) / 2.0 * (now - self.last_t) * self.w_per_gib
        self.last_t, self.last_gib = now, gib

    def read(self) -> float:
        self.poll()
        return self.total_j


def estimate_components(scope: str = "self+children") -> list[Component]:
    """The modelled ``cpu`` and ``dram`` components for `scope`."""
    cpu = EstimateCpu(scope)
    log.info("energy estimate: CPU %s; DRAM %.3f W/GiB of resident memory", cpu.basis, DRAM_W_PER_GIB)
    return [cpu, EstimateDram(scope)]
