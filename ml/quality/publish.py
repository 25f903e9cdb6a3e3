"""Publishing: a staged batch becomes published bars only through its Great Expectations suite.

The fetch half (`ml.data.ingest.stage_ticker`) puts a ticker's due bars into staging; this half
validates them (`ml.quality.validation`) and merges them into the store atomically, or
quarantines them with their report. A batch that re-scales the published history (a split, a
dividend, a vendor correction) replaces the whole file, validated whole, or nothing. Publishing
lives with validation, not with the data layer: validation is the only door into the store, and
`ml.data` (sources, store, fetch) depends on nothing above it.
"""

from __future__ import annotations

import json
import logging
from datetime import date
from typing import TYPE_CHECKING

from ml.config import Settings
from ml.data.store import PriceStore
from ml.universe import Instrument

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


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
    revision = batch.attrs.get("revision") or None
    if revision and revision.get("replace"):
        return _replace_history(instrument, as_of, store, batch, revision)
    # The history is read once, under the ticker's lock, for the check and the upsert.
    with store.lock(instrument.slug):
        history = store.load(instrument)
        # A batch that only repeats published bars (a no-new-data day) skips the GX suite.
        report = recheck_published(batch, history, instrument, as_of)
        changes = None if report is None else (0, 0)  # the recheck found nothing new
        if report is None:
            try:
                report = validate_prices(batch, instrument, as_of, previous=history)
            except PriceValidationError as exc:
                _annotate(exc.report.setdefault("meta", {}), batch, revision)
                store.quarantine(instrument, as_of, _report_json(exc.report))
                raise
        _annotate(report.meta, batch, revision)
        result = store.publish_locked(instrument, batch, as_of, report.to_json(), history, changes)
    summary = _summary(result.rows_added, result.rows_updated, result.history, len(report.results))
    event = revision if result.changed else _stored_revision(store, instrument, as_of)
    if event and event.get("kind") not in (None, "identical", "newest", "unchecked"):
        summary["revision"] = event.get("message") or event.get("description")
    return summary, result.history


def _replace_history(
    instrument: Instrument, as_of: date, store: PriceStore, batch: pd.DataFrame, revision: dict
) -> tuple[dict, pd.DataFrame]:
    """Publish a staged full history in place of the published one: the whole suite on it, then
    one atomic write, the superseded file kept under quarantine for audit. A history that fails,
    or that the vendor contradicted while it was fetched, is quarantined instead (raising
    HistoryRevisionError) and the published file is left as it is."""
    from ml.quality.validation import PriceValidationError, validate_prices

    what = revision.get("description") or "full refresh"
    checked_as_of = date.fromisoformat(revision.get("validated_as_of") or as_of.isoformat())
    with store.lock(instrument.slug):
        history = store.load(instrument)
        if revision.get("inconsistent"):
            report = _revision_report(instrument, as_of, batch, revision)
            target = store.quarantine(instrument, as_of, _report_json(report))
            raise HistoryRevisionError(
                f"{instrument.ticker}: {what}: the full history fetched to re-adjust the "
                f"published one is not consistent ({revision['inconsistent']}); it was "
                f"quarantined to {target} and the published history is unchanged"
                f"{_way_out(instrument, as_of)}"
            )
        try:
            report = validate_prices(batch, instrument, checked_as_of)
        except PriceValidationError as exc:
            _annotate(exc.report.setdefault("meta", {}), batch, revision)
            target = store.quarantine(instrument, as_of, _report_json(exc.report))
            raise HistoryRevisionError(
                f"{instrument.ticker}: {what}: the full history fetched to re-adjust the "
                f"published one failed validation; it was quarantined to {target} and the "
                f"published history is unchanged{_way_out(instrument, as_of)}\n{exc}"
            ) from exc
        message = f"{what}: history re-adjusted, {len(batch):,} bars"
        if revision.get("full_refresh") and revision.get("kind") == "identical":
            message = f"full refresh: {len(batch):,} bars fetched, the published bars unchanged"
        revision = {**revision, "message": message}
        _annotate(report.meta, batch, revision)
        result = store.replace_locked(instrument, batch, as_of, report.to_json(), history)
    if result.superseded is not None:
        log.warning(
            "%s: %s (the superseded file: %s)", instrument.ticker, message, result.superseded
        )
    summary = _summary(result.rows_added, result.rows_updated, result.history, len(report.results))
    if result.changed or not revision.get("full_refresh"):
        summary["revision"] = message
    return summary, result.history


class HistoryRevisionError(ValueError):
    """A revised history (a corporate action, a vendor correction, a full refresh) could not be
    published: quarantined with its report, the published history left as it was."""


def _way_out(instrument: Instrument, as_of: date) -> str:
    return (
        ". Once the vendor serves a consistent series (or the file is fixed), run "
        f"`python -m ml ingest --full-refresh --tickers {instrument.ticker} --date "
        f"{as_of.isoformat()}` (or the DAG with full_refresh)"
    )


def _revision_report(
    instrument: Instrument, as_of: date, batch: pd.DataFrame, revision: dict
) -> dict:
    """The quarantine report of a full history the vendor contradicted (no suite ran on it)."""
    return {
        "success": False,
        "ticker": instrument.ticker,
        "as_of": as_of.isoformat(),
        "results": [],
        "meta": {"rows": len(batch), "revision": revision},
    }


def _annotate(meta: dict, batch: pd.DataFrame, revision: dict | None) -> None:
    """What a report's `meta` must say besides GX's verdicts: the source's assumptions (Adj
    Close = Close, ...) and the revision this batch brings."""
    if batch.attrs.get("notes"):
        meta["source_notes"] = list(batch.attrs["notes"])
    if revision:
        meta["revision"] = revision


def _summary(added: int, updated: int, history: pd.DataFrame, checks: int) -> dict:
    return {
        "rows_added": added,
        "rows_updated": updated,
        "total_rows": len(history),
        "last_date": history["Date"].iloc[-1].date().isoformat() if len(history) else None,
        "validation": "passed",
        "checks": checks,
    }


def _stored_revision(store: PriceStore, instrument: Instrument, as_of: date) -> dict | None:
    """The revision recorded in the report of the run that last changed `as_of`'s data, so a
    re-run of the date reports the same event."""

    path = store.report_path(instrument, as_of)
    try:
        return json.loads(path.read_text()).get("meta", {}).get("revision")
    except (OSError, ValueError, AttributeError):
        return None


def _published_earlier(
    instrument: Instrument, as_of: date, store: PriceStore
) -> tuple[dict, pd.DataFrame]:
    """The outcome of a batch an earlier try of this step already handled (killed before it
    returned): published (its staged file is gone, its report is there) or quarantined."""

    report = store.report_path(instrument, as_of)
    if report.exists():
        history = store.load(instrument)
        summary = _summary(0, 0, history, len(json.loads(report.read_text()).get("results", [])))
        event = _stored_revision(store, instrument, as_of)
        if event and event.get("message"):
            summary["revision"] = event["message"]
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

    return json.dumps(report, sort_keys=True, indent=2, default=str)
