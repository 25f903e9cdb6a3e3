"""The probabilistic figures of the bench reports: a block's `ml.model.probabilistic.IntervalReport`
as plain JSON (`summarize`), the real-data report's table per ticker and block (`table_lines`),
the issue's done-when lines over the rolling origins (`done_when_lines`) and the synthetic
universe's pooled figures (`pooled`).

The done-when asks the 90 % coverage of Close, High's q0.90 and Low's q0.10 to lie within
[0.87, 0.93] on every origin. An exactly calibrated 90 % interval scored on n independent bars
has Binomial(n, 0.9) hits, so it falls outside [0.87, 0.93] with a probability that is far from
zero at n = 160 (`outside_probability`); the binomial 99 % band of the block's size
(`IntervalReport.band`) is what calibration alone can promise.
"""

from __future__ import annotations

import math
from typing import Any

# The done-when's checks: coverage name (`ml.model.probabilistic.NOMINAL`) -> label.
CHECKS = {"close_90": "Close 90 %", "high_q90": "High q90", "low_q10": "Low q10"}
COVERAGES = ("close_80", "close_90", "high_q90", "high_q95", "low_q10", "low_q05")
TARGET_RANGE = (0.87, 0.93)
INTERVAL_TARGET = 0.95  # Close's 90 % interval score / historical simulation's, mean of origins
TAIL_TARGET = 0.94  # pinball of High q90 + Low q10 / historical simulation's, mean of origins


def _clean(value: float) -> float | None:
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


def summarize(report: Any) -> dict[str, Any] | None:
    """An IntervalReport (or None) as the JSON the reports read."""
    if report is None:
        return None
    baselines = tuple(report.baselines)
    return {
        "n": report.n,
        "band": [_clean(v) for v in report.band],
        "coverage": {k: _clean(report.coverage[k]) for k in COVERAGES},
        "baseline_coverage": {
            b: {k: _clean(report.baselines[b]["coverage"][k]) for k in COVERAGES} for b in baselines
        },
        "interval_score_close_90": _clean(report.interval_score["close_90"]),
        "interval_ratio": {
            b: _clean(report.ratio("interval_score", "close_90", b)) for b in baselines
        },
        "tail_ratio": {b: _clean(report.tail_ratio(b)) for b in baselines},
        "dm_historical": {k: _clean(v) for k, v in report.dm_historical.items()},
    }


def inside_count_range(n: int, low: float = TARGET_RANGE[0], high: float = TARGET_RANGE[1]):
    """The hit counts k of n bars whose share k / n lies within [low, high]: (first, last)."""
    return math.ceil(low * n - 1e-9), math.floor(high * n + 1e-9)


def outside_probability(
    n: int, p: float = 0.90, bounds: tuple[float, float] = TARGET_RANGE
) -> float:
    """P(share of hits outside `bounds`) for an exactly calibrated level-p interval on n
    independent bars: Binomial(n, p)."""
    from scipy.stats import binom

    first, last = inside_count_range(n, *bounds)
    return float(1.0 - (binom.cdf(last, n, p) - binom.cdf(first - 1, n, p)))


def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _blocks(res: dict) -> list[tuple[str, dict]]:
    rows = [("default block", res["default_block"])]
    return rows + [(f"origin {i + 1}", o) for i, o in enumerate(res["origins"])]


def table_lines(per_ticker: dict[str, dict]) -> list[str]:
    """The probabilistic table: one row per ticker and block whose `score` row has `intervals`."""
    lines = [
        "| ticker | block | selected | test bars | coverage Close 80 % / 90 % | High q90 / q95 "
        "| Low q10 / q05 | historical sim.: Close 80 / 90, High q90 / q95, Low q10 / q05 "
        "| Gaussian: Close 90, High q90, Low q10 | binomial 99 % band of 90 % "
        "| interval score Close 90 % / historical / Gaussian "
        "| pinball High q90 + Low q10 / historical / Gaussian "
        "| DM p: interval score worse / better than historical |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ticker, res in per_ticker.items():
        origins = []
        for label, row in _blocks(res):
            s = row.get("intervals")
            if not s:
                continue
            if label.startswith("origin"):
                origins.append(s)
            c, h = s["coverage"], s["baseline_coverage"]["historical"]
            g = s["baseline_coverage"]["gaussian"]
            dm = s["dm_historical"]
            lines.append(
                f"| {ticker} | {label} | {row.get('kind', '')} | {s['n']} "
                f"| {_f(c['close_80'])} / {_f(c['close_90'])} "
                f"| {_f(c['high_q90'])} / {_f(c['high_q95'])} "
                f"| {_f(c['low_q10'])} / {_f(c['low_q05'])} "
                f"| {' / '.join(_f(h[k]) for k in COVERAGES)} "
                f"| {' / '.join(_f(g[k]) for k in CHECKS)} "
                f"| {_f(s['band'][0])}..{_f(s['band'][1])} "
                f"| {_f(s['interval_ratio']['historical'])} / {_f(s['interval_ratio']['gaussian'])} "
                f"| {_f(s['tail_ratio']['historical'])} / {_f(s['tail_ratio']['gaussian'])} "
                f"| {_f(dm.get('p_worse'))} / {_f(dm.get('p_better'))} |"
            )
        if origins:
            cov = {k: _f(_mean([s["coverage"][k] for s in origins])) for k in COVERAGES}
            ratio = {
                (k, b): _f(_mean([s[k][b] for s in origins]))
                for k in ("interval_ratio", "tail_ratio")
                for b in ("historical", "gaussian")
            }
            lines.append(
                f"| {ticker} | origins: mean | | {sum(s['n'] for s in origins)} "
                f"| {cov['close_80']} / {cov['close_90']} | {cov['high_q90']} / {cov['high_q95']} "
                f"| {cov['low_q10']} / {cov['low_q05']} | | | "
                f"| {ratio['interval_ratio', 'historical']} / {ratio['interval_ratio', 'gaussian']} "
                f"| {ratio['tail_ratio', 'historical']} / {ratio['tail_ratio', 'gaussian']} | |"
            )
    return lines


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def done_when_lines(per_ticker: dict[str, dict]) -> list[str]:
    """The issue's done-when figures over every ticker's rolling origins."""
    low, high = TARGET_RANGE
    checks, outside = [], []
    for ticker, res in per_ticker.items():
        for i, row in enumerate(res["origins"]):
            s = row.get("intervals")
            if not s:
                continue
            for key, label in CHECKS.items():
                value = s["coverage"][key]
                checks.append(s["n"])
                if value is None or not low - 1e-12 <= value <= high + 1e-12:
                    band = s["band"]
                    in_band = value is not None and band[0] <= value <= band[1]
                    outside.append(
                        f"{ticker} origin {i + 1} {label} {_f(value)} "
                        f"({'inside' if in_band else '**outside**'} its binomial 99 % band "
                        f"{_f(band[0])}..{_f(band[1])} for {s['n']} bars)"
                    )
    if not checks:
        return ["No probabilistic figures (the forecasters have no quantiles)."]
    sizes = sorted(set(checks))
    p_all = math.prod(1.0 - outside_probability(n) for n in checks)
    lines = [
        f"- **(a)** 90 % coverage of Close, High q0.90 and Low q0.10 within [{low}, {high}] on "
        f"every origin: {'yes' if not outside else 'no'} ({len(checks) - len(outside)} of "
        f"{len(checks)} checks inside)"
        + (": outside: " + "; ".join(outside) + "." if outside else "."),
        "- The ceiling of that check: an exactly calibrated 90 % interval on n independent bars "
        f"(Binomial(n, 0.9) hits) falls outside [{low}, {high}] with probability "
        + ", ".join(
            f"{outside_probability(n):.3f} at n = {n} (inside: {inside_count_range(n)[0]}.."
            f"{inside_count_range(n)[1]} hits)"
            for n in sizes
        )
        + f"; all {len(checks)} origin checks land inside with probability {p_all:.3f} "
        "(the product over the checks, as if independent: the three checks of an origin share "
        "its bars, so this is an approximation).",
    ]
    ratios = {
        key: [o["intervals"][key][b] for r in per_ticker.values() for o in r["origins"]
              if o.get("intervals")]
        for key, b in (("interval_ratio", "historical"), ("tail_ratio", "historical"))
    }  # fmt: skip
    for tag, key, label, target in (
        ("b", "interval_ratio", "interval score of Close's 90 % interval / historical "
         "simulation's", INTERVAL_TARGET),
        ("c", "tail_ratio", "pinball loss of High q0.90 + Low q0.10 / historical simulation's",
         TAIL_TARGET),
    ):  # fmt: skip
        values = [v for v in ratios[key] if v is not None]
        mean = _mean(values)
        verdict = "n/a" if mean is None else ("met" if mean <= target else "**missed**")
        lines.append(
            f"- **({tag})** {label}, mean over the {len(values)} origins of "
            f"{len(per_ticker)} tickers: {_f(mean)} (target <= {target}: {verdict}; "
            f"min {_f(min(values, default=None))}, max {_f(max(values, default=None))})."
        )
    return lines


def pooled(reports: list[Any]) -> dict[str, Any]:
    """Over many test blocks (IntervalReports, None skipped): pooled coverage of the done-when's
    checks (total hits / total bars) with the binomial 99 % band of the pooled size, the mean
    ratios against both baselines, and the blocks outside their own binomial 99 % band."""
    from ml.model.probabilistic import binomial_band

    reports = [r for r in reports if r is not None]
    total = sum(r.n for r in reports)
    out: dict[str, Any] = {"blocks": len(reports), "bars": total}
    if not reports:
        return out
    hits = {k: sum(round(r.coverage[k] * r.n) for r in reports) for k in CHECKS}
    out["pooled_coverage"] = {k: round(v / total, 6) for k, v in hits.items()}
    out["pooled_band"] = [round(v, 6) for v in binomial_band(total)]
    out["pooled_historical_coverage"] = {
        k: round(
            sum(round(r.baselines["historical"]["coverage"][k] * r.n) for r in reports) / total, 6
        )
        for k in CHECKS
    }
    for b in ("historical", "gaussian"):
        out[f"mean_interval_ratio_{b}"] = _clean(
            _mean([_clean(r.ratio("interval_score", "close_90", b)) for r in reports])
        )
        out[f"mean_tail_ratio_{b}"] = _clean(_mean([_clean(r.tail_ratio(b)) for r in reports]))
    out["outside_band"] = {
        k: sum(not r.band[0] <= r.coverage[k] <= r.band[1] for r in reports) for k in CHECKS
    }
    out["outside_band_any"] = sum(
        any(not r.band[0] <= r.coverage[k] <= r.band[1] for k in CHECKS) for r in reports
    )
    out["outside_target_range"] = {
        k: sum(not TARGET_RANGE[0] <= r.coverage[k] <= TARGET_RANGE[1] for r in reports)
        for k in CHECKS
    }
    return out
