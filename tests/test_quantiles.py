"""The next bar's quantiles (ml.model.quantiles), their scores and baselines
(ml.model.probabilistic) and the gate's interval questions (ml.registry.gate.interval_failures):
real training on synthetic bars, hand-computed scores, no MLflow."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from ml.config import GateConfig, ModelConfig, get_settings
from ml.data.sources import SyntheticSource
from ml.model.forecaster import PriceForecaster
from ml.model.probabilistic import (
    HISTORICAL_BARS,
    IntervalReport,
    baseline_log_quantiles,
    binomial_band,
    score_block,
    score_intervals,
)
from ml.model.quantiles import (
    QUANTILES,
    ResidualQuantiles,
    column,
    conformal_rank,
    quantile_columns,
)
from ml.model.training import train_on_history
from ml.registry.gate import interval_failures, interval_summary
from ml.universe import load_universe

AS_OF = date(2026, 11, 20)


@pytest.fixture(scope="module")
def history() -> pd.DataFrame:
    settings = get_settings({})
    instrument = load_universe(settings.universe_file).get("SPY")
    return SyntheticSource().fetch(instrument, settings.history_start, AS_OF)


@pytest.fixture(scope="module")
def trained(history: pd.DataFrame):
    return train_on_history("SPY", AS_OF, history, ModelConfig())


# --- the method ------------------------------------------------------------------------------------


def test_conformal_rank_is_the_split_conformal_order_statistic() -> None:
    assert conformal_rank(99, 0.90) == 90  # ceil(100 * 0.9)
    assert conformal_rank(99, 0.95) == 95
    assert conformal_rank(99, 0.10) == 10  # floor(100 * 0.1)
    assert conformal_rank(10, 0.99) == 10  # capped at n
    assert conformal_rank(10, 0.01) == 1


def test_scaled_residual_quantiles_cover_at_their_level_on_fresh_heteroscedastic_data() -> None:
    """Residuals whose spread follows the volatility memory: the fitted scale tracks it, and on
    bars the calibration never saw each one-sided level covers close to its nominal share."""
    features = ("Range1", "Range5", "Vol5")
    rng = np.random.default_rng(7)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        level = rng.uniform(0.005, 0.04, n)  # each window's volatility
        x = np.zeros((n, 2, len(features)))
        x[:, -1, 0] = np.log(level * rng.uniform(0.8, 1.2, n))
        x[:, -1, 1] = np.log(level)
        x[:, -1, 2] = np.log(level * 0.7)
        residual = rng.standard_t(5, (n, 3)) * level[:, None]
        return x, residual

    model = ResidualQuantiles.fit(features, (1, 5), draw(3000), draw(10000))
    x, residual = draw(20000)
    point = np.zeros((len(x), 3))
    logs = model.log_quantiles(x, features, point)
    for j, target in enumerate(("Close", "High", "Low")):
        for q in QUANTILES[target]:
            share = float(np.mean(residual[:, j] <= logs[column(target, q)]))
            assert share == pytest.approx(q, abs=0.012), (target, q, share)
    # The scale follows the volatility: ten times the level, several times the scale.
    scale = model.scale(x, features)[:, 0]
    quiet, wild = np.exp(x[:, -1, 1]) < 0.01, np.exp(x[:, -1, 1]) > 0.035
    assert scale[wild].mean() > 3 * scale[quiet].mean()
    again = ResidualQuantiles.from_dict(json.loads(json.dumps(model.to_dict())))
    np.testing.assert_allclose(again.scale(x[:50], features), model.scale(x[:50], features))
    assert again.scores == model.scores


def test_a_trained_forecaster_returns_ordered_quantiles_beside_its_points(
    trained, history: pd.DataFrame
) -> None:
    forecaster = trained.forecaster
    assert forecaster.intervals is not None
    frame = forecaster.predict_frame(history.tail(200))
    assert list(frame.columns) == ["Date", "High", "Low", "Close", "Adj Close", *quantile_columns()]
    close = frame[[column("Close", q) for q in QUANTILES["Close"]]].to_numpy()
    assert (np.diff(close, axis=1) > 0).all()
    assert (frame["High q95"] > frame["High q90"]).all()
    assert (frame["Low q05"] < frame["Low q10"]).all()
    # The median sits near the point forecast (Close is persistence or close to it).
    assert np.allclose(frame["Close q50"], frame["Close"], rtol=0.01)


def test_quantiles_survive_save_and_load_and_an_older_model_answers_its_points(
    trained, history: pd.DataFrame, tmp_path: Path
) -> None:
    forecaster = trained.forecaster
    bars = history.tail(120)
    paths = forecaster.save(tmp_path / "new")
    loaded = PriceForecaster.load(paths.get("keras_model"), paths["preprocessing"])
    pd.testing.assert_frame_equal(loaded.predict_frame(bars), forecaster.predict_frame(bars))
    # A model saved before quantiles existed: no "intervals" in preprocessing.json.
    old = replace(forecaster, intervals=None)
    old_paths = old.save(tmp_path / "old")
    assert "intervals" not in json.loads(Path(old_paths["preprocessing"]).read_text())
    older = PriceForecaster.load(old_paths.get("keras_model"), old_paths["preprocessing"])
    out = older.predict_frame(bars)
    assert list(out.columns) == ["Date", "High", "Low", "Close", "Adj Close"]
    pd.testing.assert_frame_equal(out, forecaster.predict_frame(bars)[list(out.columns)])


def test_calibration_reads_nothing_of_the_test_block(trained) -> None:
    """Point in time: replacing the test block's bars by noise leaves the quantiles unchanged."""
    forecaster, split = replace(trained.forecaster), trained.split
    forecaster.calibrate(split)
    before = forecaster.intervals.to_dict()
    test = split.test
    rng = np.random.default_rng(3)
    noisy = replace(
        test,
        x=test.x + rng.normal(0, 1, test.x.shape),
        y=rng.normal(0, 1, test.y.shape),
        actual=test.actual * 3,
    )
    refit = replace(forecaster)
    refit.calibrate(replace(split, test=noisy))
    assert refit.intervals.to_dict() == before


def test_the_test_block_report_is_scored_beside_both_baselines(trained) -> None:
    report = trained.intervals
    assert report is not None and report.n == len(trained.split.test)
    low, high = report.band
    assert 0.8 < low < 0.9 < high < 1.0
    for name in ("close_80", "close_90", "high_q90", "high_q95", "low_q10", "low_q05"):
        assert 0.0 <= report.coverage[name] <= 1.0
        assert set(report.baselines) == {"historical", "gaussian"}
    assert 0.85 <= report.coverage["close_90"] <= 0.95
    assert math.isfinite(report.ratio("interval_score", "close_90"))
    metrics = report.as_metrics()
    for key in (
        "test_coverage_close_90",
        "test_interval_score_close_90_vs_historical",
        "test_interval_score_close_90_vs_gaussian",
        "test_pinball_high_q90_vs_historical",
        "test_pinball_tails_vs_gaussian",
        "test_coverage_close_90_historical",
        "test_dm_interval_score_historical_p_worse",
    ):
        assert key in metrics and math.isfinite(metrics[key]), key
    tag = json.loads(report.to_tag())
    assert tag["n"] == report.n and tag["coverage"]["close_90"] == round(
        report.coverage["close_90"], 6
    )
    assert score_block(replace(trained.forecaster, intervals=None), trained.split) is None


# --- scores and baselines, by hand -------------------------------------------------------------


def test_interval_score_pinball_and_coverage_match_hand_computed_values() -> None:
    actual = np.array([[101.0, 99.0, 100.0, 100.0], [110.0, 90.0, 120.0, 120.0]])
    quantiles = {column(t, q): np.zeros(2) for t in QUANTILES for q in QUANTILES[t]}
    for q, value in zip(QUANTILES["Close"], (95.0, 97.0, 100.0, 103.0, 105.0), strict=True):
        quantiles[column("Close", q)] = np.array([value, value])
    quantiles.update({"High q90": np.array([102.0, 102.0]), "High q95": np.array([104.0, 104.0])})
    quantiles.update({"Low q10": np.array([98.0, 98.0]), "Low q05": np.array([96.0, 96.0])})
    report = score_intervals(actual, quantiles, {})
    # Bar 1 inside everything; bar 2 misses Close (120 > 105), High (110 > 104), Low (90 < 96).
    assert report.coverage == {
        "close_80": 0.5,
        "close_90": 0.5,
        "high_q90": 0.5,
        "high_q95": 0.5,
        "low_q10": 0.5,
        "low_q05": 0.5,
    }
    # Interval score of [95, 105] at alpha 0.1: 10; then 10 + 2 / 0.1 * (120 - 105) = 310.
    assert report.interval_score["close_90"] == pytest.approx((10 + 310) / 2)
    # Pinball of High q90 = 102: bar 1 (101 < 102) 0.1 * 1; bar 2 0.9 * 8.
    assert report.pinball["High q90"] == pytest.approx((0.1 + 7.2) / 2)
    assert report.pinball["Low q10"] == pytest.approx((0.1 * 1 + 0.9 * 8) / 2)


def test_baselines_use_only_the_bars_before_each_forecast() -> None:
    rng = np.random.default_rng(11)
    past = rng.normal(0, 0.01, (400, 3))
    positions = np.array([300, 350])
    out = baseline_log_quantiles(past, positions)
    window = past[300 - HISTORICAL_BARS : 300]
    assert out["historical"]["Close q95"][0] == pytest.approx(np.quantile(window[:, 0], 0.95))
    rms = math.sqrt(float(np.mean(past[280:300, 0] ** 2)))
    assert out["gaussian"]["Close q05"][0] == pytest.approx(rms * norm.ppf(0.05))
    high = past[280:300, 1]
    assert out["gaussian"]["High q90"][0] == pytest.approx(
        high.mean() + high.std(ddof=1) * norm.ppf(0.90)
    )
    changed = past.copy()
    changed[300:] = 5.0  # the bar forecast and everything after it
    again = baseline_log_quantiles(changed, positions[:1])
    for baseline in ("historical", "gaussian"):
        for name, values in again[baseline].items():
            assert values[0] == pytest.approx(out[baseline][name][0]), (baseline, name)


def test_binomial_band_of_a_90_percent_coverage() -> None:
    low, high = binomial_band(160)
    assert (low, high) == pytest.approx((0.8375, 0.95625))
    low, high = binomial_band(600)
    assert 0.86 < low < 0.875 and 0.925 < high < 0.94


# --- the gate's interval questions ----------------------------------------------------------------


def _tag(coverage: float, p_worse: float | None = 0.6, n: int = 300) -> dict:
    report = IntervalReport(n, {"close_90": coverage}, {}, {}, {}, {})
    band = report.band
    return {
        "n": n,
        "band": list(band),
        "coverage": {"close_90": coverage},
        "interval_score_close_90_vs_historical": 0.93,
        "pinball_tails_vs_historical": 0.9,
        "dm_historical": {"p_worse": p_worse},
    }


def test_the_gate_asks_for_coverage_inside_the_band_and_no_worse_interval_score() -> None:
    gate = GateConfig()
    assert interval_failures(_tag(0.90), gate) == []
    assert interval_failures(None, gate) == []  # registered before quantiles: not asked
    [low] = interval_failures(_tag(0.80), gate)
    assert "Close 90 % interval coverage 0.800 on 300 bars outside" in low
    assert interval_failures(_tag(0.99), gate)
    [worse] = interval_failures(_tag(0.90, p_worse=0.001), gate)
    assert "significantly worse than historical simulation (ratio 0.930" in worse
    # Missing figures fail closed.
    assert interval_failures({"n": 300}, gate)
    assert "coverage 0.900 (band" in interval_summary(_tag(0.90))
