"""Volatility-memory inputs, the range-aware naive as the High/Low fallback, rolling origins.

Pure numpy/pandas and one small Keras network (no fit): what issue "forecast skill on real
markets" added to features, windows and the forecaster.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ml.config import ConfigError, ModelConfig, get_settings
from ml.data.sources import SyntheticSource
from ml.model.evaluation import range_naive_forecast
from ml.model.features import FEATURES, build_features, feature_names
from ml.model.forecaster import PriceForecaster, forecast_next_bar
from ml.model.windows import Scaler, make_windows, rolling_origins, split_at
from ml.universe import Instrument

HORIZONS = (1, 5, 22, 66)
WINDOW = 6


@pytest.fixture(scope="module")
def history() -> pd.DataFrame:
    bars = SyntheticSource().fetch(Instrument("AMD", "stock"), date(2022, 1, 3), date(2024, 6, 28))
    return bars.drop(columns="Ticker")


def test_feature_names_keep_the_notebooks_eight_first() -> None:
    assert feature_names(()) == FEATURES
    assert feature_names(HORIZONS) == (
        *FEATURES,
        *("Range1", "Range5", "Range22", "Range66"),
        *("Vol5", "Vol22", "Vol66"),
    )


def test_memory_features_are_trailing_means_of_this_and_earlier_bars(
    history: pd.DataFrame,
) -> None:
    feats = build_features(history, HORIZONS)
    plain = build_features(history)
    pd.testing.assert_frame_equal(feats[list(plain.columns)], plain)
    log_range = np.log(history["High"] / history["Low"]).to_numpy()[1:]
    returns = np.diff(np.log(history["Close"].to_numpy()))
    i = 100
    np.testing.assert_allclose(feats["Range1"][i], np.log(log_range[i] + 1e-4))
    np.testing.assert_allclose(feats["Range22"][i], np.log(log_range[i - 21 : i + 1].mean() + 1e-4))
    np.testing.assert_allclose(
        feats["Vol66"][i], np.log(np.sqrt(np.mean(returns[i - 65 : i + 1] ** 2)) + 1e-4)
    )
    # The first rows average what exists (no look-ahead, no NaN).
    np.testing.assert_allclose(feats["Range66"][0], feats["Range1"][0])
    assert np.isfinite(feats[list(feature_names(HORIZONS))].to_numpy()).all()


def test_memory_features_do_not_see_later_bars(history: pd.DataFrame) -> None:
    changed = history.copy()
    changed.loc[changed.index[-10:], ["High", "Close"]] *= 1.5
    a = build_features(history, HORIZONS).iloc[:-10]
    b = build_features(changed, HORIZONS).iloc[:-10]
    pd.testing.assert_frame_equal(a, b)


def test_a_flat_bar_gives_finite_memory_features(history: pd.DataFrame) -> None:
    flat = history.copy()
    flat.loc[flat.index[:30], ["Open", "High", "Low", "Close", "Adj Close"]] = 10.0
    values = build_features(flat, HORIZONS)[list(feature_names(HORIZONS))].to_numpy()
    assert np.isfinite(values).all()


def test_windows_carry_the_memory_features_unchanged(history: pd.DataFrame) -> None:
    with_memory = make_windows(history, WINDOW, horizons=HORIZONS)
    plain = make_windows(history, WINDOW)
    assert with_memory.x.shape == (len(plain), WINDOW, 15)
    np.testing.assert_array_equal(with_memory.x[:, :, :8], plain.x)
    np.testing.assert_array_equal(with_memory.y, plain.y)
    feats = build_features(history, HORIZONS)
    # Not made relative to the window's last bar: the last step holds the bar's own value.
    np.testing.assert_allclose(with_memory.x[0, -1, 8], feats["Range1"][WINDOW - 1])


def test_rolling_origins_tile_the_last_30_percent_and_never_look_ahead() -> None:
    origins = rolling_origins(1000, 4)
    assert [o[1] for o in origins] == [700, 775, 850, 925]
    assert [o[2] for o in origins] == [775, 850, 925, 1000]
    for val_start, test_start, _ in origins:
        assert val_start < test_start
        assert test_start - val_start == int(test_start * 2 / 9)


def test_split_at_scales_on_the_train_block_only(history: pd.DataFrame) -> None:
    windows = make_windows(history, WINDOW, horizons=HORIZONS)
    split = split_at(windows, 300, 400, 450)
    assert (len(split.train), len(split.val), len(split.test)) == (300, 100, 50)
    expected = Scaler.fit(windows.x[:300])
    np.testing.assert_array_equal(split.x_scaler.mean, expected.mean)


def _forecaster(config: ModelConfig, n_features: int, weights) -> PriceForecaster:
    from ml.model.networks import build_model

    model = build_model("gru", WINDOW, n_features, 4, units=4, dense_units=2)
    rng = np.random.default_rng(0)
    return PriceForecaster(
        kind="gru",
        window=WINDOW,
        model=model,
        x_scaler=Scaler(rng.normal(size=n_features), np.ones(n_features)),
        y_scaler=Scaler(np.zeros(4), np.full(4, 0.01)),
        skill_weights=weights,
        horizons=config.vol_horizons,
        anchors=config.anchors(),
        naive_lookback=config.naive_lookback,
    )


def test_no_skill_on_high_and_low_falls_back_to_the_range_aware_naive(
    history: pd.DataFrame,
) -> None:
    config = ModelConfig()
    assert config.anchors() == ("range_naive", "range_naive", "persistence", "persistence")
    forecaster = _forecaster(config, 15, (0.0, 0.0, 0.0, 0.0))
    windows = make_windows(history, WINDOW, horizons=config.vol_horizons)
    predicted = forecaster.predict_windows(
        windows.x, windows.last_close, windows.last_adj_close, windows.high_ratio, windows.low_ratio
    )
    naive = range_naive_forecast(
        windows.last_close, windows.last_adj_close, windows.high_ratio, windows.low_ratio
    )
    np.testing.assert_allclose(predicted, naive, rtol=1e-12)
    with pytest.raises(ValueError, match="range-naive ratios"):
        forecaster.predict_windows(windows.x, windows.last_close, windows.last_adj_close)


def test_the_next_bar_forecast_sees_enough_bars_for_its_memory(history: pd.DataFrame) -> None:
    forecaster = _forecaster(ModelConfig(), 15, (0.5, 0.5, 0.0, 0.0))
    assert forecaster.context_bars == WINDOW + 66 + 1
    _, next_bar = forecast_next_bar(forecaster, history)
    full = forecaster.predict_frame(history).iloc[-1]
    for target, value in next_bar.items():
        assert value == pytest.approx(float(full[target]), rel=1e-9)


def test_saved_preprocessing_keeps_the_inputs_and_anchors(
    history: pd.DataFrame, tmp_path: Path
) -> None:
    forecaster = _forecaster(ModelConfig(), 15, (0.25, 0.5, 0.0, 1.0))
    paths = forecaster.save(tmp_path / "model")
    prep = json.loads(Path(paths["preprocessing"]).read_text())
    assert prep["features"] == list(feature_names(HORIZONS))
    restored = PriceForecaster.load(paths["keras_model"], paths["preprocessing"])
    assert (restored.horizons, restored.anchors, restored.naive_lookback) == (
        forecaster.horizons,
        forecaster.anchors,
        forecaster.naive_lookback,
    )
    pd.testing.assert_frame_equal(
        restored.predict_frame(history.tail(200)), forecaster.predict_frame(history.tail(200))
    )


def test_a_model_saved_before_the_memory_inputs_loads_as_it_was(tmp_path: Path) -> None:
    """Champions registered before: 8 inputs, persistence anchors (no new keys in the file)."""
    old = ModelConfig(vol_horizons=(), hl_baseline="persistence")
    forecaster = _forecaster(old, 8, (1.0, 1.0, 0.0, 0.0))
    paths = forecaster.save(tmp_path / "old")
    prep = json.loads(Path(paths["preprocessing"]).read_text())
    for key in ("horizons", "anchors", "naive_lookback", "features"):
        del prep[key]
    Path(paths["preprocessing"]).write_text(json.dumps(prep))
    restored = PriceForecaster.load(paths["keras_model"], paths["preprocessing"])
    assert restored.features == FEATURES and set(restored.anchors) == {"persistence"}


def test_model_settings_from_the_environment() -> None:
    assert get_settings({"MODEL_VOL_HORIZONS": "none"}).model.vol_horizons == ()
    assert get_settings({"MODEL_VOL_HORIZONS": "66,1,5"}).model.vol_horizons == (1, 5, 66)
    assert get_settings({"MODEL_HL_BASELINE": "Persistence"}).model.hl_baseline == "persistence"
    with pytest.raises(ConfigError, match="MODEL_VOL_HORIZONS"):
        get_settings({"MODEL_VOL_HORIZONS": "5,x"})
    with pytest.raises(ConfigError, match="MODEL_VOL_HORIZONS"):
        get_settings({"MODEL_VOL_HORIZONS": "0,5"})
    with pytest.raises(ConfigError, match="MODEL_HL_BASELINE"):
        get_settings({"MODEL_HL_BASELINE": "har"})
