"""Tests of `ml.model.windows`: window shapes, targets by hand, chronological split, no leakage."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pytest

from ml.data.sources import SyntheticSource
from ml.model.features import FEATURES
from ml.model.windows import (
    MIN_WINDOWS,
    InsufficientHistoryError,
    Scaler,
    make_windows,
    prepare,
    split_sizes,
)
from ml.universe import Instrument

GOOGL = Instrument("GOOGL", "stock")
WINDOW = 6
PRICE_COLS = ["Open", "High", "Low", "Close", "Adj Close"]
COL = {name: i for i, name in enumerate(FEATURES)}


@pytest.fixture(scope="module")
def history() -> pd.DataFrame:
    """About 18 months of weekday bars: 390 bars, 383 windows of 6."""
    return SyntheticSource().fetch(GOOGL, date(2023, 1, 2), date(2024, 6, 28))


# --- windows -------------------------------------------------------------------------------------


def test_shapes(history: pd.DataFrame) -> None:
    w = make_windows(history, WINDOW)
    n = len(history) - WINDOW - 1
    assert len(w) == n
    assert w.x.shape == (n, WINDOW, 8)
    assert w.y.shape == (n, 4)
    assert w.actual.shape == (n, 4)
    for field in ("last_close", "last_adj_close", "high_ratio", "low_ratio", "target_dates"):
        assert getattr(w, field).shape == (n,), field
    assert np.isfinite(w.x).all() and np.isfinite(w.y).all()


def test_one_window_by_hand(history: pd.DataFrame) -> None:
    w = make_windows(history, WINDOW)
    o, hi, lo, c, a, v = (history[k].to_numpy() for k in [*PRICE_COLS, "Volume"])
    days = history["Date"].diff().dt.days.to_numpy()
    for i in (0, 37, len(w) - 1):
        t = i + WINDOW  # history row of the window's last bar (the first bar only feeds features)
        rows = range(t - WINDOW + 1, t + 1)
        expected_x = np.array(
            [
                [
                    np.log(o[r] / c[t]),
                    np.log(hi[r] / c[t]),
                    np.log(lo[r] / c[t]),
                    np.log(c[r] / c[t]),
                    np.log(a[r] / a[t]),
                    np.log1p(v[r]) - np.log1p(v[t]),
                    np.log(days[r]),
                    np.log(c[r] / c[r - 1]),
                ]
                for r in rows
            ]
        )
        np.testing.assert_allclose(w.x[i], expected_x, atol=1e-12)
        expected_y = [
            np.log(hi[t + 1] / c[t]),
            np.log(lo[t + 1] / c[t]),
            np.log(c[t + 1] / c[t]),
            np.log(a[t + 1] / a[t]),
        ]
        np.testing.assert_allclose(w.y[i], expected_y, atol=1e-12)
        np.testing.assert_array_equal(w.actual[i], [hi[t + 1], lo[t + 1], c[t + 1], a[t + 1]])
        assert w.last_close[i] == c[t] and w.last_adj_close[i] == a[t]
        assert pd.Timestamp(w.target_dates[i]) == history["Date"].iloc[t + 1]
        # The range-aware naive: trailing mean of High_t / Close_{t-1} up to the window's end.
        lookback = range(max(1, t - 19), t + 1)
        assert w.high_ratio[i] == pytest.approx(np.mean([hi[r] / c[r - 1] for r in lookback]))
        assert w.low_ratio[i] == pytest.approx(np.mean([lo[r] / c[r - 1] for r in lookback]))


def test_actual_prices_are_the_next_bars(history: pd.DataFrame) -> None:
    w = make_windows(history, WINDOW)
    following = history[["High", "Low", "Close", "Adj Close"]].to_numpy()[WINDOW + 1 :]
    np.testing.assert_array_equal(w.actual, following)
    np.testing.assert_array_equal(w.target_dates, history["Date"].to_numpy()[WINDOW + 1 :])
    # Turning the targets back into prices gives the actual prices.
    back = np.column_stack([w.last_close] * 3 + [w.last_adj_close]) * np.exp(w.y)
    np.testing.assert_allclose(back, w.actual, rtol=1e-12)


def test_each_window_is_relative_to_its_last_bar(history: pd.DataFrame) -> None:
    w = make_windows(history, WINDOW)
    for name in ("Close", "Adj Close", "Volume"):
        assert (w.x[:, -1, COL[name]] == 0).all(), name
    # Scale-free: the same bars at 10x the price give the same inputs and targets.
    scaled = history.copy()
    scaled[PRICE_COLS] *= 10
    w10 = make_windows(scaled, WINDOW)
    np.testing.assert_allclose(w10.x, w.x, atol=1e-12)
    np.testing.assert_allclose(w10.y, w.y, atol=1e-12)


# --- split and scaling ---------------------------------------------------------------------------


def test_split_is_70_20_10_and_chronological(history: pd.DataFrame) -> None:
    data = prepare(history, WINDOW)
    n = len(history) - WINDOW - 1
    assert n == 383
    sizes = (len(data.train), len(data.val), len(data.test))
    assert sum(sizes) == n
    assert (
        sizes
        == split_sizes(n, (0.7, 0.2, 0.1))
        == (n * 7 // 10, n * 2 // 10, n - n * 7 // 10 - n * 2 // 10)
    )
    assert data.train.target_dates.max() < data.val.target_dates.min()
    assert data.val.target_dates.max() < data.test.target_dates.min()
    all_windows = make_windows(history, WINDOW)
    np.testing.assert_array_equal(
        np.concatenate([data.train.y, data.val.y, data.test.y]), all_windows.y
    )


@pytest.mark.parametrize("n", [90, 330])
def test_split_sizes_are_exact(n: int) -> None:
    assert split_sizes(n, (0.7, 0.2, 0.1)) == (n * 7 // 10, n * 2 // 10, n - n * 9 // 10)


def test_scalers_are_fitted_on_the_train_block_only(history: pd.DataFrame) -> None:
    data = prepare(history, WINDOW)
    flat = data.train.x.reshape(-1, 8)
    np.testing.assert_allclose(data.x_scaler.mean, flat.mean(axis=0))
    np.testing.assert_allclose(data.y_scaler.mean, data.train.y.mean(axis=0))
    x_train, y_train = data.scaled(data.train)
    np.testing.assert_allclose(x_train.reshape(-1, 8).mean(axis=0), 0, atol=1e-9)
    np.testing.assert_allclose(y_train.std(axis=0), 1, atol=1e-9)
    restored = Scaler.from_dict(data.y_scaler.to_dict())
    np.testing.assert_allclose(restored.inverse(y_train), data.train.y, atol=1e-12)


def test_no_leakage_from_bars_after_the_train_block(history: pd.DataFrame) -> None:
    data = prepare(history, WINDOW)
    cutoff = pd.Timestamp(data.train.target_dates.max())
    later = history["Date"] > cutoff
    assert later.sum() > 100
    changed = history.copy()
    changed.loc[later, PRICE_COLS] *= 3
    changed.loc[later, "Volume"] = changed.loc[later, "Volume"] * 5 + 1234
    other = prepare(changed, WINDOW)

    for scaler in ("x_scaler", "y_scaler"):
        np.testing.assert_array_equal(getattr(other, scaler).mean, getattr(data, scaler).mean)
        np.testing.assert_array_equal(getattr(other, scaler).std, getattr(data, scaler).std)
    for field in ("x", "y", "actual", "last_close", "high_ratio", "low_ratio", "target_dates"):
        np.testing.assert_array_equal(getattr(other.train, field), getattr(data.train, field))
    # The change did reach the later blocks.
    assert not np.allclose(other.val.actual, data.val.actual)
    assert not np.allclose(other.val.y[0], data.val.y[0])


# --- too little history --------------------------------------------------------------------------


def test_too_little_history_raises(history: pd.DataFrame) -> None:
    with pytest.raises(InsufficientHistoryError, match="too few"):
        make_windows(history.iloc[: WINDOW + 1], WINDOW)
    assert len(make_windows(history.iloc[: WINDOW + 2], WINDOW)) == 1
    enough = MIN_WINDOWS + WINDOW + 1
    assert len(prepare(history.iloc[:enough], WINDOW).train) > 0
    with pytest.raises(InsufficientHistoryError, match=f"need at least {MIN_WINDOWS}"):
        prepare(history.iloc[: enough - 1], WINDOW)


@pytest.mark.parametrize("bars", [0, 1])
def test_almost_no_history_raises_insufficient_history(history: pd.DataFrame, bars: int) -> None:
    with pytest.raises(InsufficientHistoryError):
        make_windows(history.iloc[:bars], WINDOW)
