"""The price schema every part of the pipeline shares: columns, the empty frame, the source error.

Its own module so that the sources, the Yahoo client, the store and validation can all use it
without importing each other.
"""

from __future__ import annotations

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
