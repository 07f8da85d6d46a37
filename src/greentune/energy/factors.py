"""Carbon and water factors for a region, from the shipped `energy_factors.csv`.

The file has one row per (kind, region) with value, unit, year, source and a note:

* ``grid``: gCO2e per kWh generated (world + ~50 countries, Ember/OWID);
* ``offsite_water``: litres of water consumed per kWh generated; a region without a row
  uses the world row, and the source says so;
* ``pue`` and ``wue_onsite``: industry-average defaults for a data centre.

The arithmetic that uses them lives in `greentune.energy.ledger.bill`:
facility kWh = IT kWh × PUE; kgCO2e = facility kWh × grid / 1000;
litres = IT kWh × WUE_onsite + facility kWh × off-site L/kWh.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources

from greentune.errors import UserError

ALIASES = {"UK": "GB", "GLOBAL": "WORLD", "": "WORLD"}


@dataclass(frozen=True)
class FactorRow:
    kind: str
    region: str
    name: str
    value: float
    unit: str
    year: int
    source: str
    note: str


@cache
def load_rows() -> tuple[FactorRow, ...]:
    """All rows of the shipped factors file."""
    text = resources.files("greentune").joinpath("data_files/energy_factors.csv").read_text(encoding="utf-8")
    reader = csv.DictReader(line for line in text.splitlines() if not line.startswith("#"))
    return tuple(
        FactorRow(
            r["kind"],
            r["region"].upper(),
            r["name"],
            float(r["value"]),
            r["unit"],
            int(r["year"]),
            r["source"],
            r["note"] or "",
        )
        for r in reader
    )


def _table(kind: str) -> dict[str, FactorRow]:
    return {r.region: r for r in load_rows() if r.kind == kind}


def regions() -> list[str]:
    """Region codes with a grid intensity, world first."""
    keys = sorted(_table("grid"))
    return ["WORLD"] + [k for k in keys if k != "WORLD"]


def _cite(row: FactorRow) -> str:
    return f"{row.source}, {row.year}"


def _check(name: str, value: float, minimum: float) -> float:
    value = float(value)
    if not value >= minimum:  # also rejects NaN
        raise UserError(f"energy.{name} must be >= {minimum:g}, got {value:g}")
    return value


@dataclass(frozen=True)
class Factors:
    """The factors a bill is computed with, each with where it came from.

    Attributes:
        region: code as in the factors file (``FR``, ``US``, ``WORLD``).
        region_name: readable name.
        grid_g_per_kwh: grams CO2e per kWh of electricity.
        offsite_l_per_kwh: litres consumed generating one kWh.
        pue: facility energy / IT energy (>= 1).
        wue_onsite_l_per_kwh: litres of site water per IT kWh.
        *_source: citation, ``recipe`` for values the user gave, or a note that the world
            figure stands in for the region.
    """

    region: str
    region_name: str
    grid_g_per_kwh: float
    grid_source: str
    offsite_l_per_kwh: float
    offsite_source: str
    pue: float
    pue_source: str
    wue_onsite_l_per_kwh: float
    wue_source: str

    @classmethod
    def for_region(
        cls,
        region: str | None = None,
        pue: float | None = None,
        wue_onsite: float | None = None,
        grid_g_per_kwh: float | None = None,
        offsite_l_per_kwh: float | None = None,
    ) -> Factors:
        """Factors for `region` (ISO code or ``world``; case-insensitive), with overrides.

        Raises:
            UserError: unknown region (the message lists valid ones), or an override out
                of range (PUE < 1, negative intensities).
        """
        code = (region or "WORLD").strip().upper()
        code = ALIASES.get(code, code)
        grid = _table("grid")
        if code not in grid:
            some = ", ".join(regions()[:20])
            raise UserError(
                f"unknown energy.region {region!r}: use an ISO country code or 'world' "
                f"(known: {some}, ...; or give energy.grid_g_per_kwh)"
            )
        g = grid[code]
        water = _table("offsite_water")
        w = water.get(code)
        if w is None:
            w = water["WORLD"]
            w_src = f"world figure (no source for {g.name}): {_cite(w)}"
        else:
            w_src = _cite(w)
        p = _table("pue")["DEFAULT"]
        u = _table("wue_onsite")["DEFAULT"]
        return cls(
            region=code,
            region_name=g.name,
            grid_g_per_kwh=_check("grid_g_per_kwh", grid_g_per_kwh, 0)
            if grid_g_per_kwh is not None
            else g.value,
            grid_source="recipe" if grid_g_per_kwh is not None else _cite(g),
            offsite_l_per_kwh=_check("offsite_l_per_kwh", offsite_l_per_kwh, 0)
            if offsite_l_per_kwh is not None
            else w.value,
            offsite_source="recipe" if offsite_l_per_kwh is not None else w_src,
            pue=_check("pue", pue, 1) if pue is not None else p.value,
            pue_source="recipe" if pue is not None else f"default: {_cite(p)}",
            wue_onsite_l_per_kwh=_check("wue_onsite", wue_onsite, 0) if wue_onsite is not None else u.value,
            wue_source="recipe" if wue_onsite is not None else f"default: {_cite(u)}",
        )

    def to_dict(self) -> dict:
        return asdict(self)
