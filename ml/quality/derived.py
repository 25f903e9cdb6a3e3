"""The helper columns the suites assert on (`prepare_frame`): what GX cannot express on the raw
columns, derived in pandas and NumPy.

The tolerant OHLC bounds, the weekday, the gap to the previous bar, the age relative to `as_of`,
the log-returns and jumps of every price column, how far Open/High/Low and Adj Close lie from the
bar's Close, and Volume against its trailing median. The checks that look back read the published
bars before the batch too, so the seam with the store is judged like any two bars inside it.
"""

from __future__ import annotations

from datetime import date
from typing import TYPE_CHECKING, Any

from ml.data.schema import OUTPUT_COLUMNS
from ml.quality.suite import (
    ADJ_TO_CLOSE,
    AGE_DAYS,
    DEFAULT_OHLC_TOLERANCE,
    GAP_DAYS,
    HIGH_TOLERANT,
    LOG_RETURN,
    LOW_TOLERANT,
    NUMERIC_COLUMNS,
    PRICE_JUMP,
    RANGE_TO_CLOSE,
    VOLUME_MEDIAN_BARS,
    VOLUME_TO_MEDIAN,
    WEEKDAY,
    WEEKDAY_NAMES,
)

if TYPE_CHECKING:
    import pandas as pd


def _bars_before(
    previous: pd.DataFrame | None, first: pd.Timestamp, count: int
) -> pd.DataFrame | None:
    """The last `count` published bars strictly before the batch (batches overlap the recent
    history), oldest first, the context the seam checks need; None without any."""
    if previous is None or previous.empty or first != first:  # no history, or a NaT first date
        return None
    earlier = previous.loc[previous["Date"] < first]
    return earlier.sort_values("Date", kind="stable").tail(count)


def prepare_frame(
    batch: pd.DataFrame,
    as_of: date,
    *,
    previous: pd.DataFrame | None = None,
    tolerance: float = DEFAULT_OHLC_TOLERANCE,
) -> pd.DataFrame:
    """The batch (standard columns, original order) plus the helper columns the suite asserts on.

    The checks that look back (gap, jumps, the volume's trailing median) read the published bars
    before the batch too, so the seam between the published history and the batch is judged as
    any two bars inside it."""
    import numpy as np
    import pandas as pd

    df = batch[OUTPUT_COLUMNS].reset_index(drop=True).copy()
    dates = df["Date"]
    df[HIGH_TOLERANT] = df["High"] * (1 + tolerance)
    df[LOW_TOLERANT] = df["Low"] * (1 - tolerance)
    weekday = dates.dt.dayofweek
    df[WEEKDAY] = weekday.map(dict(enumerate(WEEKDAY_NAMES))).astype(object)

    context = _bars_before(previous, dates.iloc[0], VOLUME_MEDIAN_BARS)
    n0 = 0 if context is None else len(context)
    merged = (
        df[OUTPUT_COLUMNS] if not n0 else pd.concat([context[OUTPUT_COLUMNS], df[OUTPUT_COLUMNS]])
    )
    values = {c: merged[c].to_numpy(dtype="float64", na_value=np.nan) for c in NUMERIC_COLUMNS}
    all_dates = merged["Date"].reset_index(drop=True)

    df[GAP_DAYS] = (all_dates - all_dates.shift(1)).dt.days.to_numpy(dtype="float64")[n0:]
    df[AGE_DAYS] = (pd.Timestamp(as_of) - dates).dt.days.astype("float64")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        df[LOG_RETURN] = _log_ratio(values["Close"], _previous(values["Close"]))[n0:]
        jumps = [np.abs(_log_ratio(values[c], _previous(values[c]))) for c in _JUMP_COLUMNS]
        df[PRICE_JUMP] = np.fmax.reduce(jumps)[n0:]
        close = values["Close"]
        to_close = [np.abs(_log_ratio(values[c], close)) for c in ("Open", "High", "Low")]
        df[RANGE_TO_CLOSE] = np.fmax.reduce(to_close)[n0:]
        df[ADJ_TO_CLOSE] = np.abs(_log_ratio(values["Adj Close"], close))[n0:]
        volume = pd.Series(values["Volume"])
        median = volume.rolling(VOLUME_MEDIAN_BARS, min_periods=5).median().shift(1).to_numpy()
        ratio = np.where(median > 0, values["Volume"] / np.where(median > 0, median, 1.0), np.nan)
        df[VOLUME_TO_MEDIAN] = ratio[n0:]
    return df


_JUMP_COLUMNS = ("Open", "High", "Low", "Adj Close")


def _previous(values: Any) -> Any:
    import numpy as np

    return np.concatenate([[np.nan], values[:-1]])


def _log_ratio(a: Any, b: Any) -> Any:
    """log(a / b) where both are positive (and finite or not), NaN elsewhere: a missing or
    non-positive value is reported by its own check, not as a jump."""
    import numpy as np

    ok = (a > 0) & (b > 0)
    return np.where(ok, np.log(np.where(ok, a, 1.0)) - np.log(np.where(ok, b, 1.0)), np.nan)
