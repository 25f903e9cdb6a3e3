"""The quantile forecasts of issue 29 as the dashboard reads them: the fields of a forecast record,
and whether each past forecast's intervals held on the bar it was made for.

Every field is nullable and may be missing altogether: a model saved before quantile forecasts
answers its points only (its quantiles are None/NaN/empty), and a ledger or CSV export written
before the quantile fields existed has no such columns. Both read as "no intervals", never as an
error.

Whether an interval held is computed here from the forecast's own quantiles and the published
bars the ticker page already reads, not from the ledger's `outcomes` table: the page then needs
no outcome column that older ledgers lack, and the count is the same rule for every forecast
(Close inside [q05, q95] for 90 %, [q10, q90] for 80 %; the High at or below its q90, the Low at or
above its q10). Standard library only: the plugin's modules are imported by every Airflow task.
"""

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# The field names of the ledger's `forecasts` table and of the CSV export (ml.forecasts.export).
QUANTILE_COLUMNS = (
    "pred_close_q05",
    "pred_close_q10",
    "pred_close_q50",
    "pred_close_q90",
    "pred_close_q95",
    "pred_high_q90",
    "pred_high_q95",
    "pred_low_q10",
    "pred_low_q05",
)
# The Close quantiles that bound the 90 % (q05..q95) and the 80 % (q10..q90) central intervals.
CLOSE_INTERVAL = ("pred_close_q05", "pred_close_q10", "pred_close_q90", "pred_close_q95")
# coverage() keys: (what held, its label on the page, the nominal probability)
CHECKS = (
    ("close_90", "Close 90 % interval held", 0.90),
    ("close_80", "Close 80 % interval held", 0.80),
    ("high_q90", "High stayed at or below High q90", 0.90),
    ("low_q10", "Low stayed at or above Low q10", 0.90),
)


def number(value: Any) -> float | None:
    """`value` as a finite float, else None (None, NaN, '', text)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def quantile(record: Mapping[str, Any], column: str) -> float | None:
    """The finite float of `record[column]`, else None (a missing column too)."""
    return number(record.get(column))


def close_interval(record: Mapping[str, Any], factor: float = 1.0) -> tuple[float, ...] | None:
    """(q05, q10, q90, q95) of Close times `factor`, or None when any of the four is missing:
    a model forecasts all of its quantiles or none, so a partial set is not shown as half a band."""
    values = [quantile(record, c) for c in CLOSE_INTERVAL]
    if any(v is None for v in values):
        return None
    return tuple(v * factor for v in values)  # type: ignore[operator]


def published_forecasts(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One forecast per bar (`last_bar_date`), oldest first: the ledger keeps one per model
    version, and a bar forecast again (a re-run after a promotion) counts once, as the one of the
    latest logical date and then the highest version, the one the export and the page show."""

    def order(record: Mapping[str, Any]) -> tuple[str, int]:
        version = str(record.get("model_version") or "")
        return str(record.get("logical_date") or ""), int(version) if version.isdigit() else -1

    latest: dict[str, Mapping[str, Any]] = {}
    for record in sorted(records, key=order):
        latest[str(record.get("last_bar_date"))] = record
    return [latest[d] for d in sorted(latest)]


def published_units(record: Mapping[str, Any], published_close: float) -> float:
    """The factor that brings the forecast into the published units of its bars: a split or a
    dividend re-adjusts the published history after a forecast was made (the ledger's
    `ml.forecasts.monitor.forecast_units` does the inverse); 1.0 when nothing was re-adjusted."""
    then = quantile(record, "last_close")
    if then is None or then <= 0 or not math.isfinite(published_close) or published_close <= 0:
        return 1.0
    return published_close / then


def interval_outcomes(
    records: Iterable[Mapping[str, Any]], bars: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Each past forecast whose bar is published, with its quantiles in published units and
    whether each of them held (None where the forecast has no such quantile).

    `records`: ledger forecast rows (last_bar_date, logical_date, model_version, last_close and
    the quantile fields, any of them missing or null). `bars`: published bars, oldest first, as
    dicts with Date (YYYY-MM-DD), High, Low, Close. A forecast's bar is the one after its
    `last_bar_date` in `bars`; a forecast whose last bar is not there, or is the newest, is not
    scored yet."""
    position = {str(b["Date"]): i for i, b in enumerate(bars)}
    outcomes = []
    for record in published_forecasts(records):
        i = position.get(str(record.get("last_bar_date")))
        if i is None or i + 1 >= len(bars):
            continue
        bar = bars[i + 1]
        factor = published_units(record, float(bars[i]["Close"]))
        close, high, low = (float(bar[k]) for k in ("Close", "High", "Low"))
        interval = close_interval(record, factor)
        high_q90, low_q10 = (quantile(record, c) for c in ("pred_high_q90", "pred_low_q10"))
        outcomes.append(
            {
                "target_date": str(bar["Date"]),
                "model_version": record.get("model_version"),
                "close": close,
                "interval": interval,
                "close_90": None if interval is None else interval[0] <= close <= interval[3],
                "close_80": None if interval is None else interval[1] <= close <= interval[2],
                "high_q90": None if high_q90 is None else high <= high_q90 * factor,
                "low_q10": None if low_q10 is None else low >= low_q10 * factor,
            }
        )
    return outcomes


def coverage(outcomes: Iterable[Mapping[str, Any]]) -> dict[str, tuple[int, int]]:
    """(held, scored) per check of CHECKS; a forecast without that quantile is not scored."""
    counts = {key: [0, 0] for key, _, _ in CHECKS}
    for outcome in outcomes:
        for key, count in counts.items():
            held = outcome.get(key)
            if held is not None:
                count[0] += bool(held)
                count[1] += 1
    return {key: (held, n) for key, (held, n) in counts.items()}
