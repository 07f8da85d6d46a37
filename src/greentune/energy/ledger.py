"""The append-only energy ledger of a run: `ledger.jsonl`, one line per phase or interval.

Each line (field names are fixed; tools read them)::

    phase, start, end, seconds          what and when (Unix seconds; duration seconds)
    joules {component: J}, source {component: name}
    it_kwh = Σ joules / 3.6e6
    pue, facility_kwh = it_kwh × pue
    region, grid_g_per_kwh, kg_co2e = facility_kwh × grid_g_per_kwh / 1000
    wue_onsite_l_per_kwh, offsite_l_per_kwh,
    water_l = it_kwh × wue_onsite_l_per_kwh + facility_kwh × offsite_l_per_kwh
    details {…}                         optional: what the phase measured besides energy (an
                                        ``inference`` row carries `greentune eval`'s result)

Distributed jobs: every rank meters its own devices and process, and each `record` is a
collective that merges the ranks' measurements of the same window into **one row**: rank
0's components keep their names, rank r's appear as ``rank<r>/<name>`` (``rank1/cpu``),
and the row's seconds are the window's wall time, not a sum over ranks. Only rank 0
writes. Each device is metered by exactly one rank (see `Meter.auto`), so summing a
row's components counts every device once.

Lines are appended and fsynced one by one, so a SIGKILL loses at most the interval in
progress; a torn last line (killed mid-write) is cut off when the ledger is reopened, so
a resumed run appends after the last complete line and `totals()` carries on.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from greentune.energy.factors import Factors
from greentune.energy.meter import Measurement
from greentune.fsutil import append_jsonl, read_jsonl
from greentune.run_dir import RunDir

log = logging.getLogger(__name__)

J_PER_KWH = 3.6e6
FIELDS = (
    "phase",
    "start",
    "end",
    "seconds",
    "joules",
    "source",
    "it_kwh",
    "pue",
    "facility_kwh",
    "region",
    "grid_g_per_kwh",
    "kg_co2e",
    "wue_onsite_l_per_kwh",
    "offsite_l_per_kwh",
    "water_l",
)


def bill(measurement: Measurement, factors: Factors, phase: str | None = None) -> dict:
    """One ledger row (a dict with exactly `FIELDS`) for a measurement under `factors`."""
    it_kwh = measurement.total_joules / J_PER_KWH
    facility_kwh = it_kwh * factors.pue
    return {
        "phase": phase or measurement.phase,
        "start": measurement.start,
        "end": measurement.end,
        "seconds": measurement.seconds,
        "joules": dict(measurement.joules),
        "source": dict(measurement.source),
        "it_kwh": it_kwh,
        "pue": factors.pue,
        "facility_kwh": facility_kwh,
        "region": factors.region,
        "grid_g_per_kwh": factors.grid_g_per_kwh,
        "kg_co2e": facility_kwh * factors.grid_g_per_kwh / 1000.0,
        "wue_onsite_l_per_kwh": factors.wue_onsite_l_per_kwh,
        "offsite_l_per_kwh": factors.offsite_l_per_kwh,
        "water_l": it_kwh * factors.wue_onsite_l_per_kwh + facility_kwh * factors.offsite_l_per_kwh,
    }


def merge_ranks(measurements: list[Measurement]) -> Measurement:
    """One measurement of a window from every rank's measurement of it (rank order)."""
    first = measurements[0]
    joules, source = dict(first.joules), dict(first.source)
    for r, m in enumerate(measurements[1:], start=1):
        joules.update({f"rank{r}/{k}": v for k, v in m.joules.items()})
        source.update({f"rank{r}/{k}": v for k, v in m.source.items()})
    return Measurement(
        first.phase,
        min(m.start for m in measurements),
        max(m.end for m in measurements),
        max(m.seconds for m in measurements),
        joules,
        source,
    )


def sum_rows(rows: list[dict]) -> dict:
    """Totals over ledger rows.

    Returns a dict: seconds, joules {component: J}, sources {component: [names]},
    it_kwh, facility_kwh, kg_co2e, water_l, rows (count), estimate (bool: any modelled
    component), by_phase {phase: {seconds, joules, it_kwh, facility_kwh, kg_co2e, water_l}}.
    """
    keys = ("seconds", "it_kwh", "facility_kwh", "kg_co2e", "water_l")
    out = {k: 0.0 for k in keys}
    out.update(joules={}, sources={}, by_phase={}, rows=len(rows))
    for row in rows:
        phase = out["by_phase"].setdefault(row["phase"], {**{k: 0.0 for k in keys}, "joules": 0.0})
        for k in keys:
            out[k] += float(row.get(k, 0.0))
            phase[k] += float(row.get(k, 0.0))
        for comp, j in row.get("joules", {}).items():
            out["joules"][comp] = out["joules"].get(comp, 0.0) + float(j)
            phase["joules"] += float(j)
        for comp, src in row.get("source", {}).items():
            names = out["sources"].setdefault(comp, [])
            if src not in names:
                names.append(src)
    out["estimate"] = any("estimate" in names for names in out["sources"].values())
    return out


def _cut_torn_tail(path: Path) -> None:
    """Truncate a file that does not end in a newline back to its last complete line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        try:
            json.loads(data[keep:])
            f.write(b"\n")  # complete row, only its newline was lost
        except ValueError:
            log.warning(
                "%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(data) - keep
            )
            f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())


class Ledger:
    """`run_dir/ledger.jsonl`, priced with `factors`.

    Args:
        run_dir: the run directory (created if missing).
        factors: carbon/water factors for new rows (old rows keep the factors they were
            written with).
    """

    FILENAME = RunDir.LEDGER

    def __init__(self, run_dir: str | Path, factors: Factors, ctx=None):
        self.path = Path(run_dir) / self.FILENAME
        self.factors = factors
        self.ctx = ctx  # a train.distributed.DistContext, or None for a single process
        if self._writes:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _cut_torn_tail(self.path)

    @property
    def _distributed(self) -> bool:
        return self.ctx is not None and self.ctx.active

    @property
    def _writes(self) -> bool:
        return self.ctx is None or self.ctx.is_main

    def record(self, measurement: Measurement, phase: str | None = None, details: dict | None = None) -> dict:
        """Append one row for `measurement` (renamed to `phase` if given, with `details` if given); return it.

        In a distributed job every rank calls this for the same window and gets the merged row."""
        if self._distributed:
            measurement = merge_ranks([Measurement(**d) for d in self.ctx.gather(measurement.to_dict())])
        row = bill(measurement, self.factors, phase)
        if details is not None:
            row["details"] = details
        if self._writes:
            append_jsonl(self.path, row)
        return row

    def rows(self) -> list[dict]:
        """All complete rows in the file (a torn last line is ignored); rank 0's, in a job."""
        if self._distributed:
            return self.ctx.from_main(read_jsonl(self.path) if self.ctx.is_main else None)
        return read_jsonl(self.path)

    def totals(self) -> dict:
        """Sums over the whole file, including rows of earlier (resumed) sessions; see `sum_rows`."""
        return sum_rows(self.rows())

    def over_budget(self, budget_kwh: float | None, pending_joules: float = 0.0) -> bool:
        """Whether IT energy recorded so far, plus `pending_joules` not yet recorded, reaches `budget_kwh`.

        The budget is in IT kWh (what the meters measure; facility kWh = IT × PUE).
        None means no budget.
        """
        if budget_kwh is None:
            return False
        return self.totals()["it_kwh"] + pending_joules / J_PER_KWH >= float(budget_kwh)

    def budget_message(self, budget_kwh: float) -> str:
        """The one line to print when a run stops at its budget."""
        t = self.totals()
        return (
            f"energy budget reached: {t['it_kwh']:.3g} kWh IT of {float(budget_kwh):g} kWh "
            f"(energy.budget_kwh); checkpoint saved. Continue with a higher budget and --resume."
        )
