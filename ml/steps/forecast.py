"""Forecasting: score the ledger, then forecast the bar after `as_of` with every ticker's champion."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterable, Mapping
from datetime import date
from pathlib import Path
from typing import Any

from ml.config import Settings
from ml.forecasts.ledger import plain
from ml.steps.common import (
    capture,
    concurrently,
    error_text,
    in_processes,
    instrument_for,
    raise_if_all_failed,
)
from ml.universe import Instrument, load_universe

log = logging.getLogger(__name__)


def forecast_all(
    tickers: Iterable[str], as_of: date, settings: Settings, *, strict: bool = False
) -> dict[str, Any]:
    """Score the ledger, then forecast the bar after `as_of` for every ticker with a champion.

    First the ledger (`ml.forecasts.monitor`): every earlier forecast whose bar is now published
    is scored; live metrics and input drift per ticker (a retrain is picked up by the next run's
    `validate_all`). A champion that already forecast the bar after its last bar keeps its row,
    unloaded. New forecasts go to the ledger in one transaction and to the CSV export in one
    write. Returns {"forecasts": {ticker: row}, "kept": [ticker], "no_champion": [ticker],
    "failed": {ticker: error}, "monitor": {ticker: live summary}, "kinds": {ticker: kind}}.
    """
    from ml.forecasts.ledger import read_table, record_forecasts
    from ml.registry.client import get_client

    tickers = list(tickers)
    table = read_table(settings, "forecasts")  # the store of record (the CSV is an export)
    client = get_client(settings) if tickers else None
    forecasts: dict[str, Any] = {}
    kept: list[str] = []
    no_champion: list[str] = []
    failed: dict[str, str] = {}
    new_rows: list[dict[str, Any]] = []
    states = _states(tickers, as_of, settings, client, failed)
    monitored = monitor_all(states, as_of, settings, client)
    kept_rows = _kept_rows(table, states, as_of)
    with tempfile.TemporaryDirectory(prefix="champions-") as tmp:
        # The champions' files, a few downloads at a time.
        files = _download_champions(states, kept_rows, settings, Path(tmp))

        def one(ticker: str) -> tuple[str, dict[str, Any] | None]:
            instrument, history, champion = states[ticker]
            if ticker in kept_rows:
                return "kept", kept_rows[ticker]
            if isinstance(files.get(ticker), BaseException):
                raise files[ticker]
            return _forecast_one(
                instrument,
                as_of,
                settings,
                client,
                table,
                history=history,
                champion=champion,
                files=files.get(ticker),
            )

        # Model loads and predictions are CPU-bound: the downloaded champions are spread over
        # the cores; the rest (a kept row, no champion, a failed download) is handled here.
        loads = [t for t, f in files.items() if not isinstance(f, BaseException)]
        done = {t: (found, exc) for t, found, exc in in_processes(one, loads)}
        rest = (capture(one, t) for t in states if t not in done)
        done.update({t: (found, exc) for t, found, exc in rest})
        for ticker in states:
            found, exc = done[ticker]
            if exc is not None:
                failed[ticker] = error_text(exc)
                log.warning("%s: forecast failed: %s", ticker, failed[ticker])
                continue
            outcome, row = found
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
    _export(settings, new_rows, [forecasts[t] for t in kept])
    raise_if_all_failed("forecast", len(tickers) - len(no_champion) - len(kept), failed, strict)
    return {
        "forecasts": forecasts,
        "kept": kept,
        "no_champion": no_champion,
        "failed": failed,
        "monitor": monitored,
        "kinds": _champion_kinds(states),
    }


def _champion_kinds(states: dict[str, Any]) -> dict[str, str]:
    """ticker -> the model kind of its champion (the version's `model_kind` tag)."""
    return {t: s[2].tags.get("model_kind", "?") for t, s in states.items() if s[2] is not None}


def _export(settings: Settings, new_rows: list[dict[str, Any]], kept: list[dict[str, Any]]) -> None:
    """Write the new rows to the CSV export, with the kept rows it lacks: the export is rebuilt
    from the ledger where a try was killed between the ledger's commit and the export's rename."""
    from ml.forecasts.export import read_forecasts, upsert_forecasts

    exported = read_forecasts(settings) if kept else None
    missing = [
        row
        for row in kept
        if exported is not None
        and not (
            (exported["ticker"] == row["ticker"])
            & (exported["logical_date"] == row["logical_date"])
        ).any()
    ]
    if new_rows or missing:
        upsert_forecasts(settings, new_rows + missing)


def monitor_all(
    states: Mapping[str, tuple[Instrument, Any, Any]], as_of: date, settings: Settings, client: Any
) -> dict[str, Any]:
    """The ledger's scoring, live metrics and drift for these tickers ((instrument, history up
    to as_of, champion version or None) each); the champion's model version gets the live
    metrics as tags (`live_metrics`, `input_drift`), unless a later date already wrote them.
    Returns a small summary per ticker for the run report."""
    from ml.forecasts.monitor import LIVE_WINDOWS, monitor

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


def _states(
    tickers: list[str], as_of: date, settings: Settings, client: Any, failed: dict[str, str]
) -> dict[str, tuple[Instrument, Any, Any]]:
    """ticker -> (instrument, bars up to as_of, champion as of as_of or None). The champions
    come from one registry read for all tickers (`champions_as_of`); should that fail, each
    ticker asks for its own. The bars are read a few tickers at a time; a ticker whose reads
    fail goes to `failed`."""
    from ml.data.store import PriceStore
    from ml.registry.versions import champion_as_of, champions_as_of

    universe = load_universe(settings.universe_file)
    store = PriceStore(settings.data_dir)
    instruments: dict[str, Instrument] = {}
    for ticker, instrument, exc in (capture(universe.get, t) for t in tickers):
        if exc is None:
            instruments[ticker] = instrument
        else:
            failed[ticker] = error_text(exc)
            log.warning("%s: forecast failed: %s", ticker, failed[ticker])
    try:
        champions = {
            name: pair[0]
            for name, pair in champions_as_of(
                client, [i.model_name for i in instruments.values()], as_of
            ).items()
        }
    except Exception as exc:
        log.warning("champions not read in one request (%s); one ticker at a time", error_text(exc))
        champions = None

    def state(ticker: str) -> tuple[Instrument, Any, Any]:
        instrument = instruments[ticker]
        history = store.load(instrument, until=as_of)
        if champions is None:
            return instrument, history, champion_as_of(client, instrument.model_name, as_of)
        return instrument, history, champions[instrument.model_name]

    states: dict[str, tuple[Instrument, Any, Any]] = {}
    for ticker, found, exc in concurrently(state, list(instruments)):
        if exc is None:
            states[ticker] = found
        else:
            failed[ticker] = error_text(exc)
            log.warning("%s: forecast failed: %s", ticker, failed[ticker])
    return states


def _download_champions(
    states: Mapping[str, tuple[Instrument, Any, Any]],
    kept_rows: Mapping[str, dict[str, Any]],
    settings: Settings,
    dest: Path,
) -> dict[str, Any]:
    """ticker -> the downloaded files of its champion (or the download's exception), for the
    tickers whose champion has not forecast their last bar yet; a few at a time (HTTP only)."""
    from ml.registry.versions import download_forecaster

    due = [
        ticker
        for ticker, (_, history, champion) in states.items()
        if champion is not None and len(history) and ticker not in kept_rows
    ]

    def fetch(ticker: str) -> tuple[str, str]:
        instrument, _, champion = states[ticker]
        return download_forecaster(instrument, settings, str(champion.version), dest)

    return {t: files if exc is None else exc for t, files, exc in concurrently(fetch, due)}


def _kept_rows(
    table: Any, states: Mapping[str, tuple[Instrument, Any, Any]], as_of: date
) -> dict[str, dict[str, Any]]:
    """ticker -> `_kept_row` for every ticker with a champion and bars (the ledger is split by
    ticker once, not scanned once per ticker)."""
    by_ticker = dict(tuple(table.groupby("ticker", sort=False))) if len(table) else {}
    out: dict[str, dict[str, Any]] = {}
    for ticker, (instrument, history, champion) in states.items():
        rows = by_ticker.get(ticker)
        if champion is None or not len(history) or rows is None:
            continue
        row = _kept_row(rows, instrument, history, champion, as_of)
        if row is not None:
            out[ticker] = row
    return out


def _kept_row(
    table: Any, instrument: Instrument, history: Any, champion: Any, as_of: date
) -> dict[str, Any] | None:
    """The ledger's row in which this champion already forecast the bar after `history`'s last
    (a day without a new bar), or None."""
    last_bar = history["Date"].iloc[-1].date().isoformat()
    existing = table.loc[
        (table["ticker"] == instrument.ticker)
        & (table["last_bar_date"] == last_bar)
        & (table["model_version"] == str(champion.version))
        & (table["logical_date"] <= as_of.isoformat())
    ]
    if existing.empty:
        return None
    return {k: plain(v) for k, v in existing.iloc[-1].to_dict().items()}


def _forecast_one(
    instrument: Instrument,
    as_of: date,
    settings: Settings,
    client: Any,
    table: Any,
    *,
    history: Any = None,
    champion: Any = None,
    files: tuple[str, str] | None = None,
) -> tuple[str, dict[str, Any] | None]:
    """("no champion", None), ("kept", the existing row) or ("new", a row to write); `history`
    (bars up to as_of) and `champion` are looked up when not given. `files` are the champion's
    files from `_download_champions`, which fetches them only for a champion with no kept row
    (so that check is not made again); without them the champion is downloaded here."""
    from ml.data.store import PriceStore
    from ml.forecasts.export import forecast_row
    from ml.model.forecaster import PriceForecaster
    from ml.model.networks import configure_tensorflow
    from ml.registry.versions import champion_as_of, load_forecaster

    if champion is None:
        champion = champion_as_of(client, instrument.model_name, as_of)
    if champion is None:
        return "no champion", None
    if history is None:
        history = PriceStore(settings.data_dir).load(instrument, until=as_of)
    if files is not None:
        configure_tensorflow()
        loaded = PriceForecaster.load(*files), str(champion.version)
    else:
        kept = _kept_row(table, instrument, history, champion, as_of)
        if kept is not None:
            return "kept", kept
        loaded = load_forecaster(instrument, settings, version=str(champion.version))
    assert loaded is not None  # the version exists: champion_as_of just found it
    return "new", forecast_row(instrument, as_of, history, loaded[0], loaded[1], settings)


def forecast_step(ticker: str, as_of: date, settings: Settings) -> dict[str, Any] | None:
    """Forecast one ticker and upsert its row (errors raised as they are); None: no champion."""
    from ml.forecasts.export import upsert_forecasts
    from ml.forecasts.ledger import read_table, record_forecasts
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
