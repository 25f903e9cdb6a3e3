"""Unit tests for ml.model.evaluation: each metric on small hand-computed cases."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
from scipy.stats import binomtest

from ml.model.evaluation import (
    TARGETS,
    EvaluationReport,
    diebold_mariano,
    directional_accuracy,
    evaluate,
    mae,
    mase,
    mase_scale,
    persistence_forecast,
    range_coverage,
    range_naive_forecast,
    rmse,
    theil_u2,
)

# Two columns: column 0 errors are (0, 1, 2), column 1 errors are (3, 0, 0).
ACTUAL_2D = np.array([[1.0, 10.0], [2.0, 10.0], [3.0, 10.0]])
PRED_2D = np.array([[1.0, 13.0], [3.0, 10.0], [5.0, 10.0]])


# --------------------------------------------------------------------------------------------------
# RMSE / MAE
# --------------------------------------------------------------------------------------------------


def test_rmse_1d_hand_computed() -> None:
    # errors 0, 1, 2 -> mean squared error (0 + 1 + 4) / 3 = 5/3
    result = rmse([1, 2, 3], [1, 3, 5])
    assert isinstance(result, float)
    assert result == pytest.approx(math.sqrt(5 / 3))


def test_rmse_per_column() -> None:
    # column 1: (9 + 0 + 0) / 3 = 3 -> sqrt(3)
    np.testing.assert_allclose(rmse(ACTUAL_2D, PRED_2D), [math.sqrt(5 / 3), math.sqrt(3)])


def test_rmse_perfect_forecast_is_zero() -> None:
    assert rmse([1.0, 2.0], [1.0, 2.0]) == 0.0


def test_mae_1d_and_per_column() -> None:
    # |0| + |1| + |2| = 3 -> 1 ; |3| + 0 + 0 = 3 -> 1
    assert mae([1, 2, 3], [1, 3, 5]) == pytest.approx(1.0)
    np.testing.assert_allclose(mae(ACTUAL_2D, PRED_2D), [1.0, 1.0])
    assert mae([10.0, 10.0], [7.0, 12.0]) == pytest.approx(2.5)  # (3 + 2) / 2


# --------------------------------------------------------------------------------------------------
# MASE
# --------------------------------------------------------------------------------------------------


def test_mase_with_known_scale() -> None:
    # MAE 1.0 / scale 0.5 = 2.0
    assert mase([1, 2, 3], [1, 3, 5], 0.5) == pytest.approx(2.0)
    # per column: MAE (1, 1) / scale (0.5, 2) = (2, 0.5)
    np.testing.assert_allclose(mase(ACTUAL_2D, PRED_2D, [0.5, 2.0]), [2.0, 0.5])


def test_mase_zero_or_nan_scale_gives_nan_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a silent divide-by-zero RuntimeWarning would fail here
        result = mase(ACTUAL_2D, PRED_2D, [0.0, np.nan])
        assert math.isnan(mase([1, 2, 3], [1, 3, 5], 0.0))
    assert np.isnan(result).all()


def test_mase_rejects_bad_scale() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        mase([1, 2, 3], [1, 3, 5], -1.0)
    with pytest.raises(ValueError, match="scale must have shape"):
        mase(ACTUAL_2D, PRED_2D, [1.0, 1.0, 1.0])


def test_mase_scale_is_train_persistence_mae_per_target() -> None:
    last_close = [10.0, 11.0, 12.0]
    last_adj_close = [9.0, 10.0, 11.0]
    #                  High  Low   Close  Adj Close
    train_actual = [
        [11.0, 9.5, 11.0, 10.0],
        [12.5, 10.5, 12.0, 11.0],
        [13.0, 11.0, 12.0, 11.0],
    ]
    # High vs last close: |1| + |1.5| + |1| = 3.5 -> 7/6
    # Low:  |-0.5| + |-0.5| + |-1| = 2 -> 2/3
    # Close: 1 + 1 + 0 = 2 -> 2/3
    # Adj Close vs last ADJ close: 1 + 1 + 0 = 2 -> 2/3
    scale = mase_scale(train_actual, last_close, last_adj_close)
    assert scale.shape == (4,)
    np.testing.assert_allclose(scale, [7 / 6, 2 / 3, 2 / 3, 2 / 3])


def test_mase_scale_zero_guard_returns_nan() -> None:
    # Close and Adj Close never move from the last values; High and Low do.
    train_actual = [[11.0, 9.0, 10.0, 9.0], [11.0, 9.0, 10.0, 9.0]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scale = mase_scale(train_actual, [10.0, 10.0], [9.0, 9.0])
    np.testing.assert_allclose(scale[:2], [1.0, 1.0])
    assert np.isnan(scale[2:]).all()
    # and the NaN scale turns MASE into NaN, not inf
    test_mase = mase(train_actual, train_actual, scale)
    assert test_mase[0] == 0.0
    assert np.isnan(test_mase[2:]).all()


def test_mase_scale_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        mase_scale([[1.0, 1.0, 1.0, 1.0]] * 3, [1.0, 1.0], [1.0, 1.0])


# --------------------------------------------------------------------------------------------------
# Theil's U2
# --------------------------------------------------------------------------------------------------


def test_u2_is_one_when_predicted_equals_reference() -> None:
    assert theil_u2([1, 2, 3], [2, 3, 4], [2, 3, 4]) == pytest.approx(1.0)
    np.testing.assert_allclose(theil_u2(ACTUAL_2D, PRED_2D, PRED_2D), [1.0, 1.0])


def test_u2_below_one_for_better_forecast() -> None:
    # reference errors (1, 1, 1): RMSE 1 ; prediction errors (0, 0, 1): RMSE sqrt(1/3)
    u2 = theil_u2([1, 2, 3], [1, 2, 4], [2, 3, 4])
    assert u2 == pytest.approx(math.sqrt(1 / 3))
    assert u2 < 1
    # and above one for a worse forecast: RMSE 2 vs 1
    assert theil_u2([1, 2, 3], [3, 4, 5], [2, 3, 4]) == pytest.approx(2.0)


def test_u2_per_column() -> None:
    reference = ACTUAL_2D + 1.0  # RMSE 1 in both columns
    np.testing.assert_allclose(
        theil_u2(ACTUAL_2D, PRED_2D, reference), [math.sqrt(5 / 3), math.sqrt(3)]
    )


def test_u2_nan_when_reference_is_perfect() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(theil_u2([1, 2, 3], [1, 2, 4], [1, 2, 3]))
        assert math.isnan(theil_u2([1, 2, 3], [1, 2, 3], [1, 2, 3]))


# --------------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------------


def test_persistence_forecast_shape_and_values() -> None:
    forecast = persistence_forecast([10.0, 20.0], [9.0, 19.0])
    assert forecast.shape == (2, 4)
    # High = Low = Close = last Close ; Adj Close = last Adj Close
    np.testing.assert_array_equal(forecast, [[10, 10, 10, 9], [20, 20, 20, 19]])


def test_range_naive_forecast_scalar_ratios() -> None:
    forecast = range_naive_forecast([100.0, 200.0], [98.0, 196.0], 1.02, 0.97)
    np.testing.assert_allclose(forecast, [[102, 97, 100, 98], [204, 194, 200, 196]])


def test_range_naive_forecast_per_bar_ratios() -> None:
    forecast = range_naive_forecast([100.0, 200.0], [98.0, 196.0], [1.01, 1.03], [0.99, 0.95])
    np.testing.assert_allclose(forecast, [[101, 99, 100, 98], [206, 190, 200, 196]])


def test_range_naive_forecast_rejects_bad_ratios() -> None:
    with pytest.raises(ValueError, match="strictly positive"):
        range_naive_forecast([100.0], [98.0], 0.0, 0.97)
    with pytest.raises(ValueError, match="high_ratio"):
        range_naive_forecast([100.0, 200.0], [98.0, 196.0], [1.01, 1.02, 1.03], 0.97)


def test_baselines_reject_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        persistence_forecast([10.0, 20.0], [9.0])
    with pytest.raises(ValueError, match="1-D"):
        persistence_forecast([[10.0, 20.0]], [[9.0, 19.0]])


# --------------------------------------------------------------------------------------------------
# Directional accuracy
# --------------------------------------------------------------------------------------------------


def test_directional_accuracy_excludes_ties_and_uses_binomtest() -> None:
    last = [10.0] * 12
    # bars 0-9 are counted: 9 right (5 up, 4 down) and bar 9 wrong (actual up, predicted down);
    # bar 10: actual == last (flat move), bar 11: predicted == last (no call) -> both excluded.
    actual = [11, 12, 11, 13, 11, 9, 8, 9, 9, 11, 10, 12]
    predicted = [10.5, 11, 12, 10.1, 15, 9.5, 9, 7, 9.9, 9, 11, 10]
    accuracy, n, pvalue = directional_accuracy(actual, predicted, last)
    assert n == 10
    assert accuracy == pytest.approx(0.9)
    # two-sided: P(X >= 9) + P(X <= 1) = 2 * 11 / 1024
    assert pvalue == pytest.approx(22 / 1024)
    assert pvalue == pytest.approx(0.0215, abs=5e-5)
    assert pvalue == pytest.approx(binomtest(9, 10, 0.5).pvalue)


def test_directional_accuracy_all_ties_is_nan() -> None:
    accuracy, n, pvalue = directional_accuracy([11.0, 9.0], [10.0, 10.0], [10.0, 10.0])
    assert n == 0
    assert math.isnan(accuracy)
    assert math.isnan(pvalue)


def test_directional_accuracy_all_wrong() -> None:
    accuracy, n, pvalue = directional_accuracy([11.0, 9.0], [9.0, 11.0], [10.0, 10.0])
    assert (accuracy, n) == (0.0, 2)
    assert pvalue == pytest.approx(0.5)  # 2 * (1/4)


# --------------------------------------------------------------------------------------------------
# Range coverage
# --------------------------------------------------------------------------------------------------


def test_range_coverage_fractions() -> None:
    actual_high = [10.0, 12.0, 11.0, 9.0]
    actual_low = [8.0, 9.0, 7.0, 8.0]
    predicted_high = [11.0, 11.0, 11.0, 10.0]
    predicted_low = [7.5, 8.0, 7.5, 8.5]
    # high <= pred high: T F T(equal) T -> 3/4 ; low >= pred low: T T F F -> 2/4 ; both: bar 0 only
    coverage = range_coverage(actual_high, actual_low, predicted_high, predicted_low)
    assert coverage == {"high_below_pred": 0.75, "low_above_pred": 0.5, "inside": 0.25}


def test_range_coverage_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        range_coverage([1.0, 2.0], [1.0, 2.0], [1.0], [1.0, 2.0])


# --------------------------------------------------------------------------------------------------
# evaluate / EvaluationReport
# --------------------------------------------------------------------------------------------------


def _example() -> dict[str, np.ndarray | float]:
    """Three test bars, last close 100 each bar, with a model that is right about the range."""
    last_close = np.array([100.0, 100.0, 100.0])
    last_adj_close = np.array([99.0, 99.0, 99.0])
    #                  High   Low   Close  Adj Close
    actual = np.array(
        [
            [102.0, 98.0, 101.0, 100.0],
            [103.0, 99.0, 102.0, 101.0],
            [101.0, 97.0, 98.0, 97.0],
        ]
    )
    predicted = np.array(
        [
            [102.5, 97.5, 100.5, 99.5],
            [103.5, 98.5, 101.0, 100.0],
            [101.5, 96.5, 99.5, 98.5],
        ]
    )
    return {
        "actual": actual,
        "predicted": predicted,
        "last_close": last_close,
        "last_adj_close": last_adj_close,
        "high_ratio": 1.02,
        "low_ratio": 0.98,
        "mase_scale": np.array([2.0, 2.0, 1.0, 1.0]),
    }


def test_evaluate_scores_model_and_baselines() -> None:
    ex = _example()
    report = evaluate(**ex)
    assert isinstance(report, EvaluationReport)
    assert report.n_test == 3

    # Model Close errors (-0.5, -1, 1.5): MAE 1, RMSE sqrt(3.5/3); persistence Close errors
    # (1, 2, -2): RMSE sqrt(3) -> U2 = sqrt(3.5/9)
    assert report.model.mae["Close"] == pytest.approx(1.0)
    assert report.model.rmse["Close"] == pytest.approx(math.sqrt(3.5 / 3))
    assert report.model.mase["Close"] == pytest.approx(1.0)  # scale 1
    assert report.u2()["Close"] == pytest.approx(math.sqrt(3.5 / 9))
    assert report.persistence.rmse["Close"] == pytest.approx(math.sqrt(3))
    assert report.persistence.u2["Close"] == pytest.approx(1.0)

    # Range naive High = 102 every bar: errors (0, -1, 1) -> RMSE sqrt(2/3)
    # Model High errors (0.5, 0.5, 0.5) -> RMSE 0.5 ; U2 vs range naive = 0.5 / sqrt(2/3)
    assert report.range_naive.rmse["High"] == pytest.approx(math.sqrt(2 / 3))
    assert report.u2_range_naive["High"] == pytest.approx(0.5 / math.sqrt(2 / 3))

    # Close direction vs 100: actual (+, +, -), predicted (+, +, -) -> 3/3
    assert (report.directional_accuracy, report.directional_n) == (1.0, 3)
    assert report.directional_pvalue == pytest.approx(binomtest(3, 3, 0.5).pvalue)

    # Predicted range contains the realized one on every bar
    assert report.coverage == {"high_below_pred": 1.0, "low_above_pred": 1.0, "inside": 1.0}
    # Range naive (102, 98): High ok on bars 0, 2 ; Low ok on bars 0, 1 -> inside on bar 0 only
    assert report.range_naive_coverage["inside"] == pytest.approx(1 / 3)

    # Per-target numbers agree with the standalone functions
    np.testing.assert_allclose(
        [report.model.rmse[t] for t in TARGETS], rmse(ex["actual"], ex["predicted"])
    )


def test_as_metrics_keys_are_mlflow_safe_and_include_u2_per_target() -> None:
    report = evaluate(**_example())
    metrics = report.as_metrics()
    for key in metrics:
        assert key == key.lower()
        assert " " not in key
        assert re.fullmatch(r"[a-z0-9_]+", key), key
        assert key.startswith("test_")
    for target in ("high", "low", "close", "adj_close"):
        assert f"test_u2_{target}" in metrics
        assert f"test_u2_range_naive_{target}" in metrics
        assert f"test_rmse_{target}" in metrics
        assert f"test_mase_{target}" in metrics
        assert f"test_baseline_persistence_rmse_{target}" in metrics
        assert f"test_baseline_range_naive_rmse_{target}" in metrics
    for key in (
        "test_directional_accuracy",
        "test_directional_pvalue",
        "test_directional_n",
        "test_range_inside",
        "test_range_high_below_pred",
        "test_range_low_above_pred",
        "test_n_test",
    ):
        assert key in metrics
    assert metrics["test_u2_adj_close"] == pytest.approx(report.u2()["Adj Close"])
    assert all(isinstance(v, float) for v in metrics.values())
    assert set(report.u2()) == set(TARGETS)


def test_as_metrics_prefix() -> None:
    report = evaluate(**_example())
    assert all(k.startswith("val_") for k in report.as_metrics(prefix="val"))
    assert "u2_close" in report.as_metrics(prefix="")
    with pytest.raises(ValueError, match="prefix"):
        report.as_metrics(prefix="Test X")


def test_as_metrics_keeps_nan() -> None:
    ex = _example()
    ex["predicted"] = persistence_forecast(ex["last_close"], ex["last_adj_close"])
    ex["mase_scale"] = np.array([2.0, 2.0, 0.0, np.nan])
    report = evaluate(**ex)
    metrics = report.as_metrics()
    # persistence makes no directional call and has a zero/NaN MASE scale on Close/Adj Close
    assert math.isnan(metrics["test_directional_accuracy"])
    assert math.isnan(metrics["test_directional_pvalue"])
    assert metrics["test_directional_n"] == 0.0
    assert math.isnan(metrics["test_mase_close"])
    assert math.isnan(metrics["test_mase_adj_close"])
    assert metrics["test_u2_close"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        rmse([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="shape mismatch"):
        mae(ACTUAL_2D, PRED_2D[:, :1])
    with pytest.raises(ValueError, match="shape mismatch"):
        theil_u2([1.0, 2.0], [1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="shape mismatch"):
        directional_accuracy([1.0, 2.0], [1.0, 2.0], [1.0])


def test_evaluate_rejects_bad_shapes() -> None:
    ex = _example()
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        evaluate(**{**ex, "predicted": ex["predicted"][:, :3]})
    with pytest.raises(ValueError, match="shape mismatch"):
        evaluate(**{**ex, "predicted": ex["predicted"][:2]})
    with pytest.raises(ValueError, match="last_close"):
        evaluate(**{**ex, "last_close": ex["last_close"][:2]})
    with pytest.raises(ValueError, match="mase_scale"):
        evaluate(**{**ex, "mase_scale": np.ones(3)})


def test_empty_and_non_finite_input_raise() -> None:
    with pytest.raises(ValueError, match="empty"):
        rmse([], [])
    with pytest.raises(ValueError, match="empty"):
        evaluate(np.empty((0, 4)), np.empty((0, 4)), [], [], 1.0, 1.0, np.ones(4))
    with pytest.raises(ValueError, match="NaN or infinite"):
        mae([1.0, 2.0], [1.0, np.nan])
    ex = _example()
    bad = ex["predicted"].copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="predicted"):
        evaluate(**{**ex, "predicted": bad})


# --------------------------------------------------------------------------------------------------
# Diebold-Mariano
# --------------------------------------------------------------------------------------------------


def test_diebold_mariano_matches_the_formula_with_the_small_sample_correction() -> None:
    rng = np.random.default_rng(3)
    e, r = rng.normal(size=40), rng.normal(size=40) * 0.8
    d = e**2 - r**2
    raw = d.mean() / np.sqrt(d.var() / len(d))  # population variance: gamma_0
    expected = raw * np.sqrt((40 + 1 - 2) / 40)
    from scipy.stats import t

    got = diebold_mariano(e, r)
    assert got["stat"] == pytest.approx(expected, rel=1e-12)
    assert got["p_worse"] == pytest.approx(t.sf(expected, 39), rel=1e-12)
    assert got["p_worse"] + got["p_better"] == pytest.approx(1.0)


def test_diebold_mariano_is_antisymmetric_and_detects_a_worse_forecast() -> None:
    rng = np.random.default_rng(4)
    noise = rng.normal(size=300)
    worse, better = noise * 1.5, noise * 0.5 + rng.normal(size=300) * 0.1
    result = diebold_mariano(worse, better)
    assert result["p_worse"] < 1e-6 and result["p_better"] > 0.999
    swapped = diebold_mariano(better, worse)
    assert swapped["stat"] == pytest.approx(-result["stat"])


def test_diebold_mariano_of_a_forecast_equal_to_its_reference_is_nan() -> None:
    errors = np.array([0.1, -0.2, 0.3, 0.0])
    assert all(np.isnan(v) for v in diebold_mariano(errors, errors).values())


def test_diebold_mariano_horizon_adds_the_autocovariances() -> None:
    rng = np.random.default_rng(5)
    e, r = rng.normal(size=60), rng.normal(size=60)
    d = e**2 - r**2
    c = d - d.mean()
    n, h = 60, 3
    long_run = (c @ c + 2 * (c[1:] @ c[:-1]) + 2 * (c[2:] @ c[:-2])) / n
    expected = np.sqrt((n + 1 - 2 * h + h * (h - 1) / n) / n) * d.mean() / np.sqrt(long_run / n)
    assert diebold_mariano(e, r, horizon=3)["stat"] == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="horizon"):
        diebold_mariano(e, r, horizon=0)
