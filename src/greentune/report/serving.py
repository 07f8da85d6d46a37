"""The report's serving part: what the shipped model costs per token, beside training.

`serving_section(run_dir, ledger_rows)` collects the run's ``inference`` ledger rows
(`greentune eval`, newest per engine and format) and the modelled cost of the exported
GGUF on the target laptop (`plan.inference`); `render_serving(report)` draws the table,
a J/token chart by engine and format, and `cost_cards` the summary's "cost to serve".
"""

from __future__ import annotations

import logging
from html import escape
from pathlib import Path

from greentune.report.svg import bar_chart, fmt
from greentune.run_dir import RunDir

log = logging.getLogger(__name__)


def _latest(rows: list[dict]) -> list[dict]:
    by_key: dict[tuple, dict] = {}
    for row in rows:
        d = row.get("details")
        if row.get("phase") == "inference" and isinstance(d, dict) and "generate" in d:
            by_key[(d.get("engine"), d.get("format"))] = d
    return list(by_key.values())


def _projection(run_dir: Path) -> dict | None:
    from greentune.plan.hardware import find_hardware
    from greentune.plan.inference import TARGET_LAPTOP, profile_from_gguf, project

    files = RunDir(run_dir).ggufs()
    if not files:
        return None
    try:
        prof = profile_from_gguf(files[0])
        p = project(prof, find_hardware(TARGET_LAPTOP))
    except Exception as err:  # noqa: BLE001 — a report still renders without the projection
        log.warning("no serving projection for %s: %s", files[0], err)
        return None
    return {"file": files[0].name, **p.to_dict()}


def serving_section(run_dir: Path, rows: list[dict]) -> dict:
    """{"measured": [eval results], "projected": {...} | None, "cost_to_serve": {...}} for report.json."""
    measured = _latest(rows)
    projected = _projection(Path(run_dir))
    here = next(
        (m for m in reversed(measured) if m.get("engine") == "llamacpp"), measured[-1] if measured else None
    )
    cost = {
        "measured_j_per_1k": here["j_per_1k_generated"] if here else None,
        "measured_with": f"{here['engine']} {here['format']}" if here else None,
        "measured_estimate": bool(here and here.get("estimate")),
        "measured_on": here.get("machine") if here else None,
        "projected_j_per_1k": projected["j_per_1k_generated"] if projected else None,
        "projected_on": projected["device"] if projected else None,
    }
    return {"measured": measured, "projected": projected, "cost_to_serve": cost}


def _tag(on: bool, text: str = "estimate") -> str:
    return f'<span class="est">{escape(text)}</span>' if on else ""


def cost_cards(r: dict) -> list[tuple[str, str, str, bool]]:
    """(id, label, value, estimate) cards for the summary: J per 1,000 generated tokens, here and on the
    laptop."""
    c = (r.get("serving") or {}).get("cost_to_serve") or {}
    cards = []
    if c.get("measured_j_per_1k") is not None:
        cards.append(
            (
                "serve-j-per-1k-here",
                f"Cost to serve here ({c['measured_with']})",
                f"{fmt(c['measured_j_per_1k'])} J / 1k tokens",
                c["measured_estimate"],
            )
        )
    if c.get("projected_j_per_1k") is not None:
        cards.append(
            (
                "serve-j-per-1k-laptop",
                f"Cost to serve on {c['projected_on']} (modelled)",
                f"{fmt(c['projected_j_per_1k'])} J / 1k tokens",
                True,
            )
        )
    return cards


def render_serving(r: dict) -> str:
    """The "Serving" section: a table of measured engines/formats, the laptop projection, and a chart."""
    s = r.get("serving") or {}
    measured, projected = s.get("measured") or [], s.get("projected")
    if not measured and not projected:
        return (
            '<p class="note" id="serving-none">No inference measurement in this run: '
            "<code>greentune eval RUN --data HELD_OUT --engine llamacpp</code> adds one.</p>"
        )
    head = [
        "engine",
        "format",
        "perplexity",
        "prompt tok/s",
        "prompt J/token",
        "generation tok/s",
        "generation J/token",
        "J / 1k generated",
        "peak memory MiB",
        "measured on",
    ]
    body = []
    for m in measured:
        est = _tag(bool(m.get("estimate")))
        body.append(
            [
                escape(str(m["engine"])),
                escape(str(m["format"])),
                fmt(m["perplexity"]),
                fmt(m["prompt"]["tokens_per_s"]),
                fmt(m["prompt"]["j_per_token"]) + est,
                fmt(m["generate"]["tokens_per_s"]),
                fmt(m["generate"]["j_per_token"]) + est,
                fmt(m["j_per_1k_generated"]) + est,
                fmt(m["peak_rss_bytes"] / 2**20),
                escape(f"{m.get('machine', '')}, {m.get('threads')} thread(s)"),
            ]
        )
    if projected:
        mod = _tag(True, "modelled")
        body.append(
            [
                f"llama.cpp on {escape(projected['device'])}",
                escape(str(projected["format"])),
                "–",
                fmt(projected["prompt_tokens_per_s"]),
                fmt(projected["prompt_j_per_token"]) + mod,
                fmt(projected["decode_tokens_per_s"]),
                fmt(projected["decode_j_per_token"]) + mod,
                fmt(projected["j_per_1k_generated"]) + mod,
                "–",
                escape(
                    f"projection of {projected['file']} ({projected['bandwidth_gbs']:g} GB/s, "
                    f"{projected['power_w']:g} W)"
                ),
            ]
        )
    rows = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{c}</td>' if i >= 2 and i < 9 else f"<td>{c}</td>" for i, c in enumerate(row)
        )
        + "</tr>"
        for row in body
    )
    table = (
        "<table "
        f'id="table-inference"><thead><tr>{"".join(f"<th>{escape(h)}</th>" for h in head)}</tr></thead>'
        f"<tbody>{rows}</tbody></table>"
    )
    bars = [(f"{m['engine']} {m['format']}", float(m["generate"]["j_per_token"]) * 1000) for m in measured]
    if projected:
        bars.append(
            (
                f"{projected['device'].removeprefix('Apple ')} {projected['format']} (modelled)",
                float(projected["decode_j_per_token"]) * 1000,
            )
        )
    chart = bar_chart(
        "chart-inference-j-per-token",
        "Generation energy per token by engine and format (mJ/token)",
        bars,
        "mJ per generated token",
    )
    note = (
        '<p class="note">Measured rows come from <code>greentune eval</code> on the machine named; '
        "the modelled row assumes memory-bound decode (active weight bytes ÷ bandwidth) at the device's "
        "catalogue power (an upper bound).</p>"
    )
    return (
        table + f'<div class="charts"><figure>{chart}<figcaption>Joules per generated token, ×1000.'
        f"</figcaption></figure></div>" + note
    )
