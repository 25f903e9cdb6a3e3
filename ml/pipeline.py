"""The steps of one daily run for one ticker, as plain functions returning small dicts.

The Airflow DAG and the command line both call these, so the same code runs in both; each step
takes the ticker (validated here), the logical date and the settings, and returns something small
enough for XCom.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

from ml.config import Settings
from ml.universe import Instrument, load_universe


def instrument_for(ticker: str, settings: Settings) -> Instrument:
    return load_universe(settings.universe_file).get(ticker)


def ingest_step(ticker: str, as_of: date, settings: Settings) -> dict[str, Any]:
    """Fetch the due bars into staging."""
    from dataclasses import asdict

    from ml.ingest import stage_ticker

    return asdict(stage_ticker(instrument_for(ticker, settings), as_of, settings))


def publish_step(ticker: str, as_of: date, settings: Settings) -> dict[str, Any]:
    """Validate the staged batch and publish it (raises PriceValidationError and quarantines)."""
    from ml.ingest import publish_staged

    return publish_staged(instrument_for(ticker, settings), as_of, settings)


def up_to_date(ticker: str, as_of: date, settings: Settings) -> dict[str, Any] | None:
    """What train, promote and forecast already did for exactly the bars published up to `as_of`.

    A ticker is up to date when a registered version was trained on exactly these bars (<= as_of)
    with the same model config, that version has been through the gate, and the forecasts table
    holds the forecast of the bar after the last one by the champion as of `as_of` (or there is
    no champion). Running the three steps again would then change nothing, so the DAG skips them:
    a no-new-data day costs the fetch and validation only. None when any of that is missing, for
    instance a version registered by a run that died before its gate or its forecast: then the
    steps run and finish the job.
    """
    from ml.forecasting import read_forecasts
    from ml.registry import champion_as_of, get_client, outcome_of, trained_version
    from ml.store import PriceStore, data_fingerprint

    instrument = instrument_for(ticker, settings)
    history = PriceStore(settings.data_dir).load(instrument, until=as_of)
    if history.empty:
        return None
    client = get_client(settings)
    version = trained_version(
        client, instrument, data_fingerprint(history), settings.model.fingerprint()
    )
    if version is None or version.tags.get("gate_status") not in ("promoted", "rejected"):
        return None
    champion = champion_as_of(client, instrument.model_name, as_of)
    forecast: dict[str, Any] | None = None
    if champion is not None:
        table = read_forecasts(settings)
        last_bar = history["Date"].iloc[-1].date().isoformat()
        rows = table.loc[
            (table["ticker"] == ticker)
            & (table["last_bar_date"] == last_bar)
            & (table["model_version"] == str(champion.version))
            & (table["logical_date"] <= as_of.isoformat())
        ]
        if rows.empty:
            return None
        forecast = {k: _plain(v) for k, v in rows.iloc[-1].to_dict().items()}
    outcome = outcome_of(instrument, as_of, version)
    return {
        "status": outcome.status,
        "version": str(outcome.version),
        "trained_for": version.tags.get("logical_date"),
        "gate_status": version.tags.get("gate_status"),
        "metrics": outcome.metrics,
        "champion_version": str(champion.version) if champion else None,
        "forecast": forecast,
        "reason": f"{outcome.reason}: train, promote and forecast skipped",
    }


def _plain(value: Any) -> Any:
    """A JSON-friendly Python scalar from a pandas/numpy one."""
    return value.item() if hasattr(value, "item") else value


def publish_and_check(
    ticker: str, as_of: date, settings: Settings, *, force: bool = False
) -> dict[str, Any]:
    """`publish_step`, plus `up_to_date` when the publish changed nothing (and not `force`).

    The check only saves work: if it cannot be made (the tracking server is unreachable), the
    result says so and the downstream steps run as usual. It never fails a publish that happened,
    whose staged batch is gone (a retry of this step could not publish again).
    """
    import logging

    result = publish_step(ticker, as_of, settings)
    if force or result["rows_added"] or result["rows_updated"]:
        return result
    try:
        result["up_to_date"] = up_to_date(ticker, as_of, settings)
    except Exception as exc:  # an optimisation must not fail the publish
        logging.getLogger(__name__).warning(
            "%s: could not check whether the ticker is up to date (%s: %s); training runs",
            ticker,
            type(exc).__name__,
            exc,
        )
        result["up_to_date"] = None
    return result


def train_step(
    ticker: str, as_of: date, settings: Settings, *, force: bool = False
) -> dict[str, Any]:
    """Train and register a candidate, unless a version already covers exactly these bars."""
    from ml.registry import existing_outcome, log_candidate
    from ml.store import PriceStore, data_fingerprint
    from ml.training import train_on_history

    instrument = instrument_for(ticker, settings)
    store = PriceStore(settings.data_dir)
    history = store.load(instrument, until=as_of)
    if history.empty:
        raise ValueError(f"{ticker}: no published bars up to {as_of}; ingest first")
    data_fp = data_fingerprint(history)
    if not force:
        existing = existing_outcome(
            instrument, as_of, data_fp, settings.model.fingerprint(), settings
        )
        if existing is not None:
            return existing.to_dict()
    result = train_on_history(ticker, as_of, history, settings.model)
    report = store.report_path(instrument, as_of)
    outcome = log_candidate(result, instrument, settings, validation_report=report)
    out = outcome.to_dict()
    out["candidates"] = {
        c.kind: {
            "best_val_loss": c.best_val_loss,
            "best_epoch": c.best_epoch,
            "epochs": c.epochs_run,
        }
        for c in result.candidates
    }
    out["chosen_kind"] = result.forecaster.kind
    return out


def promote_step(
    ticker: str, as_of: date, trained: dict[str, Any], settings: Settings
) -> dict[str, Any]:
    """Run the gate for a newly trained version; a skipped ticker keeps its champion."""
    from ml.registry import champion_as_of, get_client, promote_if_better

    instrument = instrument_for(ticker, settings)
    if trained.get("status") == "skipped" or not trained.get("version"):
        champion = champion_as_of(get_client(settings), instrument.model_name, as_of)
        return {
            "ticker": ticker,
            "promoted": False,
            "reason": f"not retrained ({trained.get('reason', 'no new data')}); champion kept",
            "champion_version": champion.version if champion else None,
        }
    decision = promote_if_better(instrument, as_of, str(trained["version"]), settings)
    return decision.to_dict()


def forecast_step(ticker: str, as_of: date, settings: Settings) -> dict[str, Any] | None:
    """Forecast the next bar with the champion and upsert it into the forecasts table."""
    from ml.forecasting import forecast_ticker

    return forecast_ticker(instrument_for(ticker, settings), as_of, settings)


def settings_with_overrides(
    settings: Settings, *, kinds: list[str] | None = None, max_epochs: int | None = None
) -> Settings:
    changes: dict[str, Any] = {}
    if kinds:
        from ml.config import _parse_kinds

        changes["kinds"] = _parse_kinds(",".join(kinds))
    if max_epochs:
        changes["max_epochs"] = int(max_epochs)
    return replace(settings, model=replace(settings.model, **changes)) if changes else settings


def report_path(settings: Settings, as_of: date) -> Path:
    return settings.data_dir / "reports" / f"{as_of.isoformat()}.json"


def write_run_report(
    settings: Settings, as_of: date, rows: list[dict[str, Any]], run_id: str = ""
) -> Path:
    """Write the run summary (one row per ticker) as JSON, atomically."""
    from ml.store import atomic_write_text

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


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the run summary for logs and the terminal."""
    headers = [
        "ticker",
        "state",
        "rows",
        "validation",
        "U2 H/L/C",
        "model",
        "champion",
        "next close",
    ]
    lines = []
    for r in rows:
        u2 = r.get("u2") or {}
        u2_text = "/".join(f"{u2[t]:.3f}" for t in ("High", "Low", "Close") if t in u2) or "-"
        close = r.get("forecast_close")
        lines.append(
            [
                r["ticker"],
                r.get("state", "?"),
                str(r.get("rows_added", "-")),
                str(r.get("validation", "-")),
                u2_text,
                str(r.get("training", "-")),
                str(r.get("promotion", "-")),
                f"{close:.4f}" if isinstance(close, float) else "-",
            ]
        )
    widths = [
        max(len(h), *(len(row[i]) for row in lines)) if lines else len(h)
        for i, h in enumerate(headers)
    ]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
        + [fmt.format(*row) for row in lines]
    )


# --- per-run step records: what each ticker's steps did, for the run report ----------------------

STEPS = ("ingest", "publish", "train", "promote", "forecast")


def _run_file(settings: Settings, run_key: str, ticker: str) -> Path:
    import re

    from ml.universe import ticker_slug

    safe_run = re.sub(r"[^A-Za-z0-9_.-]", "_", run_key)[:200]
    return settings.data_dir / "runs" / safe_run / f"{ticker_slug(ticker)}.json"


def record_step(
    settings: Settings,
    run_key: str,
    ticker: str,
    step: str,
    *,
    result: Any = None,
    error: str | None = None,
) -> None:
    """Record one step's result or error for `ticker` in this run (atomic read-modify-write)."""
    from ml.store import PriceStore, atomic_write_text

    path = _run_file(settings, run_key, ticker)
    with PriceStore(settings.data_dir).lock(f"run-{path.parent.name}-{path.stem}"):
        record = json.loads(path.read_text()) if path.exists() else {"ticker": ticker, "steps": {}}
        record["steps"][step] = (
            {"status": "failed", "error": error}
            if error is not None
            else {"status": "ok", "result": result}
        )
        atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True, default=str))


def run_recorded(
    step: str, ticker: str, run_key: str, settings: Settings, fn: Any, *args: Any, **kwargs: Any
) -> Any:
    """Call `fn`, recording its result or its error (then re-raising) for the run report."""
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:
        record_step(settings, run_key, ticker, step, error=f"{type(exc).__name__}: {exc}")
        raise
    record_step(settings, run_key, ticker, step, result=result)
    return result


def summarize_ticker(ticker: str, record: dict[str, Any] | None) -> dict[str, Any]:
    """One summary row from a ticker's step records (a missing step means it never ran).

    When publish found the ticker up to date (`publish_and_check`), the DAG skipped train, promote
    and forecast; the row then shows what is already there: the version trained on these bars,
    the champion kept and its forecast.
    """
    steps = dict((record or {}).get("steps", {}))
    publish = (steps.get("publish") or {}).get("result") or {}
    current = publish.get("up_to_date")
    if current:
        kept = {"promoted": False, "champion_version": current["champion_version"]}
        steps.setdefault("train", {"status": "ok", "result": current})
        steps.setdefault("promote", {"status": "ok", "result": kept})
        steps.setdefault("forecast", {"status": "ok", "result": current.get("forecast")})
    row: dict[str, Any] = {"ticker": ticker, "state": "success"}
    if current:
        row["up_to_date"] = True
    for step in STEPS:
        info = steps.get(step)
        if info is None:
            row["state"] = "failed"
            row.setdefault("failed_step", step)
            row.setdefault("error", "did not run (an upstream step failed)")
            break
        if info["status"] == "failed":
            row.update(state="failed", failed_step=step, error=info["error"])
            break
    train = (steps.get("train") or {}).get("result") or {}
    promote = (steps.get("promote") or {}).get("result") or {}
    forecast = (steps.get("forecast") or {}).get("result") or {}
    row["rows_added"] = publish.get("rows_added", "-")
    row["validation"] = publish.get("validation", (steps.get("publish") or {}).get("status", "-"))
    if row.get("failed_step") == "publish":
        row["validation"] = "failed"
    row["u2"] = train.get("metrics") or {}
    row["training"] = f"{train['status']} v{train['version']}" if train.get("status") else "-"
    if promote:
        row["promotion"] = (
            f"promoted v{promote.get('version')}"
            if promote.get("promoted")
            else f"kept v{promote.get('champion_version')}"
            if promote.get("champion_version")
            else "none"
        )
        row["promotion_reason"] = promote.get("reason") or (current or {}).get("reason")
    if forecast:
        row["forecast_close"] = forecast.get("pred_close")
        row["forecast_high"] = forecast.get("pred_high")
        row["forecast_low"] = forecast.get("pred_low")
        row["forecast_version"] = forecast.get("model_version")
    return row


def summarize_run(
    settings: Settings, run_key: str, tickers: list[str], as_of: date
) -> tuple[list[dict[str, Any]], Path]:
    """Collect every ticker's records into the run report; returns the rows and the report path."""
    rows = []
    for ticker in tickers:
        path = _run_file(settings, run_key, ticker)
        rows.append(
            summarize_ticker(ticker, json.loads(path.read_text()) if path.exists() else None)
        )
    return rows, write_run_report(settings, as_of, rows, run_key)
