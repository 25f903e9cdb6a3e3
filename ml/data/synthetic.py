"""The offline synthetic price source: deterministic daily bars per (ticker, date).

A GARCH(1,1) path per ticker over a fixed span, so every date's bar depends only on the ticker
and the date: backfills and tests are reproducible, and a re-run fetches the same bars. The data
are SYNTHETIC: they carry no information about real markets.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import date
from functools import lru_cache
from typing import TYPE_CHECKING

from ml.data.schema import PriceSourceError, normalize_frame
from ml.universe import Instrument

if TYPE_CHECKING:
    import pandas as pd


SYNTHETIC_EPOCH = date(2000, 1, 3)
SYNTHETIC_LAST = date(2035, 12, 31)
# The price each synthetic series is scaled to on ANCHOR_DATE: near the instrument's real level.
ANCHOR_DATE = date(2024, 6, 28)
ANCHOR_PRICES = {
    "AMD": 162.0,
    "BYDDY": 59.0,
    "ZI": 12.7,
    "PFE": 28.0,
    "NU": 12.9,
    "WMT": 67.7,
    "F": 12.5,
    "GOOGL": 182.0,
    "Z": 46.3,
    "NVDA": 123.5,
    "MRNA": 118.7,
    "SPY": 544.2,
    "TQQQ": 60.6,
    "IVV": 547.2,
    "VOO": 500.1,
    "VTI": 267.5,
    "QQQ": 479.1,
    "VTV": 160.4,
    "BND": 72.1,
    "IWF": 364.5,
    "XLK": 226.2,
    "GLD": 215.0,
    "SCHD": 77.4,
    "EURUSD=X": 1.07,
    "JPY=X": 160.8,
    "MXN=X": 18.3,
    "SOL-USD": 146.0,
    "ZB=F": 117.8,
    "HG=F": 4.37,
    "ZC=F": 397.8,
    "ZM=F": 371.0,
}
# Annualized volatility, dividend yield and typical daily volume by asset class.
_CLASS_PROFILE = {
    "stock": (0.40, 0.010, 2.0e7),
    "etf": (0.18, 0.015, 5.0e6),
    "forex": (0.08, 0.0, 0.0),
    "crypto": (0.75, 0.0, 2.0e9),
    "future": (0.22, 0.0, 1.5e5),
}


def _seed(ticker: str) -> int:
    return int.from_bytes(hashlib.sha256(f"synthetic:{ticker}".encode()).digest()[:8], "little")


@lru_cache(maxsize=1024)
def _synthetic_series(ticker: str, asset_class: str) -> pd.DataFrame:
    """The whole fixed-span series of one ticker: every date's bar depends only on (ticker, date)."""
    import numpy as np
    import pandas as pd

    freq = "D" if asset_class == "crypto" else "B"
    dates = pd.date_range(SYNTHETIC_EPOCH, SYNTHETIC_LAST, freq=freq)
    n = len(dates)
    rng = np.random.default_rng(_seed(ticker))
    annual_vol, div_yield, volume_level = _CLASS_PROFILE[asset_class]
    per_year = 365 if asset_class == "crypto" else 252
    base_var = (annual_vol**2) / per_year

    # GARCH(1,1) daily variance: volatility clusters, so the next bar's range is predictable.
    alpha, beta = 0.08, 0.90
    omega = base_var * (1 - alpha - beta)
    shocks = rng.standard_t(df=5, size=n) / np.sqrt(5 / 3)
    # The recursion on plain floats: the same IEEE operations in the same order as on numpy
    # scalars (bit for bit), several times faster over the ~9,400 bars of the span.
    var_list = [0.0] * n
    ret_list = [0.0] * n
    v, r = base_var, 0.0
    for t, shock in enumerate(shocks.tolist()):
        if t:
            v = omega + alpha * r**2 + beta * v
        r = math.sqrt(v) * shock
        var_list[t], ret_list[t] = v, r
    var, ret = np.array(var_list), np.array(ret_list)
    sigma = np.sqrt(var)
    drift = 0.03 / per_year if asset_class in ("stock", "etf") else 0.0
    log_close = np.cumsum(ret + drift - 0.5 * var)

    # Intraday path: the open gaps from the last close, high/low extend beyond open and close by a
    # fraction of the day's volatility.
    gap = sigma * 0.25 * rng.standard_normal(n)
    log_open = np.concatenate([[0.0], log_close[:-1]]) + gap
    up = np.abs(rng.standard_normal(n)) * sigma * 0.6
    down = np.abs(rng.standard_normal(n)) * sigma * 0.6
    log_high = np.maximum(log_open, log_close) + up
    log_low = np.minimum(log_open, log_close) - down

    anchor_idx = int(np.searchsorted(dates.values, np.datetime64(ANCHOR_DATE)))
    anchor_idx = min(anchor_idx, n - 1)
    scale = np.log(ANCHOR_PRICES.get(ticker, 100.0)) - log_close[anchor_idx]
    close = np.exp(log_close + scale)
    years_to_end = (dates[-1] - dates).days.to_numpy() / 365.25
    adj_factor = np.exp(-div_yield * years_to_end)
    if volume_level:
        volume = np.round(
            volume_level * np.exp(0.35 * rng.standard_normal(n)) * (sigma / sigma.mean())
        )
    else:
        volume = np.zeros(n)
    digits = 6 if close[anchor_idx] < 10 else 4
    frame = pd.DataFrame(
        {
            "Date": dates.astype("datetime64[ns]"),
            "Open": np.round(np.exp(log_open + scale), digits),
            "High": np.round(np.exp(log_high + scale), digits),
            "Low": np.round(np.exp(log_low + scale), digits),
            "Close": np.round(close, digits),
            "Adj Close": np.round(close * adj_factor, digits),
            "Volume": volume.astype("float64"),
        }
    )
    frame["High"] = frame[["Open", "High", "Close"]].max(axis=1)
    frame["Low"] = frame[["Open", "Low", "Close"]].min(axis=1)
    return frame


@dataclass(frozen=True)
class SyntheticSource:
    """Deterministic, offline bars per (ticker, date): the same date always gives the same bar.

    Equities, ETFs, futures and forex trade on weekdays, crypto every day; volatility clusters
    (GARCH), OHLC are consistent, forex has zero volume, levels are near each instrument's real
    price in mid-2024. The data are SYNTHETIC: they carry no information about real markets.
    """

    name: str = "synthetic"
    local: bool = True

    def fetch(self, instrument: Instrument, start: date, end: date) -> pd.DataFrame:
        if start > end:
            raise PriceSourceError(f"{instrument.ticker}: start {start} is after end {end}")
        if end > SYNTHETIC_LAST or start < SYNTHETIC_EPOCH:
            raise PriceSourceError(
                f"{instrument.ticker}: synthetic data span {SYNTHETIC_EPOCH}..{SYNTHETIC_LAST}"
            )
        import pandas as pd

        series = _synthetic_series(instrument.ticker, instrument.asset_class)
        # Only the asked span goes through normalize_frame (its own date filter keeps the same
        # rows: these dates are already midnight, tz-naive).
        lo = series["Date"].searchsorted(pd.Timestamp(start), side="left")
        hi = series["Date"].searchsorted(pd.Timestamp(end), side="right")
        return normalize_frame(series.iloc[lo:hi], instrument.ticker, start, end)
