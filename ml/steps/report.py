"""The run report: one row per ticker (done, skipped, or failed at which step and why), as JSON
and as a plain-text table."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.config import Settings

if TYPE_CHECKING:
    pass


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


def summarize_tickers(
    tickers: Iterable[str],
    *,
    ingested: Mapping[str, Any] | None,
    validated: Mapping[str, Any] | None,
    trained: Iterable[Mapping[str, Any] | None] = (),
    train_errors: Iterable[Mapping[str, Any] | None] = (),
    promoted: Mapping[str, Any] | None = None,
    forecasted: Mapping[str, Any] | None = None,
    step_errors: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One row per ticker from what the steps returned: done, skipped (no new data) or failed.

    A step whose whole task failed returned nothing (None): its tickers are failed at that step,
    with its error from `step_errors` (step -> error) when the caller caught it (`python -m ml
    run`; the DAG's report points at the task's log).
    """
    trained_by = {t["ticker"]: t for t in trained or () if t}
    errors_by = {e["ticker"]: e["error"] for e in train_errors or () if e}
    ingested = ingested or {}
    summaries = (validated or {}).get("tickers") or {}
    to_train = set((validated or {}).get("train") or ())
    decisions = (promoted or {}).get("decisions") or {}
    forecasts = (forecasted or {}).get("forecasts") or {}
    rows = []
    for ticker in tickers:
        row: dict[str, Any] = {"ticker": ticker, "state": "done"}
        failure = _failure(
            ticker,
            ingested,
            validated,
            to_train,
            trained_by,
            errors_by,
            promoted,
            forecasted,
            step_errors or {},
        )
        if failure:
            row.update(state="failed", failed_step=failure[0], error=failure[1])
        summary = summaries.get(ticker) or {}
        outcome = trained_by.get(ticker) or {}
        forecast = forecasts.get(ticker) or {}
        if not failure and ticker not in to_train:
            row["state"] = "skipped"
        row["rows_added"] = summary.get("rows_added", "-")
        row["validation"] = (
            "failed" if row.get("failed_step") == "validate" else (summary.get("validation", "-"))
        )
        row["u2"] = outcome.get("metrics") or summary.get("metrics") or {}
        watched = ((forecasted or {}).get("monitor") or {}).get(ticker) or {}
        if watched:
            row["live"] = watched.get("live")
            row["drifted"] = watched.get("drifted")
            row["retrain_next_run"] = watched.get("retrain_reason")
        if summary.get("train_reason"):
            row["train_reason"] = summary["train_reason"]
        if summary.get("revision"):  # a corporate action or a vendor correction, healed
            row["data_event"] = summary["revision"]
        row["u2_range_naive"] = (
            outcome.get("metrics_range_naive") or summary.get("metrics_range_naive") or {}
        )
        row["intervals"] = outcome.get("intervals") or summary.get("intervals") or {}
        row["training"] = _training_text(outcome, summary)
        row.update(_promotion(ticker, decisions.get(ticker) or {}, forecast, forecasted))
        kind = ((forecasted or {}).get("kinds") or {}).get(ticker)
        if kind:
            row["champion_kind"] = kind
        if forecast:
            row["forecast_close"] = forecast.get("pred_close")
            row["forecast_high"] = forecast.get("pred_high")
            row["forecast_low"] = forecast.get("pred_low")
            row["forecast_version"] = forecast.get("model_version")
            if forecast.get("pred_close_q05") is not None:
                row["forecast_close_90"] = [forecast["pred_close_q05"], forecast["pred_close_q95"]]
        rows.append(row)
    return rows


def _training_text(outcome: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
    """What training did for a ticker: the version it registered, or the one that covers its bars."""
    if outcome.get("status"):
        return f"{outcome['status']} v{outcome['version']}"
    if summary.get("version"):
        return f"not retrained: v{summary['version']} covers these bars"
    return "-"


def _promotion(
    ticker: str,
    decision: Mapping[str, Any],
    forecast: Mapping[str, Any],
    forecasted: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The promotion columns of a ticker's row: the gate's decision, or the champion it kept."""
    if decision:
        if decision.get("fallback"):  # the range-aware naive registered as the first champion
            text = f"naive v{decision['champion_version']} (fallback)"
        elif decision.get("promoted"):
            text = f"promoted v{decision.get('version')}"
        elif decision.get("champion_version"):
            text = f"kept v{decision['champion_version']}"
        else:
            text = "none"
        return {"promotion": text, "promotion_reason": decision.get("reason")}
    if forecast:
        return {
            "promotion": f"kept v{forecast.get('model_version')}",
            "promotion_reason": "no new candidate; champion kept",
        }
    if forecasted is not None and ticker in (forecasted.get("no_champion") or ()):
        return {"promotion": "none", "promotion_reason": "no champion yet"}
    return {}


def _failure(
    ticker: str,
    ingested: Mapping[str, Any],
    validated: Mapping[str, Any] | None,
    to_train: set[str],
    trained_by: Mapping[str, Any],
    errors_by: Mapping[str, str],
    promoted: Mapping[str, Any] | None,
    forecasted: Mapping[str, Any] | None,
    step_errors: Mapping[str, str],
) -> tuple[str, str] | None:
    """(step, error) for the first step at which `ticker` failed, or None."""

    def whole(step: str) -> tuple[str, str]:  # the step failed as a whole, returned nothing
        return step, step_errors.get(step) or f"the {step} task failed: see its log"

    if not ingested:
        return whole("ingest")
    if ticker in (ingested.get("failed") or {}):
        return "ingest", ingested["failed"][ticker]
    if validated is None:
        return whole("validate")
    if ticker in (validated.get("failed") or {}):
        return "validate", validated["failed"][ticker]
    if ticker in to_train and ticker not in trained_by:
        return "train", errors_by.get(ticker, "the train task did not finish: see its log")
    if promoted is None and ticker in trained_by:
        return whole("promote")
    if ticker in ((promoted or {}).get("failed") or {}):
        return "promote", promoted["failed"][ticker]
    if forecasted is None:
        return whole("forecast")
    if ticker in (forecasted.get("failed") or {}):
        return "forecast", forecasted["failed"][ticker]
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
