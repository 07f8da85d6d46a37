"""Inline SVG charts for the report: line chart, bar chart, heat map. No JavaScript, no fonts
to fetch; every chart is one `<svg>` string with a `<title>` and an `id`, and its numbers
are also printed as text so a reader (or a test) can check them without the picture.
"""

from __future__ import annotations

import math
from html import escape

PALETTE = ("#1b7f5b", "#d9822b", "#3465a4", "#a33b8c", "#6b8e23", "#8c564b")
W, H = 640, 280
PAD_L, PAD_R, PAD_T, PAD_B = 64, 16, 28, 44


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """About `n` round tick values covering [lo, hi] (whole numbers only if `integer`)."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(
        m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw and (not integer or float(m * mag).is_integer())
    )
    step = max(step, 1.0) if integer else step
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 12))
    return ticks


def fmt(v: float) -> str:
    """Short number for axes and labels."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e15 or a < 1e-3:
        return f"{v:.2e}"
    if a >= 1e4:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def _frame(chart_id: str, title: str, body: list[str], width: int = W, height: int = H) -> str:
    return (
        f'<svg id="{escape(chart_id)}" class="chart" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>' + "".join(body) + "</svg>"
    )


def _axes(xt: list[float], yt: list[float], sx, sy, x_label: str, y_label: str, height: int = H) -> list[str]:
    out = []
    for y in yt:
        py = sy(y)
        out.append(f'<line x1="{PAD_L}" y1="{py:.1f}" x2="{W - PAD_R}" y2="{py:.1f}" class="grid"/>')
        out.append(f'<text x="{PAD_L - 6}" y="{py + 4:.1f}" text-anchor="end" class="tick">{fmt(y)}</text>')
    for x in xt:
        px = sx(x)
        out.append(
            f'<text x="{px:.1f}" y="{height - PAD_B + 16}" text-anchor="middle" class="tick">{fmt(x)}</text>'
        )
    out.append(
        f'<line x1="{PAD_L}" y1="{height - PAD_B}" x2="{W - PAD_R}" y2="{height - PAD_B}" class="axis"/>'
    )
    out.append(f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{height - PAD_B}" class="axis"/>')
    out.append(
        f'<text x="{(PAD_L + W - PAD_R) / 2}" y="{height - 6}" text-anchor="middle" '
        f'class="label">{escape(x_label)}</text>'
    )
    out.append(
        f'<text x="14" y="{(PAD_T + height - PAD_B) / 2}" text-anchor="middle" class="label" '
        f'transform="rotate(-90 14 {(PAD_T + height - PAD_B) / 2})">{escape(y_label)}</text>'
    )
    return out


def line_chart(
    chart_id: str,
    title: str,
    series: list[tuple[str, list[tuple[float, float]]]],
    x_label: str,
    y_label: str,
    integer_x: bool = True,
) -> str:
    """Lines (one per named series of (x, y) points) on shared axes, with a legend."""
    pts = [p for _, s in series for p in s if math.isfinite(p[1])]
    if not pts:
        return _frame(
            chart_id,
            title,
            [f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" class="empty">no data</text>'],
        )
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xt = nice_ticks(min(xs), max(xs), integer=integer_x)
    lo = 0.0 if 0 <= min(ys) < 0.2 * max(ys) else min(ys)  # start at zero unless that squashes the lines
    yt = nice_ticks(lo, max(ys))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    sx = lambda x: PAD_L + (x - x0) / ((x1 - x0) or 1) * (W - PAD_L - PAD_R)  # noqa: E731
    sy = lambda y: H - PAD_B - (y - y0) / ((y1 - y0) or 1) * (H - PAD_T - PAD_B)  # noqa: E731
    body = _axes(xt, yt, sx, sy, x_label, y_label)
    for i, (name, s) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        good = [(x, y) for x, y in s if math.isfinite(y)]
        if not good:
            continue
        path = " ".join(f"{'M' if j == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for j, (x, y) in enumerate(good))
        body.append(
            f'<path d="{path}" fill="none" stroke="{color}" stroke-width="2" class="series" '
            f'data-series="{escape(name)}"/>'
        )
        if len(good) <= 40:
            body += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>' for x, y in good]
        lx = W - PAD_R - 150
        ly = PAD_T + 4 + 16 * i
        body.append(
            f'<rect x="{lx}" y="{ly}" width="12" height="4" fill="{color}"/>'
            f'<text x="{lx + 18}" y="{ly + 6}" class="legend">{escape(name)}</text>'
        )
    return _frame(chart_id, title, body)


def bar_chart(chart_id: str, title: str, bars: list[tuple[str, float]], y_label: str) -> str:
    """Vertical bars with their values printed on top."""
    if not bars:
        return _frame(
            chart_id,
            title,
            [f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" class="empty">no data</text>'],
        )
    yt = nice_ticks(0.0, max(v for _, v in bars) or 1.0)
    y1 = yt[-1]
    sy = lambda y: H - PAD_B - y / (y1 or 1) * (H - PAD_T - PAD_B)  # noqa: E731
    body = _axes([], yt, lambda x: 0, sy, "", y_label)
    slot = (W - PAD_L - PAD_R) / len(bars)
    for i, (name, v) in enumerate(bars):
        x = PAD_L + i * slot + slot * 0.15
        w = slot * 0.7
        top = sy(v)
        body.append(
            f'<rect x="{x:.1f}" y="{top:.1f}" width="{w:.1f}" height="{H - PAD_B - top:.1f}" '
            f'fill="{PALETTE[i % len(PALETTE)]}" class="bar" data-label="{escape(name)}"/>'
        )
        body.append(
            f'<text x="{x + w / 2:.1f}" y="{top - 4:.1f}" text-anchor="middle" class="value">{fmt(v)}</text>'
        )
        body.append(
            f'<text x="{x + w / 2:.1f}" y="{H - PAD_B + 16}" text-anchor="middle" '
            f'class="tick">{escape(name)}</text>'
        )
    return _frame(chart_id, title, body)


def heatmap(chart_id: str, title: str, rows: list[tuple[str, list[float]]], col_prefix: str = "e") -> str:
    """A grid of cells shaded by value in [0, max]; the value is printed in each cell."""
    if not rows:
        return _frame(chart_id, title, [])
    ncol = max(len(v) for _, v in rows)
    vmax = max((x for _, v in rows for x in v), default=1.0) or 1.0
    cell_w = min(110, (W - PAD_L - PAD_R) / max(1, ncol))
    cell_h = 30
    height = PAD_T + cell_h * len(rows) + 30
    body = []
    for j in range(ncol):
        body.append(
            f'<text x="{PAD_L + (j + 0.5) * cell_w:.1f}" y="{PAD_T - 8}" text-anchor="middle" '
            f'class="tick">{escape(col_prefix)}{j}</text>'
        )
    for i, (name, vals) in enumerate(rows):
        y = PAD_T + i * cell_h
        body.append(
            f'<text x="{PAD_L - 6}" y="{y + cell_h / 2 + 4:.1f}" text-anchor="end" '
            f'class="tick">{escape(name)}</text>'
        )
        for j, v in enumerate(vals):
            a = 0.08 + 0.92 * (v / vmax)
            body.append(
                f'<rect x="{PAD_L + j * cell_w:.1f}" y="{y}" width="{cell_w - 2:.1f}" height="{cell_h - 2}" '
                f'fill="{PALETTE[0]}" fill-opacity="{a:.2f}" class="cell"/>'
                f'<text x="{PAD_L + (j + 0.5) * cell_w:.1f}" y="{y + cell_h / 2 + 3:.1f}" '
                'text-anchor="middle" '
                f'class="cellv">{v:.2f}</text>'
            )
    return _frame(chart_id, title, body, height=height)
