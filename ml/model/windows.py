"""Windowing, chronological split and train-only scaling.

A window is `window` consecutive bars of features; its target is the next bar's High, Low, Close and
Adj Close, learned as log-ratios to the window's last Close (last Adj Close for Adj Close) and
returned to users as prices. Inside each window, prices and volume are expressed relative to the
window's last bar. Windows are split chronologically (train / validation / test); scaling
statistics come from the train block only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ml.model.features import FEATURES, PRICE_FEATURES, TARGETS, build_features, feature_names

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

MIN_WINDOWS = 60
# Each feature that is re-expressed relative to the window's last bar, and the column it is relative to.
_RELATIVE_TO = {
    **{c: "Close" for c in PRICE_FEATURES if c != "Adj Close"},
    "Adj Close": "Adj Close",
    "Volume": "Volume",
}


class InsufficientHistoryError(ValueError):
    """Too few bars to cut train, validation and test windows."""


@dataclass(frozen=True)
class Scaler:
    """Per-column standardization fitted on training data only."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray) -> Scaler:
        import numpy as np

        flat = values.reshape(-1, values.shape[-1])
        std = flat.std(axis=0)
        return cls(flat.mean(axis=0), np.where(std < 1e-12, 1.0, std))

    def transform(self, values: np.ndarray) -> np.ndarray:
        return (values - self.mean) / self.std

    def inverse(self, values: np.ndarray) -> np.ndarray:
        return values * self.std + self.mean

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @classmethod
    def from_dict(cls, data: dict[str, list[float]]) -> Scaler:
        import numpy as np

        return cls(
            np.asarray(data["mean"], dtype="float64"), np.asarray(data["std"], dtype="float64")
        )


@dataclass(frozen=True)
class WindowSet:
    """Windows and everything needed to turn their predictions into prices and score them."""

    x: np.ndarray  # (n, window, n_features) relative features
    y: np.ndarray  # (n, 4) log-ratio targets
    last_close: np.ndarray  # (n,)
    last_adj_close: np.ndarray  # (n,)
    actual: np.ndarray  # (n, 4) next bar's prices
    high_ratio: np.ndarray  # (n,) trailing mean of High_t / Close_{t-1}, up to the window's end
    low_ratio: np.ndarray  # (n,)
    target_dates: np.ndarray  # (n,) dates of the predicted bars

    def __len__(self) -> int:
        return len(self.y)

    def take(self, start: int, stop: int) -> WindowSet:
        return WindowSet(*(getattr(self, f)[start:stop] for f in self.__dataclass_fields__))


@dataclass(frozen=True)
class SplitData:
    train: WindowSet
    val: WindowSet
    test: WindowSet
    x_scaler: Scaler
    y_scaler: Scaler

    def scaled(self, part: WindowSet) -> tuple[np.ndarray, np.ndarray]:
        return self.x_scaler.transform(part.x), self.y_scaler.transform(part.y)


def _relative_inputs(
    features: pd.DataFrame, window: int, names: tuple[str, ...] = FEATURES
) -> np.ndarray:
    """(n_windows_incl_last, window, n_features) with prices/volume relative to each window's last
    bar; `names` are the input columns in model order (the memory features stay as they are)."""
    import numpy as np
    from numpy.lib.stride_tricks import sliding_window_view

    values = features[list(names)].to_numpy(dtype="float64")
    windows = sliding_window_view(values, window, axis=0).transpose(0, 2, 1).copy()
    last = windows[:, -1:, :].copy()
    for col, anchor in _RELATIVE_TO.items():
        windows[:, :, names.index(col)] -= last[:, :, names.index(anchor)]
    return np.ascontiguousarray(windows)


def trailing_ratios(features: pd.DataFrame, lookback: int) -> tuple[np.ndarray, np.ndarray]:
    """Per feature row, the range-aware naive's ratios: trailing means over `lookback` bars (fewer
    at the start) of High_t / Close_{t-1} and Low_t / Close_{t-1}, up to and including the row."""
    import numpy as np
    import pandas as pd

    prev_log_close = features["Close"].to_numpy() - features["Return"].to_numpy()
    out = []
    for col in ("High", "Low"):
        ratio = np.exp(features[col].to_numpy() - prev_log_close)
        out.append(pd.Series(ratio).rolling(lookback, min_periods=1).mean().to_numpy())
    return out[0], out[1]


def make_windows(
    history: pd.DataFrame, window: int, naive_lookback: int = 20, horizons: tuple[int, ...] = ()
) -> WindowSet:
    """Cut every window whose next bar exists in `history` (sorted by date, validated); with
    `horizons`, each bar also carries the volatility memory of `ml.model.features`."""
    import numpy as np

    if len(history) < window + 2:
        raise InsufficientHistoryError(
            f"{len(history)} bars is too few for windows of {window} plus a target"
        )
    feats = build_features(history, horizons)
    if len(feats) < window + 1:
        raise InsufficientHistoryError(
            f"{len(history)} bars is too few for windows of {window} plus a target"
        )
    x_all = _relative_inputs(feats, window, feature_names(horizons))
    ends = np.arange(window - 1, len(feats) - 1)  # feature row of each window's last bar
    log_close = feats["Close"].to_numpy()
    log_adj = feats["Adj Close"].to_numpy()
    high_ratio, low_ratio = trailing_ratios(feats, naive_lookback)
    nxt = ends + 1
    y = np.stack(
        [
            feats["High"].to_numpy()[nxt] - log_close[ends],
            feats["Low"].to_numpy()[nxt] - log_close[ends],
            log_close[nxt] - log_close[ends],
            log_adj[nxt] - log_adj[ends],
        ],
        axis=1,
    )
    prices = history.iloc[1:].reset_index(drop=True)
    actual = prices[list(TARGETS)].to_numpy(dtype="float64")[nxt]
    return WindowSet(
        x=x_all[: len(ends)],
        y=y,
        last_close=prices["Close"].to_numpy(dtype="float64")[ends],
        last_adj_close=prices["Adj Close"].to_numpy(dtype="float64")[ends],
        actual=actual,
        high_ratio=high_ratio[ends],
        low_ratio=low_ratio[ends],
        target_dates=feats["Date"].to_numpy()[nxt],
    )


def split_sizes(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    # The epsilon keeps products such as 90 * 0.7 = 62.999... from losing a window to rounding.
    n_train = math.floor(n * fractions[0] + 1e-9)
    n_val = math.floor(n * fractions[1] + 1e-9)
    return n_train, n_val, n - n_train - n_val


def prepare(
    history: pd.DataFrame,
    window: int,
    fractions: tuple[float, float, float] = (0.7, 0.2, 0.1),
    naive_lookback: int = 20,
    horizons: tuple[int, ...] = (),
) -> SplitData:
    """Windows split chronologically, with scalers fitted on the train block only."""
    windows = make_windows(history, window, naive_lookback, horizons)
    if len(windows) < MIN_WINDOWS:
        raise InsufficientHistoryError(
            f"{len(windows)} windows from {len(history)} bars; need at least {MIN_WINDOWS}"
        )
    n_train, n_val, _ = split_sizes(len(windows), fractions)
    return split_at(windows, n_train, n_train + n_val, len(windows))


def split_at(windows: WindowSet, val_start: int, test_start: int, test_stop: int) -> SplitData:
    """Train = windows[:val_start], validation up to `test_start`, test up to `test_stop`; the
    scalers see the train block only. Windows after `test_stop` are not used."""
    train = windows.take(0, val_start)
    val = windows.take(val_start, test_start)
    test = windows.take(test_start, test_stop)
    return SplitData(train, val, test, Scaler.fit(train.x), Scaler.fit(train.y))


def rolling_origins(
    n_windows: int, n_origins: int, span: float = 0.3, val_share: float = 2 / 9
) -> list[tuple[int, int, int]]:
    """(val_start, test_start, test_stop) of `n_origins` consecutive test blocks that tile the
    last `span` of the windows: a rolling-origin backtest. Before each origin, the windows are
    split train/validation as 7:2 (the default 70/20 split), so each fit sees only its past."""
    first = n_windows - math.floor(n_windows * span)
    size = (n_windows - first) // n_origins
    out = []
    for k in range(n_origins):
        test_start = first + k * size
        test_stop = n_windows if k == n_origins - 1 else test_start + size
        val_start = test_start - math.floor(test_start * val_share)
        out.append((val_start, test_start, test_stop))
    return out
