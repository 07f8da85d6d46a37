"""`greentune meter [--json] [--region R] -- COMMAND ...`: the energy bill of any command.

The command runs as a child process with the terminal's stdin/stdout/stderr; its exit
code is passed through (a child killed by signal N gives 128 + N, as shells do). The
bill goes to stderr, like `time`, so the command's own stdout stays clean: a few
human lines, or with `--json` one JSON object (the ledger row plus factor sources).

What is metered: GPUs through NVML and the CPU/DRAM through RAPL where present (those
are machine-wide); otherwise the estimate from the CPU time and resident memory of the
command and its descendants (not of greentune itself), labelled ``estimate``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import TextIO

from greentune.energy.factors import Factors
from greentune.energy.ledger import bill
from greentune.energy.meter import Meter
from greentune.errors import UserError


def _g(x: float) -> str:
    return f"{x:.3g}"


def format_bill(row: dict, factors: Factors, command: list[str]) -> str:
    """Human-readable lines for one ledger row."""
    est = any(s == "estimate" for s in row["source"].values())
    tag = " (estimate)" if est else ""
    joules = ", ".join(f"{k} {_g(v)} J ({row['source'][k]})" for k, v in sorted(row["joules"].items()))
    return "\n".join(
        [
            f"greentune meter: {' '.join(command)}",
            f"  time      {row['seconds']:.2f} s",
            f"  energy    {_g(row['it_kwh'])} kWh IT{tag}; {_g(row['facility_kwh'])} kWh facility (PUE "
            f"{row['pue']:g})",
            f"            {joules}",
            f"  carbon    {_g(row['kg_co2e'])} kgCO2e{tag} ({factors.region_name}, {row['grid_g_per_kwh']:g} "
            "gCO2e/kWh)",
            f"  water     {_g(row['water_l'])} L{tag} (on-site {row['wue_onsite_l_per_kwh']:g} L/kWh IT, "
            f"off-site {row['offsite_l_per_kwh']:g} L/kWh)",
            f"  grid      {factors.grid_source}",
            f"  off-site  {factors.offsite_source}",
            f"  PUE       {factors.pue_source}",
            f"  WUE       {factors.wue_source}",
        ]
    )


def run_meter(
    argv: list[str],
    region: str | None = None,
    as_json: bool = False,
    out: TextIO | None = None,
    meter: Meter | None = None,
) -> int:
    """Run `argv`, meter it, print its bill to `out` (stderr), return its exit code.

    Args:
        argv: the command and its arguments (what follows `--`).
        region: energy region for the factors (None: world).
        as_json: print one JSON object instead of text.
        out: where the bill goes (default sys.stderr).
        meter: a meter to use (tests); default `Meter.auto(scope="children")`, closed after.

    Raises:
        UserError: no command, a command that cannot be found or run, an unknown region.
    """
    if not argv:
        raise UserError("nothing to meter: give a command after --, e.g. greentune meter -- python train.py")
    factors = Factors.for_region(region)  # fail on a bad region before running anything
    out = out or sys.stderr
    own = meter is None
    meter = meter or Meter.auto(scope="children", poll_interval_s=0.2)
    try:
        window = meter.start("command")
        try:
            proc = subprocess.Popen(argv)
        except FileNotFoundError:
            window.end()
            raise UserError(f"command not found: {argv[0]}") from None
        except PermissionError:
            window.end()
            raise UserError(f"command not executable: {argv[0]}") from None
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # the child got the same SIGINT; wait for it to finish
                continue
        m = window.end()
    finally:
        if own:
            meter.close()
    if code < 0:  # killed by a signal
        code = 128 - code if -code in signal.valid_signals() else 1
    row = bill(m, factors)
    if as_json:
        doc = {
            **row,
            "command": list(argv),
            "exit_code": code,
            "estimate": m.is_estimate,
            "factors": factors.to_dict(),
        }
        print(json.dumps(doc, sort_keys=True), file=out)
    else:
        print(format_bill(row, factors, argv), file=out)
    out.flush()
    return code
