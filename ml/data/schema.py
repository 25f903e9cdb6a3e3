"""The price schema every part of the pipeline shares: columns, the empty frame, the source error,
and `normalize_frame`, which brings a source's frame to that shape.

Its own module so that the sources, the Yahoo client, the store and validation can all use it
without importing each other.
"""

from __future__ import annotations

from datetime import date
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

PRICE_COLUMNS = ["Date", "Open", "High", "Low", "Close", "Adj Close", "Volume"]
OUTPUT_COLUMNS = [*PRICE_COLUMNS, "Ticker"]


class PriceSourceError(RuntimeError):
    """A source could not deliver bars for a ticker (network, unknown ticker, bad file)."""


def empty_prices(columns: list[str] = OUTPUT_COLUMNS) -> pd.DataFrame:
    """A frame with the standard `columns` (dates, floats, the ticker as text) and no rows."""
    import pandas as pd

    dtypes = {"Date": "datetime64[ns]", "Ticker": "object"}
    return pd.DataFrame({c: pd.Series(dtype=dtypes.get(c, "float64")) for c in columns})


def session_dates(values: pd.Series) -> pd.Series:
    """Each value's local session date: time zones (even mixed, across a DST change) are dropped,
    never converted, so a bar stays on the exchange's own calendar day."""
    import pandas as pd

    try:
        dates = pd.to_datetime(values, utc=False)
    except (ValueError, TypeError):
        dates = pd.Series(
            [
                pd.Timestamp(v).tz_localize(None) if pd.Timestamp(v).tzinfo else pd.Timestamp(v)
                for v in values
            ],
            index=values.index,
        )
    if getattr(dates.dt, "tz", None) is not None:
        dates = dates.dt.tz_localize(None)
    return dates


def normalize_frame(frame: pd.DataFrame, ticker: str, start: date, end: date) -> pd.DataFrame:
    """Bring a frame in yfinance's column layout to the standard shape.

    Columns are matched by name; `Date` may be a column or the index, with or without time zone
    (the session date is what counts). Rows outside [start, end] are dropped. Values are not
    checked here: that is the validation suite's job, so bad rows reach it and get reported.
    """
    import pandas as pd

    df = frame.copy()
    if "Date" not in df.columns:
        df = df.reset_index()
        first = df.columns[0]
        if first != "Date":
            df = df.rename(columns={first: "Date"})
    missing = [c for c in PRICE_COLUMNS if c not in df.columns]
    if missing:
        raise PriceSourceError(f"{ticker}: source frame is missing column(s) {missing}")
    dates = session_dates(df["Date"])
    df["Date"] = dates.dt.normalize().astype("datetime64[ns]")
    df = df[PRICE_COLUMNS]
    for col in PRICE_COLUMNS[1:]:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    mask = (df["Date"] >= pd.Timestamp(start)) & (df["Date"] <= pd.Timestamp(end))
    df = df.loc[mask].reset_index(drop=True)
    df["Ticker"] = ticker
    return df
