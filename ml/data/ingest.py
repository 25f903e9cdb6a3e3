"""Ingestion of one ticker for one logical date: fetch its due bars into staging.

The other half, validating a staged batch and publishing it, is `ml.quality.publish`: the data
layer does not validate, so it depends on nothing above it.
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
