"""NVIDIA GPU energy through NVML (the `nvidia-ml-py` package, imported as `pynvml`).

Per GPU, in order of preference:

1. ``nvml``: `nvmlDeviceGetTotalEnergyConsumption` (millijoules since driver load,
   Volta and newer), read as differences; the same counter Zeus and CodeCarbon read.
2. ``nvml-power``: where the counter is missing (older GPUs, some vGPUs) or stuck (it has
   not moved for `stuck_after_s` while the board reports power > 0), `nvmlDeviceGetPowerUsage`
   (milliwatts) is sampled by the meter's polling thread and integrated with the
   trapezoid rule: E += (P_prev + P_now) / 2 · Δt.

A GPU that offers neither is left out of the meter with a warning naming it, so its
energy is reported as *not measured* rather than as 0 J (CodeCarbon #1316 records such
GPUs as 0 kWh).

`pynvml` is injectable: tests pass a fake module with the same functions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from greentune.energy.components import Component

log = logging.getLogger(__name__)


class NvmlGpu(Component):
    """One GPU's cumulative joules, from the energy counter or integrated power.

    Args:
        nvml: the `pynvml` module (or a fake).
        index: the NVML device index; the component is named ``gpu:<index>``.
        clock: monotonic seconds, injectable for tests.
        stuck_after_s: seconds without counter movement, while power > 0, after which
            the counter is deemed broken and power integration takes over.
    """

    needs_polling = True

    def __init__(
        self, nvml, index: int, clock: Callable[[], float] = time.monotonic, stuck_after_s: float = 2.0
    ):
        self.nvml = nvml
        self.index = index
        self.name = f"gpu:{index}"
        self.clock = clock
        self.stuck_after_s = stuck_after_s
        self.handle = nvml.nvmlDeviceGetHandleByIndex(index)
        self.total_j = 0.0
        now = clock()
        try:
            self.last_mj = int(nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))
            self.source = "nvml"
            self.last_change = now
        except nvml.NVMLError:
            self.source = "nvml-power"
        self.last_t = now
        self.last_w = self._power_w() if self.source == "nvml-power" else None
        if self.source == "nvml-power" and self.last_w is None:
            raise LookupError(f"GPU {index}: NVML gives neither an energy counter nor power readings")

    def _power_w(self) -> float | None:
        try:
            return float(self.nvml.nvmlDeviceGetPowerUsage(self.handle)) / 1000.0
        except self.nvml.NVMLError:
            return None

    def _switch_to_power(self, now: float, watts: float) -> None:
        log.warning(
            "GPU %d: the NVML energy counter has not moved for %.1f s while the board "
            "draws %.0f W; integrating power readings instead (source nvml-power).",
            self.index,
            now - self.last_change,
            watts,
        )
        self.source = "nvml-power"
        self.last_t, self.last_w = now, watts

    def read(self) -> float:
        now = self.clock()
        if self.source == "nvml":
            raw = int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))
            delta = raw - self.last_mj
            if delta > 0:
                self.total_j += delta / 1000.0
                self.last_change = now
            self.last_mj = raw  # delta < 0: driver reload reset the counter; skip it
            if delta <= 0 and now - self.last_change >= self.stuck_after_s:
                watts = self._power_w()
                if watts:
                    self._switch_to_power(now, watts)
            return self.total_j
        watts = self._power_w()
        if watts is None:  # a transient failure: hold the last reading
            watts = self.last_w or 0.0
        self.total_j += (self.last_w + watts) / 2.0 * (now - self.last_t)
        self.last_t, self.last_w = now, watts
        return self.total_j

    def poll(self) -> None:
        self.read()


def nvml_components(pynvml=None, clock: Callable[[], float] = time.monotonic) -> list[Component]:
    """One `NvmlGpu` per visible NVIDIA GPU, or [] when NVML is absent.

    Args:
        pynvml: the NVML module to use; None imports `pynvml` (from nvidia-ml-py).
        clock: monotonic seconds, injectable for tests.
    """
    if pynvml is None:
        try:
            import pynvml  # noqa: PLC0415  (optional hardware library)
        except ImportError:
            return []
    try:
        pynvml.nvmlInit()
        count = int(pynvml.nvmlDeviceGetCount())
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        log.debug("NVML not available: %s", e)
        return []
    comps: list[Component] = []
    for i in range(count):
        try:
            comps.append(NvmlGpu(pynvml, i, clock=clock))
        except (LookupError, pynvml.NVMLError) as e:
            log.warning("%s; its energy is NOT measured (left out, not counted as 0 J).", e)
    return comps
