"""The data phase: fetch every ticker's due bars into staging, then validate and publish them and
say which tickers need training."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
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
    from ml.steps.records import Published, Registered, TrainOrder


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
    """The data phase's three stages at once (`publish_all`, `registered_versions`,
    `plan_training`), in the dict form the command line's `ingest` and the tests read: without
    `check_registry` nothing asks MLflow or the ledger, and a ticker whose bars did not change is
    not listed for training.

    Returns {"train": [ticker], "tickers": {ticker: summary}, "failed": {ticker: error}}: each
    summary is the ticker's `Publication`, with its `train_reason` (and `retrain_seed`) when it
    trains, or the `Coverage` of the version that covers its bars.
    """
    from ml.steps.records import Registered, to_plain

    published = publish_all(staged, as_of, settings)
    registered = (
        registered_versions(published, as_of, settings, force=force)
        if check_registry
        else Registered({}, {}, {})
    )
    orders = plan_training(published, registered, as_of, settings, force=force)
    tickers = {t: to_plain(p) for t, p in published.tickers.items()}
    for ticker, coverage in registered.versions.items():
        if coverage is not None:
            tickers[ticker].update(to_plain(coverage))
    for order in orders:
        tickers[order.ticker]["train_reason"] = order.reason
        if order.seed is not None:
            tickers[order.ticker]["retrain_seed"] = order.seed
    return {
        "train": [o.ticker for o in orders],
        "tickers": tickers,
        "failed": dict(published.failed),
    }


def publish_all(staged: Iterable[str], as_of: date, settings: Settings) -> Published:
    """Validate every staged ticker's batch with its suite and publish it; a batch that fails
    is quarantined (with its report) and its ticker listed in `failed`."""
    from ml.data.store import PriceStore
    from ml.quality.validation import warm_context
    from ml.steps.records import Publication, Published, record

    staged = list(staged)
    universe = load_universe(settings.universe_file)
    store = PriceStore(settings.data_dir)
    warm_context()  # built once here, inherited by the worker processes

    def publish(ticker: str) -> dict[str, Any]:
        return _publish(universe.get(ticker), as_of, store)

    # The suites are CPU-bound Python: spread over the cores (each ticker's publish holds its
    # own lock in the store; a worker killed mid-publish fails the step, and the retry finds
    # what it published).
    done: dict[str, Publication] = {}
    failed: dict[str, str] = {}
    for ticker, summary, exc in in_processes(publish, staged):
        if exc is not None:  # PriceValidationError: quarantined with its report
            failed[ticker] = error_text(exc)
        else:
            done[ticker] = record(Publication, summary)
    return Published({t: done[t] for t in staged if t in done}, failed)


def registered_versions(
    published: Published, as_of: date, settings: Settings, *, force: bool = False
) -> Registered:
    """For the tickers whose bars did not change: the registered version trained on exactly
    these bars and this config (or None), and the retrains the ledger's monitor asked for after
    the last run (live U2, coverage, input drift). The registry is asked a few tickers at a
    time; after one failed lookup, those not started are not tried (`lookup_errors`): each of
    them goes to training, which checks again."""
    from ml.steps.records import Registered, RetrainAsk, coverage_of

    tickers = list(published.tickers)
    unchanged = [t for t in tickers if not (force or published.tickers[t].changed)]
    asks = _pending_retrains(settings, tickers, as_of) if tickers else {}
    universe = load_universe(settings.universe_file)
    prints = {t: published.tickers[t].data_fingerprint for t in unchanged}
    found = _trained_versions(unchanged, universe, prints, settings)
    return Registered(
        versions={
            t: (None if v is None else coverage_of(v))
            for t, v in found.items()
            if not isinstance(v, BaseException)
        },
        lookup_errors={t: str(v) for t, v in found.items() if isinstance(v, BaseException)},
        asks={t: RetrainAsk(reason, flagged_on) for t, (reason, flagged_on) in asks.items()},
    )


def plan_training(
    published: Published,
    registered: Registered | None,
    as_of: date,
    settings: Settings,
    *,
    force: bool = False,
) -> tuple[TrainOrder, ...]:
    """The tickers to train and why, in the order they were staged: new or revised bars, no
    version trained on these bars and this config, a retrain the monitor asked for since the
    version was trained, a failed registry lookup, or `force`. `registered` None (that stage
    failed as a whole): every ticker without new bars trains, and training checks again."""
    from ml.steps.records import TrainOrder

    orders = []
    for ticker, publication in published.tickers.items():
        if force or publication.changed:
            reason = "force_retrain" if force else (publication.revision or "new or revised bars")
            orders.append(TrainOrder(ticker, reason))
        elif registered is None:
            orders.append(TrainOrder(ticker, "registry lookup failed (its stage did not finish)"))
        elif ticker in registered.lookup_errors:
            error = registered.lookup_errors[ticker]
            orders.append(TrainOrder(ticker, f"registry lookup failed ({error})"))
        elif ticker in registered.versions:
            order = _order_for_unchanged(ticker, registered, settings, as_of)
            if order is not None:
                orders.append(order)
    return tuple(orders)


def _order_for_unchanged(
    ticker: str, registered: Registered, settings: Settings, as_of: date
) -> TrainOrder | None:
    """A ticker whose bars did not change trains when the monitor asked for it since its
    version was trained, or when no version covers these bars."""
    from ml.steps.records import TrainOrder

    version, ask = registered.versions[ticker], registered.asks.get(ticker)
    if ask and (version is None or (version.trained_for or "") <= ask.flagged_on):
        # Flagged and nothing trained since: retrain on the same bars with a seed of this date
        # (the same seed would reproduce the same network); the gate still decides. A re-run
        # finds that version by its config and reuses it.
        seed = settings.model.seed + as_of.toordinal() % 100_000
        return TrainOrder(ticker, f"monitor ({ask.flagged_on}): {ask.reason}", seed)
    if version is None:
        return TrainOrder(ticker, "no version trained on these bars and this config")
    return None


def _trained_versions(
    tickers: list[str], universe: Any, prints: Mapping[str, str], settings: Settings
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
                client, {n: prints[t] for n, t in names.items()}, config_fp
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
                prints[ticker],
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
