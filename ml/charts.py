"""Server-side SVG charts for the forecast dashboard: no script, no CDN, no image files.

`price_band_chart` draws the last bars (a High-Low line and a Close tick per bar), the range each
past forecast predicted for its bar (a band behind that bar), its Close intervals (90 % and 80 %
bands behind the bar, the realized Close marked inside or outside), and the next bar's forecast
after the last one; `line_chart` draws a few series over dates (the live U2 of the ledger's monitor,
a model's test-block forecasts); `stacked` puts charts one above the other in one SVG document
(the test-block plot of each MLflow run). All return SVG markup with every text escaped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any, NamedTuple

WIDTH, HEIGHT, PAD = 960, 320, 40


def _scale(lo: float, hi: float, top: float, bottom: float):
    span = hi - lo or 1.0

    def y(value: float) -> float:
        return round(bottom - (value - lo) / span * (bottom - top), 2)

    return y


class CloseInterval(NamedTuple):
    """A forecast's central intervals of Close, in the chart's units: 90 % is q05..q95, 80 %
    q10..q90."""

    q05: float
    q10: float
    q90: float
    q95: float


# The fills of the Close intervals (the 80 % band is drawn over the 90 % one, so it reads darker)
# and the marks of the realized Close: a filled circle inside the 90 % interval, a cross outside,
# so the two differ by shape and not by colour alone.
_INTERVAL_FILL = "#16a34a"
_INSIDE, _OUTSIDE = "#15803d", "#b91c1c"


def _interval_rects(x: float, width: float, y: Any, interval: CloseInterval, cls: str) -> str:
    """The 90 % and 80 % bands of one slot, `width` wide (a whole slot: neighbours join)."""
    return "".join(
        f'<rect class="{cls}{level}" x="{x - width / 2:.2f}" y="{y(hi)}" width="{width:.2f}" '
        f'height="{max(y(lo) - y(hi), 0.5):.2f}" fill="{_INTERVAL_FILL}" fill-opacity="0.16"/>'
        for level, lo, hi in ((90, interval.q05, interval.q95), (80, interval.q10, interval.q90))
    )


def _close_mark(x: float, y: float, day: str, close: float, interval: CloseInterval) -> str:
    """The realized Close of a bar whose forecast had intervals: inside or outside its 90 %."""
    inside = interval.q05 <= close <= interval.q95
    text = (
        f"{escape(day)}: Close {close:.4g} {'inside' if inside else 'outside'} the 90 % interval "
        f"{interval.q05:.4g}..{interval.q95:.4g} (80 %: {interval.q10:.4g}..{interval.q90:.4g})"
    )
    if inside:
        return (
            f'<circle class="close-inside" cx="{x}" cy="{y}" r="2.6" fill="{_INSIDE}">'
            f"<title>{text}</title></circle>"
        )
    return (
        f'<path class="close-outside" d="M{x - 3:.2f} {y - 3:.2f}L{x + 3:.2f} {y + 3:.2f}'
        f'M{x - 3:.2f} {y + 3:.2f}L{x + 3:.2f} {y - 3:.2f}" stroke="{_OUTSIDE}" '
        f'stroke-width="1.8"><title>{text}</title></path>'
    )


def _interval_legend() -> str:
    """What the interval layer's shapes mean, as text in the chart (read by screen readers too)."""
    items = [
        (
            f'<rect width="10" height="10" y="-9" fill="{_INTERVAL_FILL}" fill-opacity="0.32"/>',
            "Close 80 % interval (darker) within 90 % (lighter)",
        ),
        (f'<circle cx="5" cy="-4" r="2.6" fill="{_INSIDE}"/>', "Close inside 90 %"),
        (
            f'<path d="M2 -7L8 -1M2 -1L8 -7" stroke="{_OUTSIDE}" stroke-width="1.8"/>',
            "Close outside 90 %",
        ),
        (
            '<rect width="10" height="10" y="-9" fill="#3b82f6" fill-opacity="0.3"/>',
            "expected Low..High",
        ),
    ]
    parts, x = ['<g class="legend" font-size="11" fill="#333">'], PAD
    for shape, label in items:
        parts.append(f'<g transform="translate({x} 16)">{shape}<text x="14">{label}</text></g>')
        x += 24 + 6 * len(label)
    parts.append("</g>")
    return "".join(parts)


def price_band_chart(
    bars: Sequence[Mapping[str, Any]],
    bands: Mapping[str, tuple[float, float]],
    next_band: tuple[float, float] | None,
    title: str,
    intervals: Mapping[str, CloseInterval] | None = None,
    next_interval: CloseInterval | None = None,
    description: str = "",
) -> str:
    """`bars`: dicts with Date (YYYY-MM-DD), High, Low, Close, oldest first. `bands`: target date
    -> (predicted Low, predicted High) of the forecast made for that bar. `next_band`: the forecast
    of the bar after the last one, drawn one slot to the right. `intervals`: target date -> the
    Close intervals of the forecast made for that bar, drawn behind it, its Close marked inside or
    outside; `next_interval` those of the next bar; `description` the chart's <desc>."""
    intervals = intervals or {}
    slots = len(bars) + (1 if next_band or next_interval else 0)
    if not bars:
        return ""
    values = [float(b[k]) for b in bars for k in ("High", "Low")]
    values += [v for band in bands.values() for v in band]
    values += list(next_band or ()) + list(next_interval or ())
    values += [v for interval in intervals.values() for v in (interval.q05, interval.q95)]
    lo, hi = min(values), max(values)
    margin = (hi - lo) * 0.05 or abs(hi) * 0.01 or 1.0
    y = _scale(lo - margin, hi + margin, PAD, HEIGHT - PAD)
    step = (WIDTH - 2 * PAD) / max(slots, 1)
    half = max(step * 0.35, 0.5)
    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'xmlns="http://www.w3.org/2000/svg" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f"<desc>{escape(description)}</desc>" if description else "",
        f'<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="none" stroke="#ccc"/>',
        _interval_legend() if intervals or next_interval else "",
    ]
    for i, bar in enumerate(bars):
        x = round(PAD + (i + 0.5) * step, 2)
        day = str(bar["Date"])
        interval = intervals.get(day)
        if interval is not None:
            parts.append(_interval_rects(x, step, y, interval, "interval"))
        band = bands.get(day)
        if band is not None:
            low, high = band
            parts.append(
                f'<rect class="band" x="{x - half:.2f}" y="{y(high)}" width="{2 * half:.2f}" '
                f'height="{max(y(low) - y(high), 0.5):.2f}" fill="#3b82f6" fill-opacity="0.3">'
                f"<title>{escape(day)}: predicted {low:.4g}..{high:.4g}, "
                f"realized {float(bar['Low']):.4g}..{float(bar['High']):.4g}</title></rect>"
            )
        close = float(bar["Close"])
        parts.append(
            f'<line class="bar" x1="{x}" x2="{x}" y1="{y(float(bar["High"]))}" '
            f'y2="{y(float(bar["Low"]))}" stroke="#333"/>'
            f'<line x1="{x}" x2="{x + half:.2f}" y1="{y(close)}" y2="{y(close)}" stroke="#333"/>'
        )
        if interval is not None:
            parts.append(_close_mark(x, y(close), day, close, interval))
    x = round(PAD + (len(bars) + 0.5) * step, 2)
    if next_interval is not None:
        parts.append(_interval_rects(x, step, y, next_interval, "next-interval"))
    if next_band is not None:
        low, high = next_band
        parts.append(
            f'<rect class="next" x="{x - half:.2f}" y="{y(high)}" width="{2 * half:.2f}" '
            f'height="{max(y(low) - y(high), 0.5):.2f}" fill="#f97316" fill-opacity="0.6">'
            f"<title>next bar: predicted {low:.4g}..{high:.4g}</title></rect>"
        )
    parts.append(_axis_labels(bars, y, lo, hi))
    return "".join(parts)


def _axis_labels(bars: Sequence[Mapping[str, Any]], y: Any, lo: float, hi: float) -> str:
    """The lowest and highest price on the y axis, the first and last date below; closes the svg."""
    first, last = str(bars[0]["Date"]), str(bars[-1]["Date"])
    return (
        "".join(
            f'<text x="4" y="{y(value) + 4}" font-size="11" fill="#666">{value:.4g}</text>'
            for value in (lo, hi)
        )
        + f'<text x="{PAD}" y="{HEIGHT - 8}" font-size="11" fill="#666">{escape(first)}</text>'
        f'<text x="{WIDTH - PAD}" y="{HEIGHT - 8}" font-size="11" fill="#666" '
        f'text-anchor="end">{escape(last)}</text></svg>'
    )


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
