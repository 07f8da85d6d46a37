"""Render the report dict (see `build.build_report`) as one self-contained HTML page.

Inline CSS, inline SVG charts, no scripts, no external resources: the page opens offline
and prints. Every modelled number carries an ``estimate`` tag.
"""

from __future__ import annotations

from html import escape

from greentune.energy.ledger import J_PER_KWH
from greentune.report.serving import cost_cards, render_serving
from greentune.report.svg import bar_chart, fmt, heatmap, line_chart

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2329;margin:0;background:#f6f7f5}
main{max-width:980px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d8ddd6;padding-bottom:4px}
.sub{color:#5b6670;font-size:13px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px;margin-top:16px}
.card{background:#fff;border:1px solid #dfe4dc;border-radius:8px;padding:10px 12px}
.card .v{font-size:22px;font-weight:600;color:#14543d}.card .k{font-size:12px;color:#5b6670;text-transform:uppercase;letter-spacing:.04em}
.est{display:inline-block;font-size:11px;font-weight:600;color:#8a4b00;background:#fff1dc;border:1px solid #f0c890;border-radius:4px;padding:0 5px;margin-left:6px;vertical-align:middle}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:14px}
figure{background:#fff;border:1px solid #dfe4dc;border-radius:8px;margin:0;padding:8px}
figcaption{font-size:13px;color:#5b6670;padding:2px 6px 6px}
svg.chart{width:100%;height:auto}
svg .grid{stroke:#e8ebe6} svg .axis{stroke:#8b949c} svg .tick{font-size:11px;fill:#5b6670}
svg .label{font-size:12px;fill:#3b444c} svg .legend{font-size:12px;fill:#1d2329} svg .value{font-size:11px;fill:#1d2329}
svg .cellv{font-size:10px;fill:#10281f} svg .empty{font-size:14px;fill:#8b949c}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #dfe4dc;font-size:13px}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #eef0ec;vertical-align:top} th{background:#f0f3ee;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#fff;border:1px solid #dfe4dc;border-radius:6px;padding:10px;overflow:auto;font-size:12px}
.note{font-size:12px;color:#5b6670}
"""


def _e(x) -> str:
    return escape(str(x))


def _n(x, unit: str = "") -> str:
    if x is None:
        return "–"
    return f"{fmt(float(x))}{(' ' + unit) if unit else ''}"


UNITS = {  # canonical unit first; (unit, multiplier from canonical)
    "energy": (("kWh", 1.0), ("Wh", 1e3), ("J", J_PER_KWH)),
    "carbon": (("kgCO2e", 1.0), ("gCO2e", 1e3), ("mgCO2e", 1e6)),
    "water": (("L", 1.0), ("mL", 1e3)),
}


def scale(value: float | None, kind: str) -> tuple[float, str]:
    """The multiplier and unit that show `value` (in the canonical unit of `kind`) as >= 1 where possible."""
    units = UNITS[kind]
    for unit, mult in units:
        if value is not None and abs(value) * mult >= 1.0:
            return mult, unit
    return units[-1][1], units[-1][0]


def _q(value: float | None, kind: str) -> str:
    """`value` in its canonical unit of `kind`, shown in a readable unit: 0.0353 kWh → '35.3 Wh'."""
    if value is None:
        return "–"
    mult, unit = scale(value, kind) if value else (1.0, UNITS[kind][0][0])
    return f"{fmt(value * mult)} {unit}"


def _tag(on: bool) -> str:
    return '<span class="est">estimate</span>' if on else ""


def _table(headers: list[str], rows: list[list[str]], table_id: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(rows_cell for rows_cell in r) + "</tr>" for r in rows)
    return f'<table id="{_e(table_id)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _td(x, num: bool = False) -> str:
    return f'<td class="n">{x}</td>' if num else f"<td>{x}</td>"


def _compute_cards(c: dict | None) -> list[tuple]:
    """Mean achieved model FLOP/s of the training steps, and its share of the device's peak."""
    if not c:
        return []
    cards = [("train-flops", "Achieved compute", _n(c.get("mean_flops_per_s", 0) / 1e9, "GFLOP/s"), False)]
    if c.get("utilisation") is not None:
        peak = _n(c["peak_flops"] / 1e9, "GFLOP/s")
        cards.append(
            ("train-utilisation", f"Utilisation of {peak} peak", f"{100 * c['utilisation']:.1f} %", False)
        )
    return cards


def _cards(r: dict) -> str:
    t, tr, est = r["totals"], r["training"], r["estimate"]
    cards = (
        [
            ("total-it-kwh", "IT energy", _q(t["it_kwh"], "energy"), est),
            ("total-facility-kwh", "Facility energy", _q(t["facility_kwh"], "energy"), est),
            ("total-kg-co2e", "Carbon", _q(t["kg_co2e"], "carbon"), est),
            ("total-water-l", "Water", _q(t["water_l"], "water"), est),
            ("total-seconds", "Metered time", _n(t["seconds"], "s"), False),
            ("train-tokens", "Tokens trained", _n(tr["tokens"]), False),
            ("train-j-per-token", "Training energy / token", _n(tr["j_per_token"], "J"), est),
            ("train-joules", "Training energy", _n(tr["joules"], "J"), est),
        ]
        + _compute_cards(tr.get("compute"))
        + cost_cards(r)
    )
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card" id="{i}"><div class="k">{_e(k)}</div><div class="v">{_e(v)}{_tag(e)}</div></div>'
            for i, k, v, e in cards
        )
        + "</div>"
    )


def _charts(r: dict) -> str:
    s, est = r["series"], r["estimate"]
    pm, pu = scale(max((p["it_kwh"] for p in r["phases"]), default=0.0), "energy")
    cm, cu = scale(max((y for _, y in s["cumulative_kwh"]), default=0.0), "energy")
    loss = [("train loss", s["loss"])] + ([("eval loss", s["eval_loss"])] if s["eval_loss"] else [])
    figs = [
        (
            line_chart("chart-loss", "Loss by step", loss, "step", "loss"),
            "Training loss per step" + (" and evaluation loss" if s["eval_loss"] else "") + ".",
        ),
        (
            bar_chart(
                "chart-phases",
                f"IT energy by phase ({pu})",
                [(p["phase"], p["it_kwh"] * pm) for p in r["phases"]],
                f"{pu} (IT)",
            ),
            "IT energy of each phase from the ledger." + (" Modelled (estimate)." if est else ""),
        ),
        (
            line_chart(
                "chart-cumulative-kwh",
                f"Cumulative training energy ({cu})",
                [(f"IT {cu}", [(x, y * cm) for x, y in s["cumulative_kwh"]])],
                "step",
                f"{cu} (IT)",
            ),
            "Cumulative IT energy of training over steps." + (" Modelled (estimate)." if est else ""),
        ),
    ]
    if r.get("expert_use"):
        rows = [
            (f"layer {k}", v)
            for k, v in sorted(
                r["expert_use"].items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0
            )
        ]
        figs.append(
            (
                heatmap("chart-expert-use", "Expert use per layer (fraction of routed tokens)", rows),
                "Fraction of routed tokens per expert, last recorded step.",
            )
        )
    return (
        '<div class="charts">'
        + "".join(f"<figure>{svg}<figcaption>{_e(cap)}</figcaption></figure>" for svg, cap in figs)
        + "</div>"
    )


def _phase_table(r: dict) -> str:
    t = r["totals"]
    em, eu = scale(t["it_kwh"], "energy")
    cm, cu = scale(t["kg_co2e"], "carbon")
    wm, wu = scale(t["water_l"], "water")

    def line(name: str, d: dict, joules: float) -> list[str]:
        return [
            _td(name),
            _td(_n(d["seconds"]), True),
            _td(_n(joules), True),
            _td(_n(d["it_kwh"] * em), True),
            _td(_n(d["facility_kwh"] * em), True),
            _td(_n(d["kg_co2e"] * cm), True),
            _td(_n(d["water_l"] * wm), True),
        ]

    rows = [line(_e(p["phase"]), p, p["joules"]) for p in r["phases"]]
    rows.append(line("<b>total</b>", t, sum(t["joules"].values())))
    return _table(
        ["phase", "seconds", "joules", f"IT {eu}", f"facility {eu}", cu, f"water {wu}"], rows, "table-phases"
    )


def _counterfactual_basis(full: dict) -> str:
    """Why the counterfactual was not measured whole, when it was not (energy.savings)."""
    fit, sl, pl = full.get("fit") or {}, full.get("slice"), full.get("planner")
    if not (sl or pl):
        return ""
    why = (
        f" A full copy would need {_n(fit.get('whole_bytes', 0) / 2**30, 'GiB')}, more than the "
        f"{_n(fit.get('available_bytes', 0) / 2**30, 'GiB')} available ({_e(fit.get('available_source', ''))}):"
    )
    if sl:
        m, z = sl["measured"], sl["no_layers"]
        return why + (
            f" measured on {sl['layers']} of {sl['of']} decoder layers of the same shapes and batch "
            f"(weights {_e(sl['weights'])}), {_n(m['j_per_token'], 'J/token')}, and without layers (embedding and head), "
            f"{_n(z['j_per_token'], 'J/token')}; scaled to {sl['of']} layers."
        )
    return why + (
        f" modelled by the planner at utilisation {pl['utilisation']:.3f} "
        f"({_e(pl['utilisation_basis'])}), {pl['power_w']:,.0f} W."
    )


def _savings(r: dict) -> str:
    sv = r.get("savings")
    if not sv or not sv.get("rows"):
        return (
            '<p class="note" id="savings-none">No savings measurement in this run (savings.json absent).</p>'
        )
    rows = []
    for row in sv["rows"]:
        if row["unit"] == "bytes":
            row = {
                **row,
                "unit": "GiB",
                **{k: row[k] / 2**30 for k in ("this_run", "full_fine_tune", "saved")},
            }
        pct = "–" if row.get("saved_pct") is None else f"{row['saved_pct']:.1f} %"
        rows.append(
            [
                _td(_e(row["quantity"]) + _tag(row.get("estimate", False))),
                _td(_e(row["unit"])),
                _td(_n(row["this_run"]), True),
                _td(_n(row["full_fine_tune"]), True),
                _td(_n(row["saved"]), True),
                _td(pct, True),
                _td(_e(row["method"])),
            ]
        )
    full = sv.get("full_fine_tune") or {}
    extra = ""
    if full:
        extra = (
            f'<p class="note">Counterfactual: {_e(full.get("method", ""))}; '
            f"{_n(full.get('j_per_token'), 'J/token')}, {_n(full.get('s_per_token'), 's/token')}, "
            f"peak memory {_n((full.get('peak_mem_bytes') or 0) / 2**30, 'GiB')} ({_e(full.get('peak_mem_kind', ''))}); "
            f"sources: {_e(', '.join(f'{k} {v}' for k, v in sorted((full.get('source') or {}).items())))}."
            f"{_counterfactual_basis(full)}</p>"
        )
    return (
        _table(
            ["quantity", "unit", "this run", "full fine-tune", "saved", "saved %", "method"],
            rows,
            "table-savings",
        )
        + extra
    )


def _factors(r: dict) -> str:
    f = r.get("factors")
    if not f:
        return '<p class="note">No ledger rows, so no factors.</p>'
    src = f.get("sources", {})
    rows = [
        [_td("region"), _td(_e(f"{f.get('region_name')} ({f.get('region')})")), _td("")],
        [
            _td("grid intensity"),
            _td(_n(f["grid_g_per_kwh"], "gCO2e/kWh")),
            _td(_e(src.get("grid_g_per_kwh", ""))),
        ],
        [_td("PUE"), _td(_n(f["pue"])), _td(_e(src.get("pue", "")))],
        [
            _td("on-site WUE"),
            _td(_n(f["wue_onsite_l_per_kwh"], "L/kWh IT")),
            _td(_e(src.get("wue_onsite_l_per_kwh", ""))),
        ],
        [
            _td("off-site water"),
            _td(_n(f["offsite_l_per_kwh"], "L/kWh")),
            _td(_e(src.get("offsite_l_per_kwh", ""))),
        ],
    ]
    return _table(["factor", "value", "source"], rows, "table-factors")


def _sources(r: dict) -> str:
    t = r["totals"]
    rows = [
        [_td(_e(c)), _td(_e(", ".join(s)) + _tag("estimate" in s)), _td(_n(t["joules"].get(c)), True)]
        for c, s in sorted(t["sources"].items())
    ]
    return _table(["component", "meter source", "joules"], rows, "table-sources")


def _hardware(r: dict) -> str:
    h = dict(r.get("hardware") or {})
    by = h.pop("recorded_by", "")
    mem = h.get("memory_bytes")
    if mem:
        h["memory_bytes"] = f"{mem} ({mem / 2**30:.1f} GiB)"
    rows = [[_td(_e(k)), _td(_e(", ".join(v) if isinstance(v, list) else v))] for k, v in h.items()]
    return _table(["", ""], rows, "table-hardware") + f'<p class="note">Recorded by {_e(by)}.</p>'


def render_html(r: dict) -> str:
    """The whole page as a string."""
    tr = r["training"]
    lines = [
        f"steps {tr['steps']}" if tr["steps"] is not None else "",
        f"final loss {fmt(tr['final_loss'])}" if tr["final_loss"] is not None else "",
        f"final eval loss {fmt(tr['final_eval_loss'])}" if tr["final_eval_loss"] is not None else "",
    ]
    est_note = (
        (
            '<p class="note" id="estimate-note"><span class="est">estimate</span> marks numbers modelled from '
            "CPU time and resident memory (no hardware energy counter was readable); they are "
            "not measurements.</p>"
        )
        if r["estimate"]
        else ""
    )
    recipe = f"<h2>Recipe</h2><pre>{_e(r['recipe'])}</pre>" if r.get("recipe") else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>greentune report: {_e(r["run"])}</title><style>{CSS}</style></head>
<body><main>
<h1>greentune report: {_e(r["run"])}</h1>
<div class="sub">generated {_e(r["generated_at"])} · {_e(" · ".join(x for x in lines if x))}</div>
{_cards(r)}
{est_note}
<h2>Charts</h2>
{_charts(r)}
<h2>Energy, carbon and water by phase</h2>
{_phase_table(r)}
<p class="note">facility kWh = IT kWh × PUE; kgCO2e = facility kWh × grid gCO2e/kWh ÷ 1000;
litres = IT kWh × on-site WUE + facility kWh × off-site L/kWh. 1 kWh = {J_PER_KWH:.0f} J.</p>
<h2>Serving: cost per token of the shipped model</h2>
{render_serving(r)}
<h2>Savings</h2>
{_savings(r)}
<h2>Factors</h2>
{_factors(r)}
<h2>Meter sources</h2>
{_sources(r)}
<h2>Hardware</h2>
{_hardware(r)}
{recipe}
</main></body></html>
"""
