"""Ingestion of one ticker for one logical date: fetch -> stage -> validate -> publish.

The two halves are separate functions so the DAG can run them as separate tasks; `ingest_ticker`
runs both for the command line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, timedelta
from typing import TYPE_CHECKING

from ml.config import Settings
from ml.data.sources import PriceSource, get_source
from ml.data.store import PriceStore
from ml.faults import checkpoint
from ml.universe import Instrument

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagedBatch:
    ticker: str
    as_of: str
    start: str
    end: str
    rows_fetched: int
    incremental: bool
    source: str
    # What the source assumed about its input (e.g. a file without Adj Close), for the output.
    notes: tuple[str, ...] = ()


def fetch_window(
    store: PriceStore, instrument: Instrument, as_of: date, settings: Settings
) -> tuple[date, bool]:
    """The first date to fetch: full history on the first load, a short trailing window after
    (and the full history again when the published file turned out corrupt: it is quarantined)."""
    from ml.data.store import CorruptPriceFile

    try:
        last = store.last_date(instrument)
    except CorruptPriceFile as exc:
        log.warning("%s", exc)
        last = None
    if last is None or last < settings.history_start:
        return settings.history_start, False
    anchor = min(last, as_of)
    start = max(anchor - timedelta(days=settings.trailing_days), settings.history_start)
    return start, True


def stage_ticker(
    instrument: Instrument, as_of: date, settings: Settings, source: PriceSource | None = None
) -> StagedBatch:
    """Fetch the bars due for `as_of` and write them to staging (nothing is published here)."""
    source = source or get_source(settings)
    store = PriceStore(settings.data_dir)
    start, incremental = fetch_window(store, instrument, as_of, settings)
    batch = source.fetch(instrument, start, as_of)
    store.stage(instrument, batch, as_of)
    checkpoint("staged")
    return StagedBatch(
        instrument.ticker,
        as_of.isoformat(),
        start.isoformat(),
        as_of.isoformat(),
        len(batch),
        incremental,
        source.name,
        tuple(batch.attrs.get("notes") or ()),
    )


def publish_staged(instrument: Instrument, as_of: date, settings: Settings) -> dict:
    """Validate the staged batch; publish it if it passed, quarantine it (and raise) if not."""
    return publish_with_history(instrument, as_of, PriceStore(settings.data_dir))[0]


def publish_with_history(
    instrument: Instrument, as_of: date, store: PriceStore
) -> tuple[dict, pd.DataFrame]:
    """`publish_staged`, also returning the published history after the upsert (read once)."""
    from ml.quality.validation import PriceValidationError, recheck_published, validate_prices

    if not store.staging_path(instrument, as_of).exists():
        return _published_earlier(instrument, as_of, store)
    batch = store.read_staged(instrument, as_of)
    # The history is read once, under the ticker's lock, for the check and the upsert.
    with store.lock(instrument.slug):
        history = store.load(instrument)
        # A batch that only repeats published bars (a no-new-data day) skips the GX suite.
        report = recheck_published(batch, history, instrument, as_of)
        changes = None if report is None else (0, 0)  # the recheck found nothing new
        if report is None:
            previous = history.loc[history["Date"] < batch["Date"].min()] if len(batch) else history
            previous = previous if len(previous) else None
            try:
                report = validate_prices(batch, instrument, as_of, previous=previous)
            except PriceValidationError as exc:
                if batch.attrs.get("notes"):
                    exc.report.setdefault("meta", {})["source_notes"] = list(batch.attrs["notes"])
                store.quarantine(instrument, as_of, _report_json(exc.report))
                raise
        if batch.attrs.get("notes"):  # the source's assumptions (Adj Close = Close, ...) on record
            report.meta["source_notes"] = list(batch.attrs["notes"])
        result = store.publish_locked(instrument, batch, as_of, report.to_json(), history, changes)
    summary = {
        "rows_added": result.rows_added,
        "rows_updated": result.rows_updated,
        "total_rows": result.total_rows,
        "last_date": result.last_date.isoformat() if result.last_date else None,
        "validation": "passed",
        "checks": len(report.results),
    }
    return summary, result.history


def _published_earlier(
    instrument: Instrument, as_of: date, store: PriceStore
) -> tuple[dict, pd.DataFrame]:
    """The outcome of a batch an earlier try of this step already handled (killed before it
    returned): published (its staged file is gone, its report is there) or quarantined."""
    import json

    report = store.report_path(instrument, as_of)
    if report.exists():
        history = store.load(instrument)
        summary = {
            "rows_added": 0,
            "rows_updated": 0,
            "total_rows": len(history),
            "last_date": history["Date"].iloc[-1].date().isoformat() if len(history) else None,
            "validation": "passed",
            "checks": len(json.loads(report.read_text()).get("results", [])),
        }
        return summary, history
    quarantined = store.quarantine_dir(instrument, as_of)
    if quarantined.exists():
        raise ValueError(
            f"{instrument.ticker}: the batch for {as_of} failed validation and was quarantined: "
            f"see {quarantined / 'validation.json'}"
        )
    raise FileNotFoundError(
        f"{instrument.ticker}: no staged batch for {as_of} at "
        f"{store.staging_path(instrument, as_of)}; run ingest first"
    )


def _report_json(report: dict) -> str:
    import json

    return json.dumps(report, sort_keys=True, indent=2, default=str)
