"""Gather a run directory into one JSON-ready report, and write report.json + report.html.

Inputs (all optional except that a run needs metrics.jsonl or ledger.jsonl):

* ``metrics.jsonl``: one line per step, as the training loop writes it:
  ``step``, ``loss``, ``lr``, ``tokens`` (cumulative), ``seconds`` (cumulative),
  ``joules`` (cumulative IT joules of training, from `EnergyHook`), ``step_joules``,
  optionally ``eval_loss`` and ``expert_use`` {layer: [fraction per expert]}. A step that
  appears twice (re-run after a resume) keeps its last line. Without ``joules`` the
  cumulative energy is summed from ``step_joules``.
* ``ledger.jsonl``: the energy ledger (`greentune.energy.ledger`).
* ``recipe.yaml``: shown verbatim.
* ``savings.json``: {"full_fine_tune": {...}, "rows": [...]} from `energy.savings`.
* ``summary.json``: the pipeline's summary; ``hardware`` in it is shown when present.
* ``inference`` ledger rows (`greentune eval`) and ``export/*.gguf``: the serving section
  (`report.serving`).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from pathlib import Path

from greentune.energy.factors import Factors
from greentune.energy.ledger import J_PER_KWH, sum_rows
from greentune.errors import UserError
from greentune.fsutil import atomic_write_json, atomic_write_text
from greentune.report.serving import serving_section
from greentune.run_dir import RunDir
from greentune.train.metrics import efficiency

log = logging.getLogger(__name__)


def _read_json(path: Path):
    """An optional JSON object file; unreadable or not an object: left out, with a warning."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        log.warning("%s is not valid JSON (%s); left out of the report", path, e)
        return None
    if not isinstance(data, dict):
        log.warning("%s is a JSON %s, not an object; left out of the report", path, type(data).__name__)
        return None
    return data


def _records(path: Path) -> list[dict]:
    """The JSON-object lines of a run's .jsonl file. A torn last line (a kill mid-write) is
    ignored, as `fsutil.read_jsonl` does; anything else that is not a JSON object is corruption
    and a `UserError` naming the file and line."""
    if not path.exists():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: corrupt (not UTF-8 text); cannot report this run") from None
    out = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if lineno == len(lines):
                break
            raise UserError(f"{path}:{lineno}: corrupt line (not JSON); cannot report this run") from None
        except RecursionError:
            raise UserError(f"{path}:{lineno}: corrupt line (JSON nested too deeply)") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{lineno}: corrupt line (a JSON {type(record).__name__}, not an object)")
        out.append(record)
    return out


_METRIC_NUMBERS = ("loss", "eval_loss", "lr", "tokens", "seconds", "joules", "step_joules")


def _metrics(path: Path) -> list[dict]:
    by_step: dict[int, dict] = {}
    for line in _records(path):
        if "step" not in line:
            continue
        bad = [
            k
            for k in ("step", *_METRIC_NUMBERS)
            if k in line
            and line[k] is not None
            and (isinstance(line[k], bool) or not isinstance(line[k], (int, float)))
        ]
        if bad or not isinstance(line["step"], int):
            raise UserError(
                f"{path}: corrupt record for step {line.get('step')!r} ({', '.join(bad) or 'step'} "
                "not a number); cannot report this run"
            )
        by_step[line["step"]] = line
    return [by_step[k] for k in sorted(by_step)]


def _cumulative_kwh(metrics: list[dict]) -> list[tuple[float, float]]:
    if any("joules" in m for m in metrics):
        return [(m["step"], m["joules"] / J_PER_KWH) for m in metrics if "joules" in m]
    out, total = [], 0.0
    for m in metrics:
        if "step_joules" in m:
            total += float(m["step_joules"])
            out.append((m["step"], total / J_PER_KWH))
    return out


def _factor_sources(row: dict) -> dict:
    """The factors the last ledger row used, each with its citation (or `recipe` if it differs)."""
    out = {
        k: row.get(k)
        for k in ("region", "pue", "grid_g_per_kwh", "wue_onsite_l_per_kwh", "offsite_l_per_kwh")
    }
    try:
        f = Factors.for_region(row.get("region"))
    except UserError:
        return {**out, "region_name": row.get("region"), "sources": {}}
    cite = {
        "pue": (f.pue, f.pue_source),
        "grid_g_per_kwh": (f.grid_g_per_kwh, f.grid_source),
        "wue_onsite_l_per_kwh": (f.wue_onsite_l_per_kwh, f.wue_source),
        "offsite_l_per_kwh": (f.offsite_l_per_kwh, f.offsite_source),
    }
    sources = {
        k: (src if out[k] is not None and abs(float(out[k]) - v) < 1e-12 else "recipe")
        for k, (v, src) in cite.items()
    }
    return {**out, "region_name": f.region_name, "sources": sources}


def build_report(run_dir: str | Path) -> dict:
    """Everything the report shows, as one JSON-ready dict (the content of report.json)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"no run directory at {run_dir}")
    run = RunDir(run_dir)
    metrics_path, ledger_path = run.metrics, run.ledger
    if not metrics_path.exists() and not ledger_path.exists():
        raise UserError(
            f"{run_dir} has neither metrics.jsonl nor ledger.jsonl: not a greentune run directory"
        )
    metrics = _metrics(metrics_path)
    rows = _records(ledger_path)
    try:
        totals = sum_rows(rows)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(
            f"{ledger_path}: corrupt ledger rows ({type(err).__name__}: {err}); cannot report this run"
        ) from None
    phases = [{"phase": p, **v} for p, v in totals.pop("by_phase").items()]
    summary = _read_json(run.summary) or {}
    savings = _read_json(run.savings)
    if isinstance(savings, list):
        savings = {"rows": savings, "full_fine_tune": None}
    recipe_path = run.recipe_file

    last = metrics[-1] if metrics else {}
    cum = _cumulative_kwh(metrics)
    train_j = cum[-1][1] * J_PER_KWH if cum else None
    tokens = last.get("tokens")
    training = {
        "steps": last.get("step"),
        "tokens": tokens,
        "seconds": last.get("seconds"),
        "final_loss": last.get("loss"),
        "final_eval_loss": next(
            (m["eval_loss"] for m in reversed(metrics) if m.get("eval_loss") is not None), None
        ),
        "joules": train_j,
        "j_per_token": (train_j / tokens) if train_j is not None and tokens else None,
    }
    compute = summary.get("compute") if isinstance(summary.get("compute"), dict) else efficiency(metrics)
    training["compute"] = compute  # model FLOPs per token, mean achieved FLOP/s, utilisation of the peak
    expert = next((m["expert_use"] for m in reversed(metrics) if m.get("expert_use")), None)
    if isinstance(summary.get("hardware"), dict) and summary["hardware"]:
        hardware = {**summary["hardware"], "recorded_by": "the run (summary.json)"}
    else:
        from greentune.energy.hardware import describe_hardware

        hardware = {
            **describe_hardware(),
            "recorded_by": "the machine that wrote this report (not recorded by the run)",
        }
    return {
        "run": run_dir.resolve().name,
        "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "totals": totals,
        "estimate": bool(totals["estimate"]),
        "phases": phases,
        "factors": _factor_sources(rows[-1]) if rows else None,
        "training": training,
        "series": {
            "loss": [(m["step"], m["loss"]) for m in metrics if m.get("loss") is not None],
            "eval_loss": [(m["step"], m["eval_loss"]) for m in metrics if m.get("eval_loss") is not None],
            "cumulative_kwh": cum,
        },
        "expert_use": {str(k): list(v) for k, v in expert.items()} if expert else None,
        "savings": savings,
        "summary": summary,
        "hardware": hardware,
        "recipe": recipe_path.read_text(encoding="utf-8") if recipe_path.exists() else None,
        "serving": serving_section(run_dir, rows),
    }


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write `run_dir/report.json` and a self-contained `run_dir/report.html`; return both paths.

    Raises:
        UserError: `run_dir` is missing or is not a run directory.
    """
    from greentune.report.html import render_html

    run_dir = Path(run_dir)
    report = build_report(run_dir)
    run = RunDir(run_dir)
    json_path, html_path = run.report_json, run.report_html
    atomic_write_json(json_path, report)
    atomic_write_text(html_path, render_html(report))
    return json_path, html_path
