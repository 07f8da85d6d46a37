"""Fakes at the library boundary: a powercap tree on disk and an NVML module."""

from __future__ import annotations

from pathlib import Path


def make_zone(root: Path, folder: str, name: str, energy_uj: int, max_uj: int = 262143328850) -> Path:
    z = root / folder
    z.mkdir(parents=True, exist_ok=True)
    (z / "name").write_text(name + "\n")
    (z / "energy_uj").write_text(f"{energy_uj}\n")
    (z / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return z


def set_energy(zone: Path, energy_uj: int) -> None:
    (zone / "energy_uj").write_text(f"{energy_uj}\n")


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeNvml:
    """pynvml's surface as greentune uses it. energy_mj / power_mw: per-GPU lists of
    readings (the last one repeats), or None for 'not supported'."""

    class NVMLError(Exception):
        pass

    def __init__(self, energy_mj, power_mw, names=None):
        self.energy = [list(e) if e is not None else None for e in energy_mj]
        self.power = [list(p) if p is not None else None for p in power_mw]
        self.names = names or [f"Fake GPU {i}" for i in range(len(energy_mj))]
        self.inited = False

    def nvmlInit(self):
        self.inited = True

    def nvmlDeviceGetCount(self):
        return len(self.energy)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return self.names[h]

    @staticmethod
    def _next(seq):
        return seq.pop(0) if len(seq) > 1 else seq[0]

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if self.energy[h] is None:
            raise self.NVMLError("Not Supported")
        return self._next(self.energy[h])

    def nvmlDeviceGetPowerUsage(self, h):
        if self.power[h] is None:
            raise self.NVMLError("Not Supported")
        return self._next(self.power[h])
