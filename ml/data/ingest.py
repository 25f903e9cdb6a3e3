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

    from ml.data.revisions import Revision

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
    # What the fetch said about the published bars it overlaps, when they were revised
    # (`ml.data.revisions`): a corporate action, a vendor correction, a full refresh.
    revision: dict | None = None


def _published(store: PriceStore, instrument: Instrument) -> pd.DataFrame | None:
    """The published history, read (and verified) once; None when there is none or it was
    corrupt (quarantined: the full history is fetched again)."""
    from ml.data.store import CorruptPriceFile

    try:
        history = store.load(instrument)
    except CorruptPriceFile as exc:
        log.warning("%s", exc)
        return None
    return history if len(history) else None


def _window(history: pd.DataFrame | None, as_of: date, settings: Settings) -> tuple[date, bool]:
    """The first date to fetch and whether it is a trailing window: the full history on the
    first load (or after a corrupt file was quarantined), a short trailing window after."""
    last = None if history is None else history["Date"].iloc[-1].date()
    if last is None or last < settings.history_start:
        return settings.history_start, False
    anchor = min(last, as_of)
    start = max(anchor - timedelta(days=settings.trailing_days), settings.history_start)
    return start, True


def stage_ticker(
    instrument: Instrument,
    as_of: date,
    settings: Settings,
    source: PriceSource | None = None,
    *,
    full_refresh: bool = False,
) -> StagedBatch:
    """Fetch the bars due for `as_of` and write them to staging (nothing is published here).

    The fetched bars are compared with the published ones they overlap (`classify_revision`):
    when the vendor re-scaled them (a split, a dividend) or corrected them, the whole history is
    fetched again and staged to replace the published file, so the store never mixes two scales.
    `full_refresh` does that unasked (a vendor correction of bars older than the window).
    """
    from ml.data.revisions import classify_revision

    source = source or get_source(settings)
    store = PriceStore(settings.data_dir)
    history = _published(store, instrument)
    start, incremental = _window(history, as_of, settings)
    if full_refresh:
        start, incremental = settings.history_start, False
    batch = source.fetch(instrument, start, as_of)
    revision: dict | None = None
    if history is not None:
        found = classify_revision(history, batch, batch.attrs.get("events"))
        if full_refresh:
            revision = {**found.to_dict(), "replace": True, "full_refresh": True}
        elif found.needs_refetch:
            batch, revision = _refetch_history(
                source, instrument, as_of, settings, history, batch, found
            )
        elif found.kind != "identical":
            revision = found.to_dict()
    if revision is not None:
        batch.attrs["revision"] = {**revision, "superseded_bars": len(history)}
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
        batch.attrs.get("revision"),
    )


def _refetch_history(
    source: PriceSource,
    instrument: Instrument,
    as_of: date,
    settings: Settings,
    history: pd.DataFrame,
    window: pd.DataFrame,
    seen: Revision,
) -> tuple[pd.DataFrame, dict]:
    """The whole history fetched again after the trailing `window` showed re-scaled or corrected
    bars (`seen`), and what it revised (staged with `replace`: publishing validates it whole and replaces
    the published file). Up to the newest published bar when that is later than `as_of` (a
    backfill), so no published bar is dropped. A full history that disagrees with the window, or
    whose vendor reports a split its earlier bars do not show, is marked `inconsistent`:
    publishing quarantines it and leaves the published file as it is."""
    from ml.data.revisions import classify_revision, vendor_disagreement

    end = max(as_of, history["Date"].iloc[-1].date())
    full = source.fetch(instrument, settings.history_start, end)
    found = classify_revision(history, full, full.attrs.get("events"))
    inconsistent = vendor_disagreement(window, full)
    if inconsistent or not found.needs_refetch:  # say what the window showed
        found = seen
    if inconsistent is None and found.kind == "correction" and not found.changed:
        inconsistent = (
            f"the vendor reports {found.vendor_event}, but its bars before that date are not "
            "re-adjusted"
        )
    log.warning(
        "%s: %s: fetched the full history again (%d bars)",
        instrument.ticker,
        found.describe(),
        len(full),
    )
    revision = {
        **found.to_dict(),
        "replace": True,
        "window_start": str(window["Date"].iloc[0].date()) if len(window) else None,
        "validated_as_of": end.isoformat(),
        "inconsistent": inconsistent,
    }
    return full, revision


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
    import json

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
    import json

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
    import json

    return json.dumps(report, sort_keys=True, indent=2, default=str)
