"""Test-block metrics for a next-bar price forecast, and the naive baselines it must beat.

Everything here is pure numpy/scipy and works in PRICE units: predictions and actuals are arrays of
shape (n, 4) with columns in `TARGETS` order, and the last close / last adjusted close of each input
window are arrays of shape (n,). The model's own scaling never leaks in here, so the model and the
baselines are scored on exactly the same numbers.

Conventions:
- Inputs must be non-empty, finite and of matching shapes; anything else raises `ValueError`, so a
  diverged model (NaN/inf predictions) fails loudly instead of producing a quietly meaningless score.
- Outputs may be NaN where a metric is undefined (zero MASE scale, zero reference RMSE for U2, no
  directional bars). NaN never compares as "better", so a gate reading these values fails closed.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import binomtest
from scipy.stats import t as student_t

TARGETS = ("High", "Low", "Close", "Adj Close")
N_TARGETS = len(TARGETS)

_PREFIX_PATTERN = re.compile(r"^[a-z0-9_]*$")

logger = logging.getLogger(__name__)

FloatArray = NDArray[np.float64]


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------


def _to_array(name: str, values: ArrayLike, *, allow_nonfinite: bool = False) -> FloatArray:
    """Convert `values` to a float64 array, rejecting empty and (by default) non-finite input."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric: {exc}") from exc
    if array.size == 0:
        raise ValueError(f"{name} is empty: need at least one bar to evaluate")
    if not allow_nonfinite and not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise ValueError(f"{name} contains {bad} NaN or infinite value(s)")
    return array


def _pair(
    actual: ArrayLike, predicted: ArrayLike, names: tuple[str, str] = ("actual", "predicted")
) -> tuple[FloatArray, FloatArray]:
    """Validate two 1-D or 2-D arrays of the same shape, so column-wise errors line up."""
    a = _to_array(names[0], actual)
    p = _to_array(names[1], predicted)
    if a.ndim not in (1, 2):
        raise ValueError(f"{names[0]} must be 1-D or 2-D, got shape {a.shape}")
    if a.shape != p.shape:
        raise ValueError(
            f"shape mismatch: {names[0]} has shape {a.shape}, {names[1]} has shape {p.shape}"
        )
    return a, p


def _targets_matrix(name: str, values: ArrayLike) -> FloatArray:
    """Validate an (n, 4) price matrix whose columns follow `TARGETS`."""
    array = _to_array(name, values)
    if array.ndim != 2 or array.shape[1] != N_TARGETS:
        raise ValueError(
            f"{name} must have shape (n, {N_TARGETS}) with columns {TARGETS}, got {array.shape}"
        )
    return array


def _vectors(**arrays: ArrayLike) -> list[FloatArray]:
    """Validate several 1-D per-bar arrays that must all have the same length."""
    out: list[FloatArray] = []
    first = ""
    for name, values in arrays.items():
        array = _to_array(name, values)
        if array.ndim != 1:
            raise ValueError(f"{name} must be 1-D with one value per bar, got shape {array.shape}")
        if out and array.shape[0] != out[0].shape[0]:
            raise ValueError(
                f"shape mismatch: {name} has {array.shape[0]} bars, {first} has {out[0].shape[0]}"
            )
        first = first or name
        out.append(array)
    return out


def _ratio(name: str, values: ArrayLike, n: int) -> FloatArray:
    """Validate a positive price ratio given as a scalar or one value per bar, broadcast to (n,)."""
    array = _to_array(name, values)
    if array.ndim > 1 or (array.ndim == 1 and array.shape[0] not in (1, n)):
        raise ValueError(f"{name} must be a scalar or have shape ({n},), got {array.shape}")
    if np.any(array <= 0):
        raise ValueError(f"{name} must be strictly positive (it scales a price)")
    return np.broadcast_to(array, (n,)).astype(np.float64)


def _safe_divide(numerator: FloatArray, denominator: FloatArray) -> FloatArray:
    """Element-wise division that yields NaN (not inf, not a warning) where the denominator is 0."""
    numerator, denominator = np.broadcast_arrays(numerator, denominator)
    out = np.full(numerator.shape, np.nan, dtype=np.float64)
    ok = np.isfinite(denominator) & (denominator != 0)
    np.divide(numerator, denominator, out=out, where=ok)
    return out


def _scalar_or_array(values: FloatArray, one_dimensional: bool) -> FloatArray | float:
    """Return a Python float for 1-D inputs and the per-column array for 2-D inputs."""
    return float(values) if one_dimensional else values


# --------------------------------------------------------------------------------------------------
# Error metrics
# --------------------------------------------------------------------------------------------------


def rmse(actual: ArrayLike, predicted: ArrayLike) -> FloatArray | float:
    """Root mean squared error per column ((n, k) -> (k,)), or a float for 1-D input."""
    a, p = _pair(actual, predicted)
    return _scalar_or_array(np.sqrt(np.mean((p - a) ** 2, axis=0)), a.ndim == 1)


def mae(actual: ArrayLike, predicted: ArrayLike) -> FloatArray | float:
    """Mean absolute error per column ((n, k) -> (k,)), or a float for 1-D input."""
    a, p = _pair(actual, predicted)
    return _scalar_or_array(np.mean(np.abs(p - a), axis=0), a.ndim == 1)


def mase(actual: ArrayLike, predicted: ArrayLike, scale: ArrayLike) -> FloatArray | float:
    """Mean absolute scaled error (MAE / `scale`), comparable across tickers and price levels.

    `scale` is the train-block persistence MAE from `mase_scale` (scalar for 1-D input, one per
    column for 2-D). Where it is 0 or NaN the result is NaN, never inf.
    """
    a, p = _pair(actual, predicted)
    s = _to_array("scale", scale, allow_nonfinite=True)
    expected = () if a.ndim == 1 else (a.shape[1],)
    if s.shape not in {(), expected}:
        raise ValueError(
            f"scale must have shape {expected or 'scalar'} to match the data, got {s.shape}"
        )
    if np.any(s < 0):
        raise ValueError("scale must be non-negative (it is a mean absolute error)")
    errors = np.mean(np.abs(p - a), axis=0)
    return _scalar_or_array(_safe_divide(errors, s), a.ndim == 1)


def mase_scale(
    train_actual: ArrayLike, train_last_close: ArrayLike, train_last_adj_close: ArrayLike
) -> FloatArray:
    """MAE of the persistence forecast on the train windows, per target: MASE's denominator.

    Fitted on train only (the test block never informs the scale). A target whose persistence MAE is
    0 (a flat series) gets NaN rather than a zero that would later turn MASE into inf.
    """
    actual = _targets_matrix("train_actual", train_actual)
    reference = persistence_forecast(train_last_close, train_last_adj_close)
    if reference.shape[0] != actual.shape[0]:
        raise ValueError(
            f"shape mismatch: train_actual has {actual.shape[0]} bars, "
            f"train_last_close has {reference.shape[0]}"
        )
    scale = np.mean(np.abs(actual - reference), axis=0)
    zero = scale == 0
    if np.any(zero):
        names = [t for t, z in zip(TARGETS, zero, strict=True) if z]
        logger.warning("MASE scale is zero for %s (flat train series): MASE will be NaN", names)
    return np.where(zero, np.nan, scale)


def theil_u2(actual: ArrayLike, predicted: ArrayLike, reference: ArrayLike) -> FloatArray | float:
    """Theil's U2 per column, RMSE(predicted) / RMSE(reference): below 1 beats the reference.

    Reports use persistence as the reference. NaN where the reference RMSE is 0 (a perfect
    reference cannot be beaten, and a ratio to 0 means nothing).
    """
    a, p = _pair(actual, predicted)
    _, r = _pair(actual, reference, ("actual", "reference"))
    model_rmse = np.sqrt(np.mean((p - a) ** 2, axis=0))
    reference_rmse = np.sqrt(np.mean((r - a) ** 2, axis=0))
    return _scalar_or_array(_safe_divide(model_rmse, reference_rmse), a.ndim == 1)


# --------------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------------


def persistence_forecast(last_close: ArrayLike, last_adj_close: ArrayLike) -> FloatArray:
    """Persistence baseline, shape (n, 4): High = Low = Close = last Close, Adj Close = last Adj Close.

    Adj Close is predicted from the last *adjusted* close, not the last Close: for a dividend payer
    the adjusted series sits below the raw one, so comparing it with the raw Close would make the
    baseline wrong by the cumulative dividend adjustment every bar, a strawman that is easy to beat.
    """
    close, adj_close = _vectors(last_close=last_close, last_adj_close=last_adj_close)
    return np.column_stack([close, close, close, adj_close])


def range_naive_forecast(
    last_close: ArrayLike,
    last_adj_close: ArrayLike,
    high_ratio: ArrayLike,
    low_ratio: ArrayLike,
) -> FloatArray:
    """Range-aware naive baseline (n, 4): last Close scaled by typical High/Low-to-Close ratios.

    High = last Close * high_ratio, Low = last Close * low_ratio, Close = last Close,
    Adj Close = last Adj Close. The ratios (scalars or one per bar) are trailing means of High_t / Close_{t-1} and
    Low_t / Close_{t-1}; the caller computes them point-in-time so no future bar leaks in. This is
    the fair bar for High/Low, which persistence misses by the typical intraday range.
    """
    close, adj_close = _vectors(last_close=last_close, last_adj_close=last_adj_close)
    n = close.shape[0]
    high = close * _ratio("high_ratio", high_ratio, n)
    low = close * _ratio("low_ratio", low_ratio, n)
    return np.column_stack([high, low, close, adj_close])


# --------------------------------------------------------------------------------------------------
# Direction and range
# --------------------------------------------------------------------------------------------------


def directional_accuracy(
    actual_close: ArrayLike, predicted_close: ArrayLike, last_close: ArrayLike
) -> tuple[float, int, float]:
    """Hit rate of the predicted Close move's sign, bars counted, and a two-sided p-value vs 50%.

    The p-value is `scipy.stats.binomtest(hits, n, 0.5)`: how surprising the hit rate would be for
    a coin flip, so a 60% hit rate over 10 bars is not mistaken for skill. Ties are excluded: a bar counts only if actual != last and predicted != last (exact equality),
    since a flat move has no direction to get right and a flat forecast makes no call. With no
    counted bars the result is (nan, 0, nan); e.g. persistence always scores that.
    """
    actual, predicted, last = _vectors(
        actual_close=actual_close, predicted_close=predicted_close, last_close=last_close
    )
    actual_sign = np.sign(actual - last)
    predicted_sign = np.sign(predicted - last)
    counted = (actual_sign != 0) & (predicted_sign != 0)
    n = int(np.count_nonzero(counted))
    if n == 0:
        return math.nan, 0, math.nan
    hits = int(np.count_nonzero(actual_sign[counted] == predicted_sign[counted]))
    pvalue = float(binomtest(hits, n, p=0.5, alternative="two-sided").pvalue)
    return hits / n, n, pvalue


def range_coverage(
    actual_high: ArrayLike,
    actual_low: ArrayLike,
    predicted_high: ArrayLike,
    predicted_low: ArrayLike,
) -> dict[str, float]:
    """Shares of bars whose realized High/Low stay within the predicted High/Low (a range check).

    Keys: "high_below_pred" (realized High <= predicted High), "low_above_pred" (realized Low >=
    predicted Low) and "inside" (both: the realized range lies inside the predicted one).
    """
    high, low, pred_high, pred_low = _vectors(
        actual_high=actual_high,
        actual_low=actual_low,
        predicted_high=predicted_high,
        predicted_low=predicted_low,
    )
    high_ok = high <= pred_high
    low_ok = low >= pred_low
    return {
        "high_below_pred": float(np.mean(high_ok)),
        "low_above_pred": float(np.mean(low_ok)),
        "inside": float(np.mean(high_ok & low_ok)),
    }


def diebold_mariano(
    errors: ArrayLike, reference_errors: ArrayLike, horizon: int = 1
) -> dict[str, float]:
    """Diebold-Mariano test of equal squared-error loss, with the Harvey, Leybourne and Newbold
    (1997) small-sample correction and Student-t p-values (n - 1 degrees of freedom).

    d_t = errors_t^2 - reference_errors_t^2; the long-run variance of its mean uses the
    autocovariances up to `horizon` - 1 (0 for one-step forecasts). Returns {"stat", "p_worse",
    "p_better"}: one-sided p-values of "the forecast's loss is larger" (small p_worse: it is
    significantly worse than the reference) and "smaller". NaN when d does not vary (e.g. a
    forecast equal to its reference).
    """
    e, r = _vectors(errors=errors, reference_errors=reference_errors)
    return diebold_mariano_losses(e * e, r * r, horizon)


def diebold_mariano_losses(
    losses: ArrayLike, reference_losses: ArrayLike, horizon: int = 1
) -> dict[str, float]:
    """`diebold_mariano` of any per-bar loss (an interval score, a pinball loss) against the
    reference's on the same bars."""
    loss, reference = _vectors(losses=losses, reference_losses=reference_losses)
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    d = loss - reference
    n = d.shape[0]
    centered = d - d.mean()
    long_run = float(centered @ centered) / n
    for k in range(1, min(horizon, n)):
        long_run += 2.0 * float(centered[k:] @ centered[:-k]) / n
    if n < 3 or long_run <= 0 or not math.isfinite(long_run):
        return {"stat": math.nan, "p_worse": math.nan, "p_better": math.nan}
    correction = math.sqrt((n + 1 - 2 * horizon + horizon * (horizon - 1) / n) / n)
    stat = correction * float(d.mean()) / math.sqrt(long_run / n)
    return {
        "stat": stat,
        "p_worse": float(student_t.sf(stat, n - 1)),
        "p_better": float(student_t.cdf(stat, n - 1)),
    }


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _metric_key(*parts: str) -> str:
    """Join name parts into a lowercase, space-free MLflow key ("Adj Close" -> "adj_close")."""
    return "_".join(p.strip().lower().replace(" ", "_") for p in parts if p)


def _per_target(values: FloatArray | float) -> dict[str, float]:
    """Map a (4,) metric array onto the target names."""
    return {t: float(v) for t, v in zip(TARGETS, np.atleast_1d(values), strict=True)}


@dataclass(frozen=True)
class ForecastMetrics:
    """Per-target error metrics of one forecast on the test block, keyed by `TARGETS` names."""

    rmse: Mapping[str, float]
    mae: Mapping[str, float]
    mase: Mapping[str, float]
    u2: Mapping[str, float]  # vs persistence; 1.0 (or NaN) for persistence itself

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        """Flatten to keys like "<prefix>_rmse_high", one per metric and target."""
        return {
            _metric_key(prefix, metric, target): float(getattr(self, metric)[target])
            for metric in ("rmse", "mae", "mase", "u2")
            for target in TARGETS
        }


@dataclass(frozen=True)
class EvaluationReport:
    """Model and baseline scores on one test block: what the promotion gate and MLflow read."""

    n_test: int
    model: ForecastMetrics
    persistence: ForecastMetrics
    range_naive: ForecastMetrics
    u2_range_naive: Mapping[str, float]  # model RMSE / range-naive RMSE, per target
    directional_accuracy: float  # of Close, ties excluded (see `directional_accuracy`)
    directional_n: int
    directional_pvalue: float
    coverage: Mapping[str, float]  # model's predicted High/Low range, see `range_coverage`
    range_naive_coverage: Mapping[str, float]  # same for the range-naive baseline
    # Diebold-Mariano (small-sample corrected) of the model against persistence, per target of
    # High/Low/Close: {"stat", "p_worse", "p_better"}, see `diebold_mariano`.
    dm_vs_persistence: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    # The same test of High and Low against the range-aware naive: the gate refuses a model
    # significantly worse than the cheap answer on either.
    dm_vs_range_naive: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def u2(self) -> dict[str, float]:
        """Model U2 vs persistence per target ("High", "Low", "Close", "Adj Close"), for the gate."""
        return dict(self.model.u2)

    def as_metrics(self, prefix: str = "test") -> dict[str, float]:
        """Flat, MLflow-safe metrics (lowercase, no spaces; NaN stays NaN), e.g. "test_u2_close"."""
        if not _PREFIX_PATTERN.match(prefix):
            raise ValueError(f"prefix must match {_PREFIX_PATTERN.pattern}, got {prefix!r}")
        out: dict[str, float] = {_metric_key(prefix, "n_test"): float(self.n_test)}
        out.update(self.model.as_metrics(prefix))
        for target in TARGETS:
            out[_metric_key(prefix, "u2_range_naive", target)] = float(self.u2_range_naive[target])
        out.update(self.persistence.as_metrics(_metric_key(prefix, "baseline_persistence")))
        out.update(self.range_naive.as_metrics(_metric_key(prefix, "baseline_range_naive")))
        out[_metric_key(prefix, "directional_accuracy")] = float(self.directional_accuracy)
        out[_metric_key(prefix, "directional_n")] = float(self.directional_n)
        out[_metric_key(prefix, "directional_pvalue")] = float(self.directional_pvalue)
        for name, value in self.coverage.items():
            out[_metric_key(prefix, "range", name)] = float(value)
        for name, value in self.range_naive_coverage.items():
            out[_metric_key(prefix, "baseline_range_naive_range", name)] = float(value)
        for target, test in self.dm_vs_persistence.items():
            for name, value in test.items():
                out[_metric_key(prefix, "dm_persistence", target, name)] = float(value)
        for target, test in self.dm_vs_range_naive.items():
            for name, value in test.items():
                out[_metric_key(prefix, "dm_range_naive", target, name)] = float(value)
        return out


def _forecast_metrics(
    actual: FloatArray, predicted: FloatArray, persistence: FloatArray, scale: FloatArray
) -> ForecastMetrics:
    """Score one (n, 4) forecast against the actuals, with U2 relative to persistence."""
    return ForecastMetrics(
        rmse=_per_target(rmse(actual, predicted)),
        mae=_per_target(mae(actual, predicted)),
        mase=_per_target(mase(actual, predicted, scale)),
        u2=_per_target(theil_u2(actual, predicted, persistence)),
    )


def evaluate(
    actual: ArrayLike,
    predicted: ArrayLike,
    last_close: ArrayLike,
    last_adj_close: ArrayLike,
    high_ratio: ArrayLike,
    low_ratio: ArrayLike,
    mase_scale: ArrayLike,
) -> EvaluationReport:
    """Score a model's (n, 4) test-block forecast and both naive baselines on the same bars.

    `mase_scale` is the (4,) train-block persistence MAE (see the `mase_scale` function); the
    ratios feed `range_naive_forecast` and are scalars or one per test bar.
    """
    a = _targets_matrix("actual", actual)
    p = _targets_matrix("predicted", predicted)
    if a.shape != p.shape:
        raise ValueError(
            f"shape mismatch: actual has shape {a.shape}, predicted has shape {p.shape}"
        )
    n = a.shape[0]
    close, adj_close = _vectors(last_close=last_close, last_adj_close=last_adj_close)
    if close.shape[0] != n:
        raise ValueError(f"shape mismatch: actual has {n} bars, last_close has {close.shape[0]}")
    scale = _to_array("mase_scale", mase_scale, allow_nonfinite=True)
    if scale.shape != (N_TARGETS,):
        raise ValueError(f"mase_scale must have shape ({N_TARGETS},), got {scale.shape}")

    persistence = persistence_forecast(close, adj_close)
    range_naive = range_naive_forecast(close, adj_close, high_ratio, low_ratio)
    hi, lo, cl = TARGETS.index("High"), TARGETS.index("Low"), TARGETS.index("Close")

    accuracy, counted, pvalue = directional_accuracy(a[:, cl], p[:, cl], close)
    return EvaluationReport(
        n_test=n,
        model=_forecast_metrics(a, p, persistence, scale),
        persistence=_forecast_metrics(a, persistence, persistence, scale),
        range_naive=_forecast_metrics(a, range_naive, persistence, scale),
        u2_range_naive=_per_target(theil_u2(a, p, range_naive)),
        directional_accuracy=accuracy,
        directional_n=counted,
        directional_pvalue=pvalue,
        coverage=range_coverage(a[:, hi], a[:, lo], p[:, hi], p[:, lo]),
        range_naive_coverage=range_coverage(
            a[:, hi], a[:, lo], range_naive[:, hi], range_naive[:, lo]
        ),
        dm_vs_persistence={
            TARGETS[j]: diebold_mariano(p[:, j] - a[:, j], persistence[:, j] - a[:, j])
            for j in (hi, lo, cl)
        },
        dm_vs_range_naive={
            TARGETS[j]: diebold_mariano(p[:, j] - a[:, j], range_naive[:, j] - a[:, j])
            for j in (hi, lo)
        },
    )
