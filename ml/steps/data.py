"""The data phase: fetch every ticker's due bars into staging, then validate and publish them and
say which tickers need training."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from datetime import date
from typing import TYPE_CHECKING, Any

from ml.config import Settings
from ml.steps.common import (
    concurrently,
    error_text,
    in_processes,
    instrument_for,
    raise_if_all_failed,
)
from ml.universe import Instrument, load_universe

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ml.data.sources import PriceSource


def ingest_step(ticker: str, as_of: date, settings: Settings) -> dict[str, Any]:
    """Fetch one ticker's due bars into staging."""
    from dataclasses import asdict

    from ml.data.ingest import stage_ticker

    return asdict(stage_ticker(instrument_for(ticker, settings), as_of, settings))


def publish_step(ticker: str, as_of: date, settings: Settings) -> dict[str, Any]:
    """Validate one ticker's staged batch and publish it (raises PriceValidationError)."""
    from ml.quality.publish import publish_staged

    return publish_staged(instrument_for(ticker, settings), as_of, settings)


def ingest_all(
    tickers: Iterable[str],
    as_of: date,
    settings: Settings,
    *,
    source: PriceSource | None = None,
    strict: bool = False,
    full_refresh: bool = False,
) -> dict[str, Any]:
    """Fetch every ticker's due bars into staging (`full_refresh`: the whole history, to
    replace the published one; see `ml.data.ingest.stage_ticker`): from a network source (Yahoo)
    `settings.fetch_concurrency` at a time in threads, from a local one (synthetic, files: the
    bars are computed or parsed here, CPU-bound) over the cores (`in_processes`).

    Returns {"staged": {ticker: batch summary}, "failed": {ticker: error}}; each download keeps
    the source's own retries and backoff.
    """
    from dataclasses import asdict

    from ml.data.ingest import stage_ticker
    from ml.data.sources import get_source

    tickers = list(tickers)
    universe = load_universe(settings.universe_file)
    source = source or get_source(settings)

    def stage(ticker: str) -> dict[str, Any]:
        return asdict(
            stage_ticker(universe.get(ticker), as_of, settings, source, full_refresh=full_refresh)
        )

    if getattr(source, "local", False):
        outcomes = in_processes(stage, tickers)
    else:
        outcomes = concurrently(stage, tickers, workers=settings.fetch_concurrency)
    staged: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for ticker, summary, exc in outcomes:
        if exc is None:
            staged[ticker] = summary
        else:
            failed[ticker] = error_text(exc)
            log.warning("%s: ingest failed: %s", ticker, failed[ticker])
    raise_if_all_failed("ingest", len(tickers), failed, strict)
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
    every ticker whose bars did not change is listed as not needing training. The registry is
    asked a few tickers at a time; after one failed lookup, those not started are not tried:
    every ticker left goes to training, which checks again.

    Returns {"train": [ticker], "tickers": {ticker: summary}, "failed": {ticker: error}}.
    """
    from ml.data.store import PriceStore
    from ml.quality.validation import warm_context

    staged = list(staged)
    universe = load_universe(settings.universe_file)
    store = PriceStore(settings.data_dir)
    # What the ledger's monitor asked for after the last run (live U2 >= 1 or input drift).
    monitor_asks = _pending_retrains(settings, staged, as_of) if check_registry and staged else {}
    summaries: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    unchanged: list[str] = []
    warm_context()  # built once here, inherited by the worker processes

    def publish(ticker: str) -> dict[str, Any]:
        return _publish(universe.get(ticker), as_of, store)

    # The suites are CPU-bound Python: spread over the cores (each ticker's publish holds its
    # own lock in the store; a worker killed mid-publish fails the step, and the retry finds
    # what it published).
    for ticker, summary, exc in in_processes(publish, staged):
        if exc is not None:  # PriceValidationError: quarantined with its report
            failed[ticker] = error_text(exc)
            continue
        summaries[ticker] = summary
        if force or summary["rows_added"] or summary["rows_updated"]:
            changed = summary.get("revision") or "new or revised bars"
            summary["train_reason"] = "force_retrain" if force else changed
        else:
            unchanged.append(ticker)
    found = _trained_versions(unchanged, universe, summaries, settings) if check_registry else {}
    to_train: list[str] = []
    for ticker in (t for t in staged if t in summaries):
        summary = summaries[ticker]
        if "train_reason" in summary:
            to_train.append(ticker)
        elif ticker not in found:
            continue  # not asked (the CLI's `ingest`)
        elif isinstance(found[ticker], BaseException):
            summary["train_reason"] = f"registry lookup failed ({found[ticker]})"
            to_train.append(ticker)
        elif _needs_training(summary, found[ticker], monitor_asks.get(ticker), settings, as_of):
            to_train.append(ticker)
    return {"train": to_train, "tickers": summaries, "failed": failed}


def _trained_versions(
    tickers: list[str], universe: Any, summaries: dict[str, dict[str, Any]], settings: Settings
) -> dict[str, Any]:
    """ticker -> the version trained on exactly its published bars and this config (or None),
    or the exception of a failed lookup. One request per 50 of them (`trained_versions`), then
    those it could not settle a few at a time (`concurrently`). After one failed lookup the ones
    not started yet are not tried: with the registry down, each would wait out the client's
    retries."""
    from ml.registry.client import get_client
    from ml.registry.versions import trained_version, trained_versions

    config_fp = settings.model.fingerprint()
    client = None
    first_error: list[str] = []
    found: dict[str, Any] = {}
    rest = list(tickers)
    if tickers:
        try:
            client = get_client(settings)  # MlflowUnreachable: every ticker goes to training
            names = {universe.get(t).model_name: t for t in tickers}
            settled, unsettled = trained_versions(
                client, {n: summaries[t]["data_fingerprint"] for n, t in names.items()}, config_fp
            )
        except Exception as exc:  # the check only saves work: train, which checks again
            first_error.append(error_text(exc))
        else:
            found = {names[n]: v for n, v in settled.items()}
            rest = [names[n] for n in unsettled]

    def lookup(ticker: str) -> Any:
        if first_error:
            raise RuntimeError(first_error[0])
        try:
            return trained_version(
                client,
                universe.get(ticker),
                summaries[ticker]["data_fingerprint"],
                config_fp,
            )
        except Exception as exc:  # the check only saves work: train, which checks again
            first_error.append(error_text(exc))
            raise

    for ticker, version, exc in concurrently(lookup, rest):
        if exc is not None:
            log.warning("%s: registry lookup failed (%s); training", ticker, first_error[0])
            found[ticker] = RuntimeError(first_error[0])
        else:
            found[ticker] = version
    return found


def _publish(instrument: Instrument, as_of: date, store: Any) -> dict[str, Any]:
    """Validate and publish the staged batch; its summary with the fingerprint of the bars up to
    `as_of` (raises PriceValidationError after quarantining a bad batch)."""
    import pandas as pd

    from ml.data.store import data_fingerprint
    from ml.quality.publish import publish_with_history

    summary, history = publish_with_history(instrument, as_of, store)
    history = history.loc[history["Date"] <= pd.Timestamp(as_of)]
    if history.empty:
        raise ValueError(f"{instrument.ticker}: no published bars up to {as_of}")
    summary["data_fingerprint"] = data_fingerprint(history)
    summary["last_bar_date"] = history["Date"].iloc[-1].date().isoformat()
    return summary


def _needs_training(
    summary: dict[str, Any],
    version: Any,
    asked: tuple[str, str] | None,
    settings: Settings,
    as_of: date,
) -> bool:
    """For a ticker whose bars did not change: train when the monitor asked for it since
    `version` was trained, or when no version covers these bars; else note the version."""
    if asked and (version is None or version.tags.get("logical_date", "") <= asked[1]):
        # Flagged (live U2 or input drift) and nothing trained since: retrain on the same bars
        # with a seed of this date (the same seed would reproduce the same network); the gate
        # still decides. A re-run finds that version by its config and reuses it.
        summary.update(
            train_reason=f"monitor ({asked[1]}): {asked[0]}",
            retrain_seed=settings.model.seed + as_of.toordinal() % 100_000,
        )
        return True
    if version is None:
        summary["train_reason"] = "no version trained on these bars and this config"
        return True
    summary.update(
        version=str(version.version),
        trained_for=version.tags.get("logical_date"),
        gate_status=version.tags.get("gate_status"),
        metrics=json.loads(version.tags.get("test_u2", "{}")),
        metrics_range_naive=json.loads(version.tags.get("test_u2_range_naive", "{}")),
        intervals=json.loads(version.tags.get("test_intervals") or "{}"),
    )
    return False


def _pending_retrains(
    settings: Settings, tickers: list[str], as_of: date
) -> dict[str, tuple[str, str]]:
    """`ml.forecasts.monitor.pending_retrains`; a ledger that cannot be read only costs the retrain hint."""
    from ml.forecasts.monitor import pending_retrains

    try:
        return pending_retrains(settings, tickers, as_of)
    except Exception as exc:
        log.warning(
            "ledger not readable (%s): no monitor-driven retrains this run", error_text(exc)
        )
        return {}
