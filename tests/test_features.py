"""Tests of `ml.model.features`: the notebook's 8 inputs, computed by hand from raw prices."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pytest

from ml.data.sources import SyntheticSource
from ml.model.features import FEATURES, PRICE_FEATURES, TARGETS, build_features
from ml.universe import Instrument

GOOGL = Instrument("GOOGL", "stock")
EURUSD = Instrument("EURUSD=X", "forex")


def history(instrument: Instrument = GOOGL, start: date = date(2023, 1, 2)) -> pd.DataFrame:
    return SyntheticSource().fetch(instrument, start, date(2024, 6, 28))


def test_eight_features_in_model_order() -> None:
    assert FEATURES == ("Open", "High", "Low", "Close", "Adj Close", "Volume", "Gap", "Return")
    assert len(FEATURES) == 8
    assert TARGETS == ("High", "Low", "Close", "Adj Close")
    feats = build_features(history())
    assert list(feats.columns) == ["Date", *FEATURES]


def test_features_match_a_hand_computation() -> None:
    h = history()
    feats = build_features(h)
    assert len(feats) == len(h) - 1
    assert list(feats["Date"]) == list(h["Date"].iloc[1:])
    for row in (0, 1, 57, len(feats) - 1):
        bar, prev = h.iloc[row + 1], h.iloc[row]
        f = feats.iloc[row]
        for col in PRICE_FEATURES:
            assert f[col] == pytest.approx(np.log(bar[col]), abs=1e-12)
        assert f["Volume"] == pytest.approx(np.log(1 + bar["Volume"]), abs=1e-12)
        assert f["Gap"] == pytest.approx(np.log((bar["Date"] - prev["Date"]).days), abs=1e-12)
        assert f["Return"] == pytest.approx(np.log(bar["Close"] / prev["Close"]), abs=1e-12)


def test_gap_encodes_weekends() -> None:
    feats = build_features(history())
    monday = feats["Date"].dt.dayofweek == 0
    assert np.allclose(feats.loc[monday, "Gap"], np.log(3))
    assert np.allclose(feats.loc[~monday, "Gap"], 0.0)


def test_forex_volume_feature_is_zero_and_everything_is_finite() -> None:
    feats = build_features(history(EURUSD))
    assert (feats["Volume"] == 0).all()
    assert np.isfinite(feats[list(FEATURES)].to_numpy()).all()


def test_a_feature_uses_no_later_bar() -> None:
    h = history()
    full = build_features(h)
    k = 200
    later_changed = h.copy()
    later_changed.loc[k + 1 :, ["Open", "High", "Low", "Close", "Adj Close"]] *= 3
    later_changed.loc[k + 1 :, "Volume"] += 1e6
    partial = build_features(later_changed)
    pd.testing.assert_frame_equal(partial.iloc[:k], full.iloc[:k])
    assert not np.allclose(partial["Close"].iloc[k:], full["Close"].iloc[k:])


def test_too_few_bars_raise() -> None:
    with pytest.raises(ValueError, match="at least 2 bars"):
        build_features(history().iloc[:1])
    assert len(build_features(history().iloc[:2])) == 1
