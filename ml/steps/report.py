"""The run report: one row per ticker (done, skipped, or failed at which step and why), as JSON
and as a plain-text table."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.config import Settings
from ml.steps.records import to_plain

if TYPE_CHECKING:
    from ml.registry.gate import PromotionDecision
    from ml.steps.records import (
        Coverage,
        DayResults,
        Forecasted,
        ForecastRecord,
        TrainOrder,
        TrainOutcome,
    )


def report_path(settings: Settings, as_of: date) -> Path:
    return settings.data_dir / "reports" / f"{as_of.isoformat()}.json"


def write_run_report(
    settings: Settings, as_of: date, rows: list[dict[str, Any]], run_id: str = ""
) -> Path:
    """Write the run summary (one row per ticker) as JSON, atomically."""
    from ml.data.store import atomic_write_text

    path = report_path(settings, as_of)
    payload = {
        "logical_date": as_of.isoformat(),
        "run_id": run_id,
        "price_source": settings.price_source,
        "tickers": rows,
        "failed": sorted(r["ticker"] for r in rows if r.get("state") == "failed"),
    }
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str))
    return path


def summarize_day(day: DayResults) -> list[dict[str, Any]]:
    """One row per ticker of the day, read off the stages' results: done, skipped (no new
    data) or failed, at which stage and why.

    A stage that failed as a whole returned nothing (None): its tickers are failed at that
    stage, with its error from `day.step_errors` when the caller caught it (`python -m ml run`;
    the DAG's report points at the task's log).
    """
    trained_by = {o.ticker: o for o in (day.trained.outcomes if day.trained else ())}
    orders = {o.ticker: o for o in day.orders or ()}
    forecasts = day.forecasted.forecasts if day.forecasted else {}
    rows = []
    for ticker in day.request.tickers:
        row: dict[str, Any] = {"ticker": ticker, "state": "done"}
        failure = _failure(ticker, day, orders, trained_by)
        if failure:
            row.update(state="failed", failed_step=failure[0], error=failure[1])
        publication = day.published.tickers.get(ticker) if day.published else None
        coverage = (day.registered.versions.get(ticker) if day.registered else None) or None
        outcome = trained_by.get(ticker)
        forecast = forecasts.get(ticker)
        if not failure and ticker not in orders:
            row["state"] = "skipped"
        row["rows_added"] = publication.rows_added if publication else "-"
        row["validation"] = (
            "failed"
            if row.get("failed_step") == "validate_and_publish"
            else (publication.validation if publication else "-")
        )
        version = outcome or coverage
        row["u2"] = dict(version.metrics) if version else {}
        watched = day.forecasted.monitor.get(ticker) if day.forecasted else None
        if watched:
            row.update(
                live=dict(watched.live),
                drifted=watched.drifted,
                retrain_next_run=watched.retrain_reason,
            )
        if ticker in orders:
            row["train_reason"] = orders[ticker].reason
        if publication and publication.revision:  # a corporate action or a correction, healed
            row["data_event"] = publication.revision
        row["u2_range_naive"] = dict(version.metrics_range_naive) if version else {}
        row["intervals"] = to_plain(version.intervals) if version and version.intervals else {}
        row["training"] = _training_text(outcome, coverage)
        decision = day.promoted.decisions.get(ticker) if day.promoted else None
        row.update(_promotion(ticker, decision, forecast, day.forecasted))
        kind = day.forecasted.kinds.get(ticker) if day.forecasted else None
        if kind:
            row["champion_kind"] = kind
        if forecast:
            row.update(_forecast_columns(forecast))
        rows.append(row)
    return rows


def _forecast_columns(forecast: ForecastRecord) -> dict[str, Any]:
    out = {
        "forecast_close": forecast.pred_close,
        "forecast_high": forecast.pred_high,
        "forecast_low": forecast.pred_low,
        "forecast_version": forecast.model_version,
    }
    low, high = forecast.quantiles.get("pred_close_q05"), forecast.quantiles.get("pred_close_q95")
    if low is not None and high is not None:
        out["forecast_close_90"] = [low, high]
    return out


def _training_text(outcome: TrainOutcome | None, coverage: Coverage | None) -> str:
    """What training did for a ticker: the version it registered, or the one that covers its bars."""
    if outcome is not None:
        return f"{outcome.status} v{outcome.version}"
    if coverage is not None:
        return f"not retrained: v{coverage.version} covers these bars"
    return "-"


def _promotion(
    ticker: str,
    decision: PromotionDecision | None,
    forecast: ForecastRecord | None,
    forecasted: Forecasted | None,
) -> dict[str, Any]:
    """The promotion columns of a ticker's row: the gate's decision, or the champion it kept."""
    if decision is not None:
        if decision.fallback:  # the range-aware naive registered as the first champion
            text = f"naive v{decision.champion_version} (fallback)"
        elif decision.promoted:
            text = f"promoted v{decision.version}"
        elif decision.champion_version:
            text = f"kept v{decision.champion_version}"
        else:
            text = "none"
        return {"promotion": text, "promotion_reason": decision.reason}
    if forecast is not None:
        return {
            "promotion": f"kept v{forecast.model_version}",
            "promotion_reason": "no new candidate; champion kept",
        }
    if forecasted is not None and ticker in forecasted.no_champion:
        return {"promotion": "none", "promotion_reason": "no champion yet"}
    return {}


def _failure(
    ticker: str,
    day: DayResults,
    orders: Mapping[str, TrainOrder],
    trained_by: Mapping[str, TrainOutcome],
) -> tuple[str, str] | None:
    """(stage, error) for the first stage at which `ticker` failed, or None."""

    def whole(stage: str) -> tuple[str, str]:  # the stage failed as a whole, returned nothing
        return stage, day.step_errors.get(stage) or f"the {stage} task failed: see its log"

    if day.ingested is None:
        return whole("ingest")
    if ticker in day.ingested.failed:
        return "ingest", day.ingested.failed[ticker]
    if day.published is None:
        return whole("validate_and_publish")
    if ticker in day.published.failed:
        return "validate_and_publish", day.published.failed[ticker]
    if day.orders is None and ticker in day.published.tickers:
        return whole("find_versions" if day.registered is None else "plan_training")
    if ticker in orders and ticker not in trained_by:
        errors = day.trained.errors if day.trained else {}
        return "train", errors.get(ticker, "the train task did not finish: see its log")
    if day.promoted is None and ticker in trained_by:
        return whole("promote")
    if day.promoted is not None and ticker in day.promoted.failed:
        return "promote", day.promoted.failed[ticker]
    if day.forecasted is None:
        return whole("forecast")
    if ticker in day.forecasted.failed:
        return "forecast", day.forecasted.failed[ticker]
    return None


def _interval_text(intervals: Mapping[str, Any]) -> str:
    """Close 90 % coverage on the test block and the interval score over historical
    simulation's, e.g. "0.904 / 0.931"; "-" for a model without quantiles."""
    coverage = (intervals.get("coverage") or {}).get("close_90")
    ratio = intervals.get("interval_score_close_90_vs_historical")
    if coverage is None or ratio is None:
        return "-"
    return f"{coverage:.3f} / {ratio:.3f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the run summary for logs and the terminal."""
    headers = [
        "ticker",
        "state",
        "rows",
        "validation",
        "U2 H/L/C",
        "vs naive H/L",
        "cov90 / IS vs HS",
        "live U2 H/L (n)",
        "model",
        "champion",
        "kind",
        "next close",
    ]
    lines = []
    for r in rows:
        u2 = r.get("u2") or {}
        u2_text = "/".join(f"{u2[t]:.3f}" for t in ("High", "Low", "Close") if t in u2) or "-"
        naive = r.get("u2_range_naive") or {}
        naive_text = "/".join(f"{naive[t]:.3f}" for t in ("High", "Low") if t in naive) or "-"
        live = r.get("live") or {}
        live_text = (
            f"{live['u2_high']:.3f}/{live['u2_low']:.3f} ({live['n']})"
            if live.get("u2_high") is not None and live.get("u2_low") is not None
            else "-"
        )
        close = r.get("forecast_close")
        interval = r.get("forecast_close_90") or ()
        close_text = f"{close:.4f}" if isinstance(close, float) else "-"
        if len(interval) == 2 and None not in interval:
            close_text += f" (90 %: {interval[0]:.4f}-{interval[1]:.4f})"
        lines.append(
            [
                r["ticker"],
                r.get("state", "?"),
                str(r.get("rows_added", "-")),
                str(r.get("validation", "-")),
                u2_text,
                naive_text,
                _interval_text(r.get("intervals") or {}),
                live_text,
                str(r.get("training", "-")),
                str(r.get("promotion", "-")),
                str(r.get("champion_kind", "-")),
                close_text,
            ]
        )
    widths = [
        max(len(h), *(len(row[i]) for row in lines)) if lines else len(h)
        for i, h in enumerate(headers)
    ]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    events = [f"{r['ticker']}: {r['data_event']}" for r in rows if r.get("data_event")]
    return "\n".join(
        [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
        + [fmt.format(*row) for row in lines]
        + (["", "data events:", *(f"  {e}" for e in events)] if events else [])
    )
