"""CPU package and DRAM energy from Linux RAPL counters under /sys/class/powercap.

Which zones count:

* top-level ``intel-rapl:N`` zones named ``package-N`` → component ``cpu`` (summed over
  sockets);
* zones named ``dram`` (a sub-zone ``intel-rapl:N:M`` or, on some servers, top-level)
  → component ``dram``;
* ``core``, ``uncore`` and ``psys`` are skipped: core and uncore are parts of the
  package and psys covers the whole SoC, so adding them double counts (CodeCarbon #950);
* ``intel-rapl-mmio:*`` zones mirror the MSR package counter and are skipped, and a zone
  name seen twice in the same package is counted once (multi-die mirrors).

Each counter is `energy_uj` (microjoules) and wraps at `max_energy_range_uj`; a read
smaller than the previous one means one wrap, so the meter polls often enough that at
most one wrap happens between reads (hundreds of kJ per wrap: minutes at full power).

Since CVE-2020-8694, `energy_uj` is readable by root only. A permission error gives one
warning and no RAPL components, so the meter falls back to the estimate.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from greentune.energy.components import Component

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/sys/class/powercap")
_ZONE = re.compile(r"^intel-rapl:(\d+)(?::(\d+))?$")


class _Zone:
    """One RAPL counter: cumulative joules with wrap-around handled."""

    def __init__(self, path: Path):
        self.path = path
        self.max_range_uj = int((path / "max_energy_range_uj").read_text().strip())
        self.last_uj = self._raw()
        self.total_j = 0.0

    def _raw(self) -> int:
        return int((self.path / "energy_uj").read_text().strip())

    def update(self) -> float:
        """Add the energy since the previous update; return cumulative joules."""
        raw = self._raw()
        delta = raw - self.last_uj
        if delta < 0:  # the counter wrapped once at max_energy_range_uj
            delta += self.max_range_uj
        self.last_uj = raw
        self.total_j += delta / 1e6
        return self.total_j


class RaplComponent(Component):
    """The sum of several RAPL zones of one kind (``cpu`` packages or ``dram``)."""

    source = "rapl"
    needs_polling = True

    def __init__(self, name: str, zones: list[_Zone]):
        self.name = name
        self.zones = zones

    def read(self) -> float:
        return sum(z.update() for z in self.zones)

    def poll(self) -> None:
        self.read()


def _zones(root: Path) -> dict[str, list[Path]]:
    """Group the zone folders under `root` into {"cpu": [...], "dram": [...]}."""
    found: dict[str, list[Path]] = {"cpu": [], "dram": []}
    seen: set[tuple[int, str]] = set()
    entries = sorted(
        root.iterdir(), key=lambda p: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", p.name)]
    )
    for path in entries:
        m = _ZONE.match(path.name)
        if not m or not (path / "energy_uj").exists():
            continue
        try:
            zone_name = (path / "name").read_text().strip()
        except OSError:
            continue
        package = int(m.group(1))
        if zone_name.startswith("package"):
            kind = "cpu"
            key = (-1, zone_name)  # package-N names are unique across sockets
        elif zone_name == "dram":
            kind = "dram"
            key = (package, zone_name)
        else:  # core, uncore, psys: parts or supersets of the package
            continue
        if key in seen:
            continue
        seen.add(key)
        found[kind].append(path)
    return found


def rapl_components(root: str | Path = DEFAULT_ROOT) -> list[Component]:
    """RAPL components (``cpu``, and ``dram`` where present) or [] when unusable.

    Args:
        root: the powercap folder; tests pass a fake tree.

    Returns an empty list, with one warning, when the counters exist but cannot be read
    (not root), and silently when there is no powercap tree at all.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    try:
        groups = _zones(root)
        comps: list[Component] = []
        for kind in ("cpu", "dram"):
            if groups[kind]:
                comps.append(RaplComponent(kind, [_Zone(p) for p in groups[kind]]))
    except PermissionError as e:
        log.warning(
            "RAPL energy counters are not readable (%s); they are root-only since "
            "CVE-2020-8694. Falling back to the CPU-time estimate. To measure, run as "
            "root or `chmod a+r %s/intel-rapl:*/energy_uj`.",
            e.filename or e,
            root,
        )
        return []
    except (OSError, ValueError) as e:
        log.warning("RAPL counters under %s could not be read (%s); falling back to the estimate.", root, e)
        return []
    if not any(c.name == "cpu" for c in comps):
        return []  # dram alone would undercount; let the estimate cover the CPU
    return comps
