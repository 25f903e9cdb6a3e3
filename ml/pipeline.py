"""The steps of one daily run, as plain functions returning small dicts (what XCom carries).

The DAG's tasks and the command line call the same functions, in this order:

    ingest_all  -> validate_all -> train_step (one per ticker that needs it)
                -> promote_all  -> forecast_all -> summarize_run

The data phase handles every ticker in one call: the downloads run concurrently (at most
`FETCH_CONCURRENCY` at once), validation and publishing one ticker after another. Training is the
one expensive per-ticker step. Promotion walks the new candidates one by one in one process, so
no two tasks of a run race on an alias; forecasting loads each champion once and writes every
forecast in one write. Every batch step returns its per-ticker results and a `failed` map
(ticker -> error); one ticker's failure never stops the others. A batch step raises only when
every ticker it tried failed and `strict` (the DAG's tasks): that smells of an outage (Yahoo,
MLflow), which a task retry may cure.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.config import Settings
from ml.universe import Instrument, load_universe

if TYPE_CHECKING:
    from ml.sources import PriceSource

log = logging.getLogger(__name__)


class StepFailed(RuntimeError):
    """Every ticker a batch step tried failed (the task should be retried)."""


def instrument_for(ticker: str, settings: Settings) -> Instrument:
    return load_universe(settings.universe_file).get(ticker)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _raise_if_all_failed(step: str, tried: int, failed: Mapping[str, str], strict: bool) -> None:
    if strict and tried and len(failed) == tried:
        sample = "; ".join(f"{t}: {e}" for t, e in list(failed.items())[:3])
        raise StepFailed(f"{step}: all {tried} ticker(s) failed ({sample})")


# --- data phase ----------------------------------------------------------------------------------


def ingest_step(ticker: str, as_of: date, settings: Settings) -> dict[str, Any]:
    """Fetch one ticker's due bars into staging."""
    from dataclasses import asdict

    from ml.ingest import stage_ticker

    return asdict(stage_ticker(instrument_for(ticker, settings), as_of, settings))


def publish_step(ticker: str, as_of: date, settings: Settings) -> dict[str, Any]:
    """Validate one ticker's staged batch and publish it (raises PriceValidationError)."""
    from ml.ingest import publish_staged

    return publish_staged(instrument_for(ticker, settings), as_of, settings)


def ingest_all(
    tickers: Iterable[str],
    as_of: date,
    settings: Settings,
    *,
    source: PriceSource | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Fetch every ticker's due bars into staging, `settings.fetch_concurrency` at a time.

    Returns {"staged": {ticker: batch summary}, "failed": {ticker: error}}; each download keeps
    the source's own retries and backoff.
    """
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import asdict

    from ml.ingest import stage_ticker
    from ml.sources import get_source

    tickers = list(tickers)
    universe = load_universe(settings.universe_file)
    source = source or get_source(settings)

    def stage(ticker: str) -> dict[str, Any]:
        return asdict(stage_ticker(universe.get(ticker), as_of, settings, source))

    staged: dict[str, Any] = {}
    failed: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, settings.fetch_concurrency)) as pool:
        futures = {ticker: pool.submit(stage, ticker) for ticker in tickers}
        for ticker, future in futures.items():
            try:
                staged[ticker] = future.result()
            except Exception as exc:
                failed[ticker] = _error(exc)
                log.warning("%s: ingest failed: %s", ticker, failed[ticker])
    _raise_if_all_failed("ingest", len(tickers), failed, strict)
    return {"staged": staged, "failed": failed}


def validate_all(
    staged: Iterable[str],
    as_of: date,
    settings: Settings,
    *,
    force: bool = False,
    check_registry: bool = True,
) -> dict[str, Any]:
    """Validate and publish every staged ticker; say which need training.

    A batch that fails its suite is quarantined (with its report) and its ticker listed in
    `failed`. A ticker needs training when its bars up to `as_of` changed, when no registered
    version was trained on exactly these bars and this model config, or when `force`. For the
    others, `tickers[t]` names the version that covers them (and whether its gate has run).
    Without `check_registry` (the CLI's `ingest`, which only publishes) nothing asks MLflow and
    every ticker whose bars did not change is listed as not needing training. After one failed
    registry lookup the rest are not tried: every remaining ticker goes to training, which checks
    again.

    Returns {"train": [ticker], "tickers": {ticker: summary}, "failed": {ticker: error}}.
    """
    import pandas as pd

    from ml.ingest import publish_with_history
    from ml.registry.client import get_client
    from ml.registry.versions import trained_version
    from ml.store import PriceStore, data_fingerprint

    staged = list(staged)
    universe = load_universe(settings.universe_file)
    store = PriceStore(settings.data_dir)
    config_fp = settings.model.fingerprint()
    # What the ledger's monitor asked for after the last run (live U2 >= 1 or input drift).
    monitor_asks = _pending_retrains(settings, staged, as_of) if check_registry else {}
    client = None
    registry_error: str | None = None
    to_train: list[str] = []
    summaries: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    for ticker in staged:
        instrument = universe.get(ticker)
        try:
            summary, history = publish_with_history(instrument, as_of, store)
        except Exception as exc:  # PriceValidationError: quarantined with its report
            failed[ticker] = _error(exc)
            continue
        history = history.loc[history["Date"] <= pd.Timestamp(as_of)]
        if history.empty:
            failed[ticker] = f"ValueError: {ticker}: no published bars up to {as_of}"
            continue
        summary["data_fingerprint"] = data_fingerprint(history)
        summary["last_bar_date"] = history["Date"].iloc[-1].date().isoformat()
        summaries[ticker] = summary
        changed = bool(summary["rows_added"] or summary["rows_updated"])
        if force or changed:
            summary["train_reason"] = "force_retrain" if force else "new or revised bars"
            to_train.append(ticker)
            continue
        if not check_registry:
            continue
        try:
            if registry_error:
                raise RuntimeError(registry_error)
            client = client or get_client(settings)
            version = trained_version(client, instrument, summary["data_fingerprint"], config_fp)
        except Exception as exc:  # the check only saves work: train, which checks again
            registry_error = registry_error or _error(exc)
            log.warning("%s: registry lookup failed (%s); training", ticker, registry_error)
            summary["train_reason"] = f"registry lookup failed ({registry_error})"
            to_train.append(ticker)
            continue
        asked = monitor_asks.get(ticker)
        if asked and (version is None or version.tags.get("logical_date", "") <= asked[1]):
            # Flagged (live U2 or input drift) and nothing trained since: retrain on the same
            # bars with a seed of this date (the same seed would reproduce the same network);
            # the gate still decides. A re-run finds that version by its config and reuses it.
            summary.update(
                train_reason=f"monitor ({asked[1]}): {asked[0]}",
                retrain_seed=settings.model.seed + as_of.toordinal() % 100_000,
            )
            to_train.append(ticker)
            continue
        if version is None:
            summary["train_reason"] = "no version trained on these bars and this config"
            to_train.append(ticker)
            continue
        summary.update(
            version=str(version.version),
            trained_for=version.tags.get("logical_date"),
            gate_status=version.tags.get("gate_status"),
            metrics=json.loads(version.tags.get("test_u2", "{}")),
            metrics_range_naive=json.loads(version.tags.get("test_u2_range_naive", "{}")),
        )
    return {"train": to_train, "tickers": summaries, "failed": failed}


def _pending_retrains(
    settings: Settings, tickers: list[str], as_of: date
) -> dict[str, tuple[str, str]]:
    """`ml.ledger.pending_retrains`; a ledger that cannot be read only costs the retrain hint."""
    from ml.ledger import pending_retrains

    try:
        return pending_retrains(settings, tickers, as_of)
    except Exception as exc:
        log.warning("ledger not readable (%s): no monitor-driven retrains this run", _error(exc))
        return {}


# --- training (one task per ticker) --------------------------------------------------------------


def train_step(
    ticker: str, as_of: date, settings: Settings, *, force: bool = False, seed: int | None = None
) -> dict[str, Any]:
    """Train and register a candidate, unless a version already covers exactly these bars.

    Idempotent: a retry after a registered version (or a second run for the same bars) finds it
    by its data and config fingerprints and reports it instead of training again. `seed`
    replaces the config's seed (a retrain the ledger's monitor asked for, see `validate_all`).
    """
    if seed is not None:
        settings = replace(settings, model=replace(settings.model, seed=int(seed)))
    from ml.registry.client import get_client
    from ml.registry.tracking import log_candidate
    from ml.registry.versions import reuse_outcome, ticker_lock
    from ml.store import PriceStore, data_fingerprint
    from ml.training import train_on_history

    instrument = instrument_for(ticker, settings)
    store = PriceStore(settings.data_dir)
    history = store.load(instrument, until=as_of)
    if history.empty:
        raise ValueError(f"{ticker}: no published bars up to {as_of}; ingest first")
    data_fp = data_fingerprint(history)
    client = get_client(settings)
    # Check, train and register under the ticker's lock in the registry: a second process on the
    # same ticker (another host or DATA_DIR too) waits, then finds this version and reuses it.
    with ticker_lock(client, instrument, settings):
        if not force:
            existing = reuse_outcome(
                client, instrument, as_of, data_fp, settings.model.fingerprint()
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


# --- promotion and forecasting (one task each) ---------------------------------------------------


def promote_step(
    ticker: str, as_of: date, trained: dict[str, Any], settings: Settings
) -> dict[str, Any]:
    """Run the gate for one ticker's trained version (the CLI's `train`).

    A ticker that was not retrained (no version, or a version from an earlier date whose gate
    already ran) keeps its champion; an earlier version whose gate never ran is decided now.
    """
    from ml.registry.client import get_client
    from ml.registry.promotion import promote_if_better
    from ml.registry.versions import champion_as_of

    instrument = instrument_for(ticker, settings)
    client = get_client(settings)
    version = str(trained["version"]) if trained.get("version") else None
    decided = (
        version is not None
        and trained.get("status") == "skipped"
        and client.get_model_version(instrument.model_name, version).tags.get("gate_status")
    )
    if version is None or decided:
        champion = champion_as_of(client, instrument.model_name, as_of)
        return {
            "ticker": ticker,
            "promoted": False,
            "reason": f"not retrained ({trained.get('reason', 'no new data')}); champion kept",
            "champion_version": champion.version if champion else None,
        }
    return promote_if_better(instrument, as_of, version, settings).to_dict()


def promote_all(
    validated: Mapping[str, Any] | None,
    trained: Iterable[Mapping[str, Any] | None],
    as_of: date,
    settings: Settings,
    *,
    strict: bool = False,
) -> dict[str, Any]:
    """Apply the gate to every version of this run that has not been through it, one at a time.

    The candidates are the versions the train tasks returned, plus versions found by validation
    whose gate never ran (a run that died between train and promote): the next run finishes it.
    Returns {"decisions": {ticker: decision}, "failed": {ticker: error}}.
    """
    from ml.registry.client import get_client
    from ml.registry.promotion import promote_if_better
    from ml.registry.versions import set_challenger

    universe = load_universe(settings.universe_file)
    candidates: dict[str, str] = {}
    for ticker, summary in ((validated or {}).get("tickers") or {}).items():
        if summary.get("version") and not summary.get("gate_status"):
            candidates[ticker] = str(summary["version"])
    unfinished = set(candidates)  # left by a run that died after registering them
    for outcome in trained or ():
        if outcome and outcome.get("version"):
            candidates[outcome["ticker"]] = str(outcome["version"])
            unfinished.discard(outcome["ticker"])
    decisions: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for ticker in sorted(candidates):
        try:
            instrument = universe.get(ticker)
            if ticker in unfinished:  # that run may have died before moving `challenger`
                set_challenger(get_client(settings), instrument.model_name, candidates[ticker])
            decision = promote_if_better(instrument, as_of, candidates[ticker], settings)
        except Exception as exc:
            failed[ticker] = _error(exc)
            log.warning("%s: promotion failed: %s", ticker, failed[ticker])
            continue
        decisions[ticker] = decision.to_dict()
    _raise_if_all_failed("promote", len(candidates), failed, strict)
    return {"decisions": decisions, "failed": failed}


def forecast_all(
    tickers: Iterable[str], as_of: date, settings: Settings, *, strict: bool = False
) -> dict[str, Any]:
    """Score the ledger, then forecast the bar after `as_of` for every ticker with a champion.

    First the ledger (`ml.ledger.monitor`): every earlier forecast whose bar is now published is
    scored, and each ticker gets live metrics and an input-drift test (a ticker that should be
    retrained is picked up by the next run's `validate_all`). Then the forecasts: a ticker whose
    champion already forecast the bar after its last bar (a day without a new bar) keeps that
    row and the model is not loaded again. New forecasts go to the ledger in one transaction and
    to the CSV export in one write. Returns {"forecasts": {ticker: row}, "kept": [ticker],
    "no_champion": [ticker], "failed": {ticker: error}, "monitor": {ticker: live summary}}.
    """
    from ml.forecasting import read_forecasts, upsert_forecasts
    from ml.ledger import read_table, record_forecasts
    from ml.registry.client import get_client
    from ml.registry.versions import champion_as_of
    from ml.store import PriceStore

    tickers = list(tickers)
    universe = load_universe(settings.universe_file)
    store = PriceStore(settings.data_dir)
    table = read_table(settings, "forecasts")  # the store of record (the CSV is an export)
    client = get_client(settings) if tickers else None
    forecasts: dict[str, Any] = {}
    kept: list[str] = []
    no_champion: list[str] = []
    failed: dict[str, str] = {}
    new_rows: list[dict[str, Any]] = []
    states: dict[str, tuple[Instrument, Any, Any]] = {}
    for ticker in tickers:
        try:
            instrument = universe.get(ticker)
            history = store.load(instrument, until=as_of)
            states[ticker] = (
                instrument,
                history,
                champion_as_of(client, instrument.model_name, as_of),
            )
        except Exception as exc:
            failed[ticker] = _error(exc)
            log.warning("%s: forecast failed: %s", ticker, failed[ticker])
    monitored = monitor_all(states, as_of, settings, client)
    for ticker, (instrument, history, champion) in states.items():
        try:
            outcome, row = _forecast_one(
                instrument, as_of, settings, client, table, history=history, champion=champion
            )
        except Exception as exc:
            failed[ticker] = _error(exc)
            log.warning("%s: forecast failed: %s", ticker, failed[ticker])
            continue
        if outcome == "no champion":
            no_champion.append(ticker)
            continue
        if outcome == "kept":
            kept.append(ticker)
        else:
            new_rows.append(row)
        forecasts[ticker] = row
    if new_rows:
        record_forecasts(settings, new_rows)
    # The CSV is an export of the ledger: rows kept from the ledger go in again when the export
    # lacks them (a try killed between the ledger's commit and the export's rename).
    exported = read_forecasts(settings) if kept else None
    missing = [
        forecasts[t]
        for t in kept
        if exported is not None
        and not (
            (exported["ticker"] == t) & (exported["logical_date"] == forecasts[t]["logical_date"])
        ).any()
    ]
    if new_rows or missing:
        upsert_forecasts(settings, new_rows + missing)
    _raise_if_all_failed("forecast", len(tickers) - len(no_champion) - len(kept), failed, strict)
    return {
        "forecasts": forecasts,
        "kept": kept,
        "no_champion": no_champion,
        "failed": failed,
        "monitor": monitored,
    }


def monitor_all(
    states: Mapping[str, tuple[Instrument, Any, Any]], as_of: date, settings: Settings, client: Any
) -> dict[str, Any]:
    """The ledger's scoring, live metrics and drift for these tickers ((instrument, history up
    to as_of, champion version or None) each); the champion's model version gets the live
    metrics as tags (`live_metrics`, `input_drift`), unless a later date already wrote them.
    Returns a small summary per ticker for the run report."""
    from ml.ledger import LIVE_WINDOWS, monitor

    histories = {t: h for t, (_, h, _) in states.items() if len(h)}
    champions = {
        t: (str(c.version), date.fromisoformat(c.tags["logical_date"]))
        if c is not None and c.tags.get("logical_date")
        else None
        for t, (_, _, c) in states.items()
    }
    result = monitor(settings, histories, champions, as_of)
    summary: dict[str, Any] = {}
    for ticker, watched in result.items():
        champion = states[ticker][2]
        if champion is not None and champion.tags.get("live_as_of", "") <= as_of.isoformat():
            name = states[ticker][0].model_name
            for key, value in (
                ("live_as_of", as_of.isoformat()),
                ("live_metrics", json.dumps(watched.live, sort_keys=True)),
                ("input_drift", json.dumps(watched.drift, sort_keys=True)),
            ):
                if champion.tags.get(key) != value:  # a day without new bars writes nothing
                    client.set_model_version_tag(name, champion.version, key, value)
        summary[ticker] = {
            "live": watched.live[str(LIVE_WINDOWS[0])],
            "drifted": bool(watched.drift.get("drifted")),
            "retrain_reason": watched.retrain_reason,
        }
    return summary


def _forecast_one(
    instrument: Instrument,
    as_of: date,
    settings: Settings,
    client: Any,
    table: Any,
    *,
    history: Any = None,
    champion: Any = None,
) -> tuple[str, dict[str, Any] | None]:
    """("no champion", None), ("kept", the existing row) or ("new", a row to write); `history`
    (bars up to as_of) and `champion` are looked up when not given."""
    from ml.forecasting import forecast_row
    from ml.registry.versions import champion_as_of, load_forecaster
    from ml.store import PriceStore

    if champion is None:
        champion = champion_as_of(client, instrument.model_name, as_of)
    if champion is None:
        return "no champion", None
    if history is None:
        history = PriceStore(settings.data_dir).load(instrument, until=as_of)
    last_bar = history["Date"].iloc[-1].date().isoformat()
    existing = table.loc[
        (table["ticker"] == instrument.ticker)
        & (table["last_bar_date"] == last_bar)
        & (table["model_version"] == str(champion.version))
        & (table["logical_date"] <= as_of.isoformat())
    ]
    if not existing.empty:
        return "kept", {k: _plain(v) for k, v in existing.iloc[-1].to_dict().items()}
    loaded = load_forecaster(instrument, settings, version=str(champion.version))
    assert loaded is not None  # the version exists: champion_as_of just found it
    return "new", forecast_row(instrument, as_of, history, loaded[0], loaded[1], settings)


def forecast_step(ticker: str, as_of: date, settings: Settings) -> dict[str, Any] | None:
    """Forecast one ticker and upsert its row (errors raised as they are); None: no champion."""
    from ml.forecasting import upsert_forecasts
    from ml.ledger import read_table, record_forecasts
    from ml.registry.client import get_client

    outcome, row = _forecast_one(
        instrument_for(ticker, settings),
        as_of,
        settings,
        get_client(settings),
        read_table(settings, "forecasts"),
    )
    if outcome == "new":
        record_forecasts(settings, [row])
        upsert_forecasts(settings, [row])
    return row


def _plain(value: Any) -> Any:
    """A JSON-friendly Python scalar from a pandas/numpy one."""
    return value.item() if hasattr(value, "item") else value


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


# --- the run report ------------------------------------------------------------------------------


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


def summarize_tickers(
    tickers: Iterable[str],
    *,
    ingested: Mapping[str, Any] | None,
    validated: Mapping[str, Any] | None,
    trained: Iterable[Mapping[str, Any] | None] = (),
    train_errors: Iterable[Mapping[str, Any] | None] = (),
    promoted: Mapping[str, Any] | None = None,
    forecasted: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One row per ticker from what the steps returned: done, skipped (no new data) or failed.

    A step whose whole task failed returned nothing (None): its tickers are failed at that step.
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
            ticker, ingested, validated, to_train, trained_by, errors_by, promoted, forecasted
        )
        if failure:
            row.update(state="failed", failed_step=failure[0], error=failure[1])
        summary = summaries.get(ticker) or {}
        outcome = trained_by.get(ticker) or {}
        decision = decisions.get(ticker) or {}
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
        row["u2_range_naive"] = (
            outcome.get("metrics_range_naive") or summary.get("metrics_range_naive") or {}
        )
        if outcome.get("status"):
            row["training"] = f"{outcome['status']} v{outcome['version']}"
        elif summary.get("version"):
            row["training"] = f"not retrained: v{summary['version']} covers these bars"
        else:
            row["training"] = "-"
        if decision:
            row["promotion"] = (
                f"promoted v{decision.get('version')}"
                if decision.get("promoted")
                else f"kept v{decision['champion_version']}"
                if decision.get("champion_version")
                else "none"
            )
            row["promotion_reason"] = decision.get("reason")
        elif forecast:
            row["promotion"] = f"kept v{forecast.get('model_version')}"
            row["promotion_reason"] = "no new candidate; champion kept"
        elif forecasted is not None and ticker in (forecasted.get("no_champion") or ()):
            row["promotion"] = "none"
            row["promotion_reason"] = "no champion yet"
        if forecast:
            row["forecast_close"] = forecast.get("pred_close")
            row["forecast_high"] = forecast.get("pred_high")
            row["forecast_low"] = forecast.get("pred_low")
            row["forecast_version"] = forecast.get("model_version")
        rows.append(row)
    return rows


def _failure(
    ticker: str,
    ingested: Mapping[str, Any],
    validated: Mapping[str, Any] | None,
    to_train: set[str],
    trained_by: Mapping[str, Any],
    errors_by: Mapping[str, str],
    promoted: Mapping[str, Any] | None,
    forecasted: Mapping[str, Any] | None,
) -> tuple[str, str] | None:
    """(step, error) for the first step at which `ticker` failed, or None."""
    if not ingested:
        return "ingest", "the ingest task failed: see its log"
    if ticker in (ingested.get("failed") or {}):
        return "ingest", ingested["failed"][ticker]
    if validated is None:
        return "validate", "the validate task failed: see its log"
    if ticker in (validated.get("failed") or {}):
        return "validate", validated["failed"][ticker]
    if ticker in to_train and ticker not in trained_by:
        return "train", errors_by.get(ticker, "the train task did not finish: see its log")
    if promoted is None and ticker in trained_by:
        return "promote", "the promote task failed: see its log"
    if ticker in ((promoted or {}).get("failed") or {}):
        return "promote", promoted["failed"][ticker]
    if forecasted is None:
        return "forecast", "the forecast task failed: see its log"
    if ticker in (forecasted.get("failed") or {}):
        return "forecast", forecasted["failed"][ticker]
    return None


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the run summary for logs and the terminal."""
    headers = [
        "ticker",
        "state",
        "rows",
        "validation",
        "U2 H/L/C",
        "vs naive H/L",
        "live U2 H/L (n)",
        "model",
        "champion",
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
        lines.append(
            [
                r["ticker"],
                r.get("state", "?"),
                str(r.get("rows_added", "-")),
                str(r.get("validation", "-")),
                u2_text,
                naive_text,
                live_text,
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
