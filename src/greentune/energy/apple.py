"""Apple silicon energy through zeus-apple-silicon (IOReport counters), when installed.

`pip install zeus-apple-silicon` provides `AppleEnergyMonitor` with
`begin_window(key)` / `end_window(key)` returning millijoules per subsystem
(`cpu_total_mj`, `dram_mj`, `gpu_mj`, `gpu_sram_mj`, `ane_mj`; a field is None where the
chip does not report it). A cumulative counter is kept by closing and reopening one
window at every read; the gap between the two calls is microseconds.

Components: ``cpu``, ``dram``, ``gpu`` (GPU + GPU SRAM) and ``ane`` (neural engine), all
with source ``apple``. Without the package (or off macOS) there are none and the meter
falls back to the estimate.
"""

from __future__ import annotations

import logging
import threading

from greentune.energy.components import Component

log = logging.getLogger(__name__)

_FIELDS = {
    "cpu": ("cpu_total_mj",),
    "dram": ("dram_mj",),
    "gpu": ("gpu_mj", "gpu_sram_mj"),
    "ane": ("ane_mj",),
}
_KEY = "greentune-cumulative"


class _AppleReader:
    """Shared cumulative millijoules per field, refreshed at most once per read call."""

    def __init__(self, monitor):
        self.monitor = monitor
        self.lock = threading.Lock()
        self.totals_mj: dict[str, float] = {}
        monitor.begin_window(_KEY)
        self.available = self._refresh_fields()

    def _refresh_fields(self) -> set[str]:
        res = self.monitor.end_window(_KEY)
        self.monitor.begin_window(_KEY)
        present = set()
        for field in {f for fs in _FIELDS.values() for f in fs}:
            value = getattr(res, field, None)
            if value is not None:
                present.add(field)
                self.totals_mj[field] = self.totals_mj.get(field, 0.0) + float(value)
        return present

    def refresh(self) -> None:
        with self.lock:
            self._refresh_fields()


class AppleComponent(Component):
    """One subsystem (``cpu``, ``dram``, ``gpu``, ``ane``) of an Apple SoC, in joules."""

    source = "apple"

    def __init__(self, name: str, reader: _AppleReader):
        self.name = name
        self.reader = reader

    def read(self) -> float:
        self.reader.refresh()
        return sum(self.reader.totals_mj.get(f, 0.0) for f in _FIELDS[self.name]) / 1000.0


def apple_components(module=None) -> list[Component]:
    """Components for the subsystems this Mac reports, or [] without zeus-apple-silicon.

    Args:
        module: the `zeus_apple_silicon` module (or a fake); None imports it.
    """
    if module is None:
        try:
            import zeus_apple_silicon as module  # noqa: PLC0415  (optional, macOS only)
        except ImportError:
            return []
    try:
        reader = _AppleReader(module.AppleEnergyMonitor())
    except Exception as e:  # not Apple silicon, IOReport unavailable, ...
        log.warning("zeus-apple-silicon is installed but cannot read energy (%s); using the estimate.", e)
        return []
    return [
        AppleComponent(name, reader)
        for name, fields in _FIELDS.items()
        if any(f in reader.available for f in fields)
    ]
