"""Feature engineering: the notebook's 8 inputs per bar, computed from that bar and the one before.

Prices enter as logarithms so that `ml.windows` can express every price in a window relative to the
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


def build_features(history: pd.DataFrame) -> pd.DataFrame:
    """Per-bar features indexed like `history` (the first bar has no Return/Gap and is dropped).

    - Open..Adj Close: natural log of the price.
    - Volume: log(1 + volume) (0 for forex, where Yahoo reports none).
    - Gap: the time encoding for daily bars, log of calendar days since the previous bar (1 on a
      normal session, ~1.1 after a weekend, more after a holiday): it tells the model how much
      time, and so how much variance, separates two bars.
    - Return: log(Close_t / Close_{t-1}).
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
    return out.iloc[1:].reset_index(drop=True)
