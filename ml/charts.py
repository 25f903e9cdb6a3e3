"""Server-side SVG charts for the forecast dashboard: no script, no CDN, no image files.

`price_band_chart` draws the last bars (a High-Low line and a Close tick per bar), the range each
past forecast predicted for its bar (a band behind that bar), and the next bar's forecast after
the last one; `line_chart` draws a few series over dates (the live U2 of the ledger's monitor,
a model's test-block forecasts); `stacked` puts charts one above the other in one SVG document
(the test-block plot of each MLflow run). All return SVG markup with every text escaped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

WIDTH, HEIGHT, PAD = 960, 320, 40


def _scale(lo: float, hi: float, top: float, bottom: float):
    span = hi - lo or 1.0

    def y(value: float) -> float:
        return round(bottom - (value - lo) / span * (bottom - top), 2)

    return y


def price_band_chart(
    bars: Sequence[Mapping[str, Any]],
    bands: Mapping[str, tuple[float, float]],
    next_band: tuple[float, float] | None,
    title: str,
) -> str:
    """`bars`: dicts with Date (YYYY-MM-DD), High, Low, Close, oldest first. `bands`: target date
    -> (predicted Low, predicted High) of the forecast made for that bar. `next_band`: the forecast
    of the bar after the last one, drawn one slot to the right."""
    slots = len(bars) + (1 if next_band else 0)
    if not bars:
        return ""
    values = [float(b[k]) for b in bars for k in ("High", "Low")]
    values += [v for band in bands.values() for v in band]
    values += list(next_band or ())
    lo, hi = min(values), max(values)
    margin = (hi - lo) * 0.05 or abs(hi) * 0.01 or 1.0
    y = _scale(lo - margin, hi + margin, PAD, HEIGHT - PAD)
    step = (WIDTH - 2 * PAD) / max(slots, 1)
    half = max(step * 0.35, 0.5)
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'xmlns="http://www.w3.org/2000/svg" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="none" stroke="#ccc"/>',
    ]
    for i, bar in enumerate(bars):
        x = round(PAD + (i + 0.5) * step, 2)
        band = bands.get(str(bar["Date"]))
        if band is not None:
            low, high = band
            parts.append(
                f'<rect class="band" x="{x - half:.2f}" y="{y(high)}" width="{2 * half:.2f}" '
                f'height="{max(y(low) - y(high), 0.5):.2f}" fill="#3b82f6" fill-opacity="0.3">'
                f"<title>{escape(str(bar['Date']))}: predicted {low:.4g}..{high:.4g}, "
                f"realized {float(bar['Low']):.4g}..{float(bar['High']):.4g}</title></rect>"
            )
        parts.append(
            f'<line class="bar" x1="{x}" x2="{x}" y1="{y(float(bar["High"]))}" '
            f'y2="{y(float(bar["Low"]))}" stroke="#333"/>'
            f'<line x1="{x}" x2="{x + half:.2f}" y1="{y(float(bar["Close"]))}" '
            f'y2="{y(float(bar["Close"]))}" stroke="#333"/>'
        )
    if next_band is not None:
        x = round(PAD + (len(bars) + 0.5) * step, 2)
        low, high = next_band
        parts.append(
            f'<rect class="next" x="{x - half:.2f}" y="{y(high)}" width="{2 * half:.2f}" '
            f'height="{max(y(low) - y(high), 0.5):.2f}" fill="#f97316" fill-opacity="0.6">'
            f"<title>next bar: predicted {low:.4g}..{high:.4g}</title></rect>"
        )
    for value in (lo, hi):
        parts.append(
            f'<text x="4" y="{y(value) + 4}" font-size="11" fill="#666">{value:.4g}</text>'
        )
    first, last = str(bars[0]["Date"]), str(bars[-1]["Date"])
    parts.append(
        f'<text x="{PAD}" y="{HEIGHT - 8}" font-size="11" fill="#666">{escape(first)}</text>'
        f'<text x="{WIDTH - PAD}" y="{HEIGHT - 8}" font-size="11" fill="#666" '
        f'text-anchor="end">{escape(last)}</text></svg>'
    )
    return "".join(parts)


def line_chart(
    dates: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    title: str,
    ref: float | None = 1.0,
    colours: Sequence[str] = ("#3b82f6", "#f97316", "#16a34a"),
) -> str:
    """Lines over `dates` (one per series name, None = a gap) and a dashed reference line at
    `ref`; without one (`ref=None`) the y axis is labelled with the lowest and highest value."""
    finite = [v for s in series.values() for v in s if v is not None and math.isfinite(v)]
    if not dates or not finite:
        return ""
    lo, hi = min(finite), max(finite)
    if ref is not None:
        lo, hi = min(lo, ref), max(hi, ref)
        margin = 0.05
    else:
        margin = (hi - lo) * 0.05 or abs(hi) * 0.01 or 1.0
    height = HEIGHT // 2
    y = _scale(lo - margin, hi + margin, 20, height - 24)
    step = (WIDTH - 2 * PAD) / max(len(dates) - 1, 1)
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {WIDTH} {height}" '
        f'xmlns="http://www.w3.org/2000/svg" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
    ]
    if ref is not None:
        parts.append(
            f'<line x1="{PAD}" x2="{WIDTH - PAD}" y1="{y(ref)}" y2="{y(ref)}" stroke="#999" '
            'stroke-dasharray="4 4"/>'
            f'<text x="4" y="{y(ref) + 4}" font-size="11" fill="#666">{ref:g}</text>'
        )
    else:
        parts.append(
            f'<text x="4" y="{y(hi) + 4}" font-size="11" fill="#666">{hi:.4g}</text>'
            f'<text x="4" y="{y(lo) + 4}" font-size="11" fill="#666">{lo:.4g}</text>'
            f'<text x="{PAD}" y="14" font-size="12" fill="#333">{escape(title)}</text>'
        )
    for k, (name, values) in enumerate(series.items()):
        colour = colours[k % len(colours)]
        points = [
            f"{PAD + i * step:.2f},{y(v)}"
            for i, v in enumerate(values)
            if v is not None and math.isfinite(v)
        ]
        parts.append(
            f'<polyline class="series" points="{" ".join(points)}" fill="none" '
            f'stroke="{colour}" stroke-width="{2 if ref is not None else 1}">'
            f"<title>{escape(name)}</title></polyline>"
            # The legend: a column at the top right, or one row above the plot without `ref`.
            f'<text x="{WIDTH - PAD - (0 if ref is not None else 100 * (len(series) - 1 - k))}" '
            f'y="{16 + 14 * k if ref is not None else 14}" font-size="11" text-anchor="end" '
            f'fill="{colour}">{escape(name)}</text>'
        )
    parts.append(
        f'<text x="{PAD}" y="{height - 6}" font-size="11" fill="#666">{escape(dates[0])}</text>'
        f'<text x="{WIDTH - PAD}" y="{height - 6}" font-size="11" fill="#666" '
        f'text-anchor="end">{escape(dates[-1])}</text></svg>'
    )
    return "".join(parts)


def stacked(charts: Sequence[str], title: str) -> str:
    """`charts` (this module's SVG charts) one above the other under `title`, as one standalone
    SVG document (what a browser or MLflow's artifact view shows as an image)."""
    charts = [c for c in charts if c]
    top = 28
    heights = [HEIGHT // 2] * len(charts)
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {top + sum(heights)}" '
        f'width="{WIDTH}" height="{top + sum(heights)}" font-family="sans-serif">',
        f"<title>{escape(title)}</title>",
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{PAD}" y="20" font-size="14" fill="#111">{escape(title)}</text>',
    ]
    y = top
    for chart, height in zip(charts, heights, strict=True):
        # A nested <svg> placed at (0, y); its own viewBox scales its content.
        parts.append(
            chart.replace("<svg ", f'<svg x="0" y="{y}" width="{WIDTH}" height="{height}" ', 1)
        )
        y += height
    parts.append("</svg>\n")
    return "".join(parts)
