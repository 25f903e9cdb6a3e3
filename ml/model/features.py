"""Feature engineering: the notebook's 8 inputs per bar, computed from that bar and the one before.

Prices enter as logarithms so that `ml.model.windows` can express every price in a window relative to the
window's last Close (levels extrapolate badly; ratios do not). Each feature uses only bars up to
and including its own date, so no feature leaks the future.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

# The notebook's 8 inputs, in model order. The first 5 are log prices and "Volume" is log(1 + volume);
# windows.py re-expresses them relative to the window's last bar.
FEATURES = ("Open", "High", "Low", "Close", "Adj Close", "Volume", "Gap", "Return")
PRICE_FEATURES = ("Open", "High", "Low", "Close", "Adj Close")
TARGETS = ("High", "Low", "Close", "Adj Close")
# The targets a model is judged on (the gate, the ledger's live scores): Adj Close follows Close.
JUDGED_TARGETS = ("High", "Low", "Close")
# Floors inside the logs of the memory features (a flat bar has a zero range).
_RANGE_FLOOR = 1e-4


def feature_names(horizons: tuple[int, ...] = ()) -> tuple[str, ...]:
    """The model's inputs in order: the notebook's 8, then the volatility memory of `horizons`."""
    ranges = tuple(f"Range{k}" for k in horizons)
    vols = tuple(f"Vol{k}" for k in horizons if k > 1)
    return FEATURES + ranges + vols


def add_memory_features(out: pd.DataFrame, horizons: tuple[int, ...]) -> None:
    """Volatility's memory, HAR-style, as extra inputs of every bar (point in time).

    - Range<k>: log of the mean log range log(High/Low) over the last k bars (this one included);
    - Vol<k> (k > 1): log of the realized return volatility, sqrt(mean Return^2), over k bars.

    A window of 6 bars cannot see that volatility clusters over weeks and months; these carry
    it. Trailing means over at most k bars, fewer at the start of the history (min_periods=1),
    so every value uses only bars up to its own date.
    """
    import numpy as np

    log_range = (out["High"] - out["Low"]).clip(lower=0.0)
    squared = out["Return"] ** 2
    for k in horizons:
        mean_range = log_range.rolling(k, min_periods=1).mean()
        out[f"Range{k}"] = np.log(mean_range + _RANGE_FLOOR)
    for k in horizons:
        if k > 1:
            mean_squared = squared.rolling(k, min_periods=1).mean()
            out[f"Vol{k}"] = np.log(np.sqrt(mean_squared) + _RANGE_FLOOR)


def build_features(history: pd.DataFrame, horizons: tuple[int, ...] = ()) -> pd.DataFrame:
    """Per-bar features indexed like `history` (the first bar has no Return/Gap and is dropped).

    - Open..Adj Close: natural log of the price.
    - Volume: log(1 + volume) (0 for forex, where Yahoo reports none).
    - Gap: the time encoding for daily bars, log of calendar days since the previous bar (1 on a
      normal session, ~1.1 after a weekend, more after a holiday): it tells the model how much
      time, and so how much variance, separates two bars.
    - Return: log(Close_t / Close_{t-1}).
    - with `horizons`, the volatility memory of `add_memory_features` after these 8.
    """
    import numpy as np
    import pandas as pd

    if len(history) < 2:
        raise ValueError("need at least 2 bars to compute features")
    out = pd.DataFrame(index=history.index)
    for col in PRICE_FEATURES:
        out[col] = np.log(history[col].to_numpy(dtype="float64"))
    out["Volume"] = np.log1p(history["Volume"].to_numpy(dtype="float64"))
    days = history["Date"].diff().dt.days.to_numpy(dtype="float64")
    out["Gap"] = np.log(days)
    out["Return"] = out["Close"].diff()
    out.insert(0, "Date", history["Date"].to_numpy())
    out = out.iloc[1:].reset_index(drop=True)
    if horizons:
        add_memory_features(out, tuple(horizons))
    return out
