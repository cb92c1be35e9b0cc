"""Line charts as inline SVG for the web consoles, drawn on the server (no chart library, no
script needed to see them; the page's live part swaps the whole chart)."""

from __future__ import annotations

from html import escape

from markupsafe import Markup

# Okabe-Ito: told apart by colour-blind readers too; the first is the global / total line
COLOURS = ["#000000", "#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2", "#CC79A7", "#F0E442", "#999999"]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = (hi - lo) / (n - 1)
    return [lo + i * step for i in range(n)]


def line_chart(series: list[tuple[str, list[tuple[float, float]]]], x_label: str, y_label: str,
               y_min: float | None = None, y_max: float | None = None, limit: float | None = None,
               limit_label: str = "", width: int = 680, height: int = 260, name: str = "chart") -> Markup:
    """One polyline with dots per (label, [(x, y), ...]); `limit`: a dashed horizontal line (a budget).
    The svg carries data-points (dots drawn) for whoever checks the page."""
    points = [p for _, pts in series for p in pts]
    xs, ys = [x for x, _ in points], [y for _, y in points] + ([limit] if limit is not None else [])
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    lo = y_min if y_min is not None else (min(ys) if ys else 0.0)
    hi = y_max if y_max is not None else (max(ys) if ys else 1.0)
    if hi == lo:
        hi = lo + 1.0
    left, right, top, bottom = 56, 16, 12, 40
    w, h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * w

    def py(y: float) -> float:
        return top + (1 - (y - lo) / (hi - lo)) * h

    out = [f'<svg class="chart" role="img" aria-label="{escape(y_label)} by {escape(x_label)}" data-name="{escape(name)}" '
           f'data-points="{len(points)}" width="{width}" height="{height}" viewBox="0 0 {width} {height}">']
    for t in _ticks(lo, hi):
        out.append(f'<line class="grid" x1="{left}" x2="{left + w}" y1="{py(t):.1f}" y2="{py(t):.1f}"/>')
        out.append(f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:.3g}</text>')
    whole = sorted({x for x in xs if float(x).is_integer()})
    step = max(1, len(whole) // 10)
    for x in whole[::step]:
        out.append(f'<text x="{px(x):.1f}" y="{top + h + 16}" text-anchor="middle">{x:g}</text>')
    out.append(f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{top + h}"/>'
               f'<line class="axis" x1="{left}" x2="{left + w}" y1="{top + h}" y2="{top + h}"/>')
    out.append(f'<text x="{left + w / 2:.0f}" y="{height - 6}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text x="14" y="{top + h / 2:.0f}" text-anchor="middle" transform="rotate(-90 14 {top + h / 2:.0f})">'
               f'{escape(y_label)}</text>')
    if limit is not None:
        out.append(f'<line class="limit" x1="{left}" x2="{left + w}" y1="{py(limit):.1f}" y2="{py(limit):.1f}"/>')
        out.append(f'<text x="{left + w - 4}" y="{py(limit) - 4:.1f}" text-anchor="end">{escape(limit_label)}</text>')
    for i, (label, pts) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        pts = sorted(pts)
        if len(pts) > 1:
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="{2.5 if i == 0 else 1.5}" points="{coords}"/>')
        for x, y in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"><title>{escape(label)}: '
                       f'{y:.4g} at {x:g}</title></circle>')
    out.append("</svg>")
    legend = "".join(f'<span><svg class="swatch" width="12" height="12"><rect width="12" height="12" '
                     f'fill="{COLOURS[i % len(COLOURS)]}"/></svg>{escape(label)}</span>' for i, (label, _) in enumerate(series))
    return Markup("".join(out) + f'<div class="legend">{legend}</div>')
