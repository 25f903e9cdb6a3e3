"""ml.model.statistical: the `har`, `gbm` and `naive` forecasters, fitted, saved, loaded and
served through the same pyfunc as the networks (no tracking server here; the registry tests
load a registered one through `mlflow.pyfunc.load_model`)."""

from __future__ import annotations

from dataclasses import replace
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from ml.config import ModelConfig
from ml.data.schema import PRICE_COLUMNS
from ml.model.features import TARGETS
from ml.model.statistical import design, fit_statistical, join, price_weights
from ml.model.windows import prepare

HORIZONS = (1, 5, 22, 66)


def _bars(n: int = 700, seed: int = 3) -> pd.DataFrame:
    """A random walk with clustered volatility and a range that follows it."""
    rng = np.random.default_rng(seed)
    vol = np.exp(np.convolve(rng.normal(0, 0.35, n), np.ones(20) / 20, mode="same")) * 0.01
    close = 100 * np.exp(np.cumsum(rng.normal(0, vol)))
    prev = np.concatenate([[close[0]], close[:-1]])
    high = np.maximum(close, prev) * np.exp(np.abs(rng.normal(0, vol)))
    low = np.minimum(close, prev) * np.exp(-np.abs(rng.normal(0, vol)))
    return pd.DataFrame(
        {
            "Date": pd.bdate_range("2020-01-01", periods=n),
            "Open": prev,
            "High": high,
            "Low": low,
            "Close": close,
            "Adj Close": close,
            "Volume": rng.integers(1_000, 5_000, n).astype(float),
        }
    )


@pytest.fixture(scope="module")
def trained() -> dict:
    from ml.model.training import train_on_history

    history = _bars()
    out = {}
    for kind in ("har", "gbm"):
        config = replace(ModelConfig(), kinds=(kind,))
        out[kind] = train_on_history("TSTAT", date(2022, 9, 1), history, config)
    return out


def test_design_reads_the_last_bar_memory_as_levels_and_its_own_bar() -> None:
    split = prepare(_bars(), 6, horizons=HORIZONS)
    x = split.train.x
    inputs = design(x, HORIZONS)
    assert inputs.shape == (len(x), len(HORIZONS) + 5)
    np.testing.assert_allclose(inputs[:, 0], np.exp(x[:, -1, 8]))  # Range1, a level
    np.testing.assert_allclose(inputs[:, -1], x[:, -1, 7])  # the last bar's Return


def test_har_minimizes_the_price_error_not_the_log_ratio_error() -> None:
    """Weighted by the last Close squared: against the unweighted fit, its squared PRICE error
    on the windows it was fitted on is lower."""
    from sklearn.linear_model import LinearRegression

    split = prepare(_bars(), 6, horizons=HORIZONS)
    part = split.train
    model = fit_statistical("har", part, HORIZONS)
    inputs = design(part.x, HORIZONS)
    plain = LinearRegression().fit(inputs, part.y[:, 0]).predict(inputs)
    price = part.actual[:, 0]
    weighted_error = np.mean((part.last_close * np.exp(model.predict(part.x)[:, 0]) - price) ** 2)
    plain_error = np.mean((part.last_close * np.exp(plain) - price) ** 2)
    assert weighted_error <= plain_error
    weights = price_weights(part)
    np.testing.assert_allclose(weights.mean(axis=0), 1.0)
    np.testing.assert_allclose(weights[:, 0], part.last_close**2 / np.mean(part.last_close**2))


def test_join_concatenates_train_and_validation() -> None:
    split = prepare(_bars(), 6, horizons=HORIZONS)
    both = join(split.train, split.val)
    assert len(both) == len(split.train) + len(split.val)
    np.testing.assert_array_equal(both.y[len(split.train) :], split.val.y)


@pytest.mark.parametrize("kind", ["har", "gbm"])
def test_a_statistical_kind_is_selected_scored_and_never_worse_than_its_baselines_here(
    trained: dict, kind: str
) -> None:
    result = trained[kind]
    assert result.forecaster.kind == kind
    assert [c.kind for c in result.candidates] == [kind]
    assert np.isfinite(result.candidates[0].val_score)
    assert set(result.candidate_tests[kind]) == {"High", "Low", "Close"}
    assert np.isfinite(result.test_predictions).all()
    dm = result.evaluation.dm_vs_range_naive
    assert set(dm) == {"High", "Low"}


@pytest.mark.parametrize("kind", ["har", "gbm"])
def test_save_load_and_the_pyfunc_give_the_same_prices(
    trained: dict, kind: str, tmp_path: Path
) -> None:
    from ml.model.forecaster import PREPROCESSING_FILE, PriceForecaster
    from ml.registry.pyfunc import PriceForecastModel

    forecaster = trained[kind].forecaster
    paths = forecaster.save(tmp_path)
    assert set(paths) == {"preprocessing"}  # one file: no network
    assert Path(paths["preprocessing"]).name == PREPROCESSING_FILE
    restored = PriceForecaster.load(None, paths["preprocessing"])
    bars = trained[kind].history[PRICE_COLUMNS].tail(forecaster.context_bars + 5)
    expected = forecaster.predict_frame(bars)
    pd.testing.assert_frame_equal(restored.predict_frame(bars), expected)
    served = PriceForecastModel()
    served.load_context(SimpleNamespace(artifacts=paths))
    pd.testing.assert_frame_equal(served.predict(None, bars.reset_index(drop=True)), expected)


def test_naive_forecaster_is_the_range_aware_naive() -> None:
    from ml.model.evaluation import range_naive_forecast
    from ml.model.training import naive_result

    result = naive_result("TNAIVE", date(2022, 9, 1), _bars(), ModelConfig())
    assert result.forecaster.kind == "naive"
    assert result.forecaster.skill_weights == (0.0,) * len(TARGETS)
    assert result.config_fingerprint != ModelConfig().fingerprint()
    test = result.split.test
    expected = range_naive_forecast(
        test.last_close, test.last_adj_close, test.high_ratio, test.low_ratio
    )
    np.testing.assert_allclose(result.test_predictions, expected)
    assert all(v == pytest.approx(1.0) for v in result.evaluation.u2_range_naive.values())


def test_unknown_statistical_kind_is_refused() -> None:
    split = prepare(_bars(), 6, horizons=HORIZONS)
    with pytest.raises(ValueError, match="unknown statistical kind"):
        fit_statistical("arima", split.train, HORIZONS)
