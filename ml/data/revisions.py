"""Vendor revisions of published bars: what changed between the store and a fresh fetch.

Vendors that serve adjusted prices rewrite every earlier bar on a corporate action: a split scales
Open, High, Low, Close and Adj Close of all bars before its date (and Volume the other way), a
dividend scales Adj Close alone. A daily ingest re-fetches only a trailing window, so such an event
shows up as overlapping bars that come back with a common factor. `classify_revision` compares
the published bars with the fetched ones they overlap and says which case it is; the ingest then
re-fetches the whole history for everything but the normal cases (`Revision.needs_refetch`), so
the store never becomes a patchwork of two scales.

The kinds:

    identical   every overlapping bar equal (new bars may follow)
    newest      only the newest overlapping bars changed, without a common factor (a vendor
                finishing its last bars): upserted as they come
    split       one common factor on every price of the bars before a date, Volume the other way
    dividend    one common factor on Adj Close alone, before a date
    correction  anything else (several events, a fixed old bar, a vendor whose split event has not
                reached its earlier bars yet)
    unchecked   the fetched batch has repeated dates: validation refuses it, nothing to compare
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from ml.data.schema import PRICE_COLUMNS

if TYPE_CHECKING:
    import pandas as pd


# How many of the newest overlapping bars a vendor may still revise without a common factor
# (a bar fetched before its session's final print, then its final values).
REVISABLE_BARS = 2


# Ratios of one bar's columns that agree within this relative spread are one common factor. Yahoo
# serves float32 prices (a relative error near 6e-8); files rounded to cents on a $10 stock differ
# by up to 5e-4 from the exact factor.
FACTOR_TOLERANCE = 1e-3


# A common factor on every price at least this far from 1 (in log) is a split; a smaller one is
# not a corporate action any vendor has (it is called a correction).
MIN_SPLIT_LOG_FACTOR = math.log(1.05)


_PRICES = ["Open", "High", "Low", "Close"]


@dataclass(frozen=True)
class Revision:
    """What a fetch says about the published bars it overlaps.

    `date` is the first session at the new scale (the event's ex-date as the bars show it);
    `factor` the ratio new / published of the re-scaled bars (Close for a split, Adj Close for a
    dividend); `changed` the number of overlapping bars whose values differ.
    """

    kind: str
    changed: int = 0
    date: str | None = None
    factor: float | None = None
    # The vendor's own event for this date, when it publishes them (Yahoo's actions).
    vendor_event: str | None = None

    @property
    def needs_refetch(self) -> bool:
        return self.kind in ("split", "dividend", "correction")

    def describe(self) -> str:
        """One phrase for reports: "split 2:1 on 2024-06-24", "dividend on 2024-06-24 (Adj Close
        of earlier bars x0.9901)", "vendor correction of 3 bars from 2024-06-18"."""
        when = f" on {self.date}" if self.date else ""
        if self.kind == "split" and self.factor:
            return f"split {split_ratio(self.factor)}{when}"
        if self.kind == "dividend" and self.factor:
            return f"dividend{when} (Adj Close of earlier bars x{self.factor:.6g})"
        if self.kind == "correction":
            text = f"vendor correction of {self.changed} published bar(s)"
            return text + (f" from {self.date}" if self.date else "")
        if self.kind == "newest":
            return f"the newest {self.changed} bar(s) revised"
        if self.kind == "unchecked":
            return "not compared (the fetched bars repeat a date)"
        return "no revision"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "description": self.describe()}


def split_ratio(factor: float) -> str:
    """The split as shares after : shares before, from the price factor new/old (0.5 -> "2:1",
    10 -> "1:10", 1/1.5 -> "3:2")."""
    ratio = Fraction(1 / factor).limit_denominator(100)
    return f"{ratio.numerator}:{ratio.denominator}"


def _common(ratios: Any) -> float | None:
    """The one factor all finite, positive `ratios` share (within FACTOR_TOLERANCE), else None."""
    import numpy as np

    values = np.asarray(ratios, dtype="float64").ravel()
    if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        return None
    middle = float(np.median(values))
    return middle if np.all(np.abs(values / middle - 1) <= FACTOR_TOLERANCE) else None


def classify_revision(
    history: pd.DataFrame, batch: pd.DataFrame, events: list[dict[str, Any]] | None = None
) -> Revision:
    """Compare the fetched `batch` with the published `history` on the dates both hold.

    `events` are the vendor's own split/dividend events in the batch's span (dicts with "date"
    and "split" or "dividend"), when it publishes them: a split event whose bars show no factor
    yet (the vendor has not re-adjusted its earlier bars) is a correction, so the ingest asks for
    the whole history again and validation judges that.
    """
    import numpy as np

    if batch.empty or history.empty:
        return Revision("identical")
    if batch["Date"].duplicated().any():
        return Revision("unchecked")
    old = history.drop_duplicates("Date", keep="last").set_index("Date")
    new = batch.set_index("Date")
    dates = new.index.intersection(old.index).sort_values()
    columns = PRICE_COLUMNS[1:]
    a = old.loc[dates, columns].to_numpy(dtype="float64")
    b = new.loc[dates, columns].to_numpy(dtype="float64")
    differs = ~((a == b) | (np.isnan(a) & np.isnan(b)))
    changed = differs.any(axis=1)
    n_changed = int(changed.sum())
    first_new = new.index[~new.index.isin(old.index)]
    after = str(first_new.min().date()) if len(first_new) else None
    split_events = [e for e in events or () if e.get("split")]
    if not n_changed:
        last = str(dates[-1].date()) if len(dates) else None
        unadjusted = [e for e in split_events if last is not None and e["date"] > last]
        if unadjusted:
            # The vendor reports a split in the new bars while the bars before it kept their
            # scale: its history is not re-adjusted yet (or the event is wrong).
            e = unadjusted[0]
            return Revision("correction", 0, e["date"], None, _event_text(e))
        return Revision("identical")

    # A corporate action re-scales a prefix: every overlapping bar before its date, none after.
    last_changed = int(np.flatnonzero(changed)[-1])
    prefix = bool(changed[: last_changed + 1].all())
    event_date = str(dates[last_changed + 1].date()) if last_changed + 1 < len(dates) else after
    rows = slice(0, last_changed + 1)
    price_cols = [columns.index(c) for c in _PRICES]
    adj, vol = columns.index("Adj Close"), columns.index("Volume")
    vendor = _vendor_event(events, event_date, dates, last_changed)

    if prefix:
        price_factor = _common(b[rows][:, [*price_cols, adj]] / a[rows][:, [*price_cols, adj]])
        if price_factor is not None and abs(math.log(price_factor)) >= MIN_SPLIT_LOG_FACTOR:
            return Revision("split", n_changed, event_date, price_factor, vendor)
        prices_equal = not differs[rows][:, [*price_cols, vol]].any()
        adj_factor = _common(b[rows, adj] / a[rows, adj])
        if prices_equal and adj_factor is not None:
            return Revision("dividend", n_changed, event_date, adj_factor, vendor)
    if not changed[: max(len(dates) - REVISABLE_BARS, 0)].any():
        return Revision("newest", n_changed, str(dates[np.flatnonzero(changed)[0]].date()))
    first = str(dates[int(np.flatnonzero(changed)[0])].date())
    return Revision("correction", n_changed, first, None, vendor)


def _event_text(event: dict[str, Any]) -> str:
    if event.get("split"):
        return f"{event['date']}: split {split_ratio(1 / float(event['split']))}"
    return f"{event['date']}: dividend {float(event['dividend']):.6g}"


def _vendor_event(
    events: list[dict[str, Any]] | None, event_date: str | None, dates: Any, last_changed: int
) -> str | None:
    """The vendor's event that explains a re-scaling first seen at `event_date`: one dated after
    the last re-scaled bar and on or before `event_date` (an event on a holiday is reported for
    that day, or for the session before it, and takes effect at the next session)."""
    if not events or event_date is None:
        return None
    low = str(dates[last_changed].date())
    found = [e for e in events if low <= e["date"] <= event_date]
    return "; ".join(_event_text(e) for e in found) or None


def vendor_disagreement(window: pd.DataFrame, full: pd.DataFrame) -> str | None:
    """Where a full refetch disagrees with the trailing window fetched moments before it, on the
    window's dates (its newest bar aside: a session may still be printing), or None.

    Two answers of one vendor that disagree cannot both be its current series: nothing of them
    is published."""
    import numpy as np

    if window.empty:
        return None
    columns = PRICE_COLUMNS[1:]
    w = window.iloc[:-1].drop_duplicates("Date").set_index("Date")
    f = full.drop_duplicates("Date").set_index("Date")
    missing = w.index.difference(f.index)
    if len(missing):
        return (
            f"the full history lacks {len(missing)} bar(s) of the window, first {missing[0].date()}"
        )
    a = w[columns].to_numpy(dtype="float64")
    b = f.loc[w.index, columns].to_numpy(dtype="float64")
    close = np.isclose(a, b, rtol=1e-9, atol=0.0) | (np.isnan(a) & np.isnan(b))
    bad = np.flatnonzero(~close.all(axis=1))
    if not bad.size:
        return None
    i = int(bad[0])
    col = columns[int(np.flatnonzero(~close[i])[0])]
    return (
        f"on {w.index[i].date()} the window has {col} {a[i, columns.index(col)]:.6g}, the full "
        f"history {b[i, columns.index(col)]:.6g} ({bad.size} bar(s) differ)"
    )


def max_relative_difference(expected: pd.DataFrame, actual: pd.DataFrame) -> float:
    """The largest relative difference between two bar frames on the same dates, over every price
    column and Volume (inf when their dates differ): the measure of "the store equals a fresh
    full fetch"."""
    import numpy as np

    if (
        len(expected) != len(actual)
        or not (expected["Date"].to_numpy() == actual["Date"].to_numpy()).all()
    ):
        return math.inf
    columns = PRICE_COLUMNS[1:]
    a = expected[columns].to_numpy(dtype="float64")
    b = actual[columns].to_numpy(dtype="float64")
    scale = np.maximum(np.abs(a), np.abs(b))
    diff = np.where(scale > 0, np.abs(a - b) / np.where(scale > 0, scale, 1.0), 0.0)
    return float(diff.max()) if diff.size else 0.0
