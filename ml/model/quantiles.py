"""Quantiles of the next bar: the point forecast, a volatility scale, and conformal quantiles of
the scaled residuals (`ResidualQuantiles`).

What daily bars forecast is how much the next bar moves, not which way, so the spread around the
point forecast is modelled on its own, for any model kind alike:

1. **Scale.** Per target (High, Low, Close), the absolute log-ratio residual of the point forecast
   on the TRAIN block is regressed on the window's volatility memory (the mean log range over
   each horizon of `ml.model.features`, as levels: the HAR regressors). The fitted value, floored
   at a fifth of its train median, is the bar's scale.
2. **Calibration.** The residuals divided by their scale are the conformity scores. A quantile
   level q takes their k-th smallest value with the split-conformal rank (k = ceil((n + 1) q)
   above the median, floor((n + 1) q) below), which keeps each one-sided level's coverage at
   least q on exchangeable bars (Lei et al. 2018, "locally weighted" split conformal). The
   scores come from every bar before the test block, train and validation: a calibration of
   years spans more volatility regimes than the validation block alone (which left the 2008
   crisis under-covered on real MSFT). The train block's residuals are in sample for the point
   model; for these models (a least-squares fit of a dozen coefficients, or networks stopped
   early on validation) they are about as large as unseen ones, and the coverage figures in
   BENCHMARKS.md and REALDATA.md are measured on test blocks nothing was fitted on.
   Neither step sees the test block or any bar after it.
3. **Forecast.** The q quantile of a target's log-ratio is the point forecast's plus the scale
   times the calibrated score; a price is the last Close times its exponential. A positive scale
   keeps the levels in order.

MAPIE implements split conformal prediction for scikit-learn estimators; it is not used here
because the point models are window models that are not scikit-learn estimators, the levels are
one-sided (High's 0.90, Low's 0.10) and not symmetric intervals, and the registered model must
load from JSON with NumPy alone. The rank rule above is the whole of what it would compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

# The quantile levels forecast per target: Close's 80 % and 90 % central intervals and its median,
# High's upper and Low's lower tail (a stop or a limit order sits there).
QUANTILES: dict[str, tuple[float, ...]] = {
    "Close": (0.05, 0.10, 0.50, 0.90, 0.95),
    "High": (0.90, 0.95),
    "Low": (0.10, 0.05),
}
QUANTILE_TARGETS = tuple(QUANTILES)
# A bar's scale is at least this share of the median train scale: a linear fit of an absolute
# value can reach zero or below on the quietest windows.
SCALE_FLOOR = 0.2


def column(target: str, level: float) -> str:
    """The output column of a quantile, e.g. "Close q05", "High q90"."""
    return f"{target} q{round(level * 100):02d}"


def quantile_columns() -> tuple[str, ...]:
    return tuple(column(t, q) for t, levels in QUANTILES.items() for q in levels)


def record_key(target: str, level: float) -> str:
    """The field of a quantile in a forecast record (the ledger, the CSV export, the dashboard),
    e.g. "pred_close_q05", "pred_high_q90"."""
    return f"pred_{target.lower()}_q{round(level * 100):02d}"


# Every quantile's record field, in QUANTILES order.
RECORD_KEYS = tuple(record_key(t, q) for t, levels in QUANTILES.items() for q in levels)


def conformal_rank(n: int, level: float) -> int:
    """The 1-based rank of the calibration score that is the `level` quantile of `n` scores."""
    if level > 0.5:
        return min(n, math.ceil((n + 1) * level))
    if level < 0.5:
        return max(1, math.floor((n + 1) * level))
    return max(1, math.ceil(n / 2))


def scale_inputs(x: np.ndarray, features: tuple[str, ...], horizons: tuple[int, ...]) -> np.ndarray:
    """(n, p) the volatility memory at each window's last bar, as levels: the mean log range
    over each horizon and the realized return volatility over each horizon above one bar."""
    import numpy as np

    last = x[:, -1, :]
    names = [f"Range{k}" for k in horizons] + [f"Vol{k}" for k in horizons if k > 1]
    return np.column_stack([np.exp(last[:, features.index(name)]) for name in names])


@dataclass
class ResidualQuantiles:
    """The scale model and calibrated scores of every target in `QUANTILE_TARGETS`."""

    horizons: tuple[int, ...]
    intercept: np.ndarray  # (3,) per QUANTILE_TARGETS
    coef: np.ndarray  # (3, p) on `scale_inputs`
    floor: np.ndarray  # (3,)
    # Per target, level -> calibrated score (residual / scale) at that level.
    scores: dict[str, dict[float, float]]
    n_calibration: int

    @classmethod
    def fit(
        cls,
        features: tuple[str, ...],
        horizons: tuple[int, ...],
        train: tuple[np.ndarray, np.ndarray],
        calibration: tuple[np.ndarray, np.ndarray],
    ) -> ResidualQuantiles:
        """`train` and `calibration` are (windows x, log-ratio residuals (n, 3) in
        QUANTILE_TARGETS order) of the train and validation blocks."""
        import numpy as np

        x_train, r_train = train
        inputs = np.column_stack([np.ones(len(x_train)), scale_inputs(x_train, features, horizons)])
        beta, *_ = np.linalg.lstsq(inputs, np.abs(r_train), rcond=None)
        fitted = inputs @ beta
        floor = SCALE_FLOOR * np.maximum(np.median(fitted, axis=0), 1e-12)
        model = cls(tuple(horizons), beta[0], beta[1:].T, floor, {}, 0)
        x_cal, r_cal = calibration
        z = np.sort(r_cal / model.scale(x_cal, features), axis=0)
        n = len(z)
        model.scores = {
            t: {q: float(z[conformal_rank(n, q) - 1, j]) for q in QUANTILES[t]}
            for j, t in enumerate(QUANTILE_TARGETS)
        }
        model.n_calibration = n
        return model

    def scale(self, x: np.ndarray, features: tuple[str, ...]) -> np.ndarray:
        """(n, 3) each window's scale per target."""
        import numpy as np

        fitted = self.intercept + scale_inputs(x, features, self.horizons) @ self.coef.T
        return np.maximum(fitted, self.floor)

    def log_quantiles(
        self, x: np.ndarray, features: tuple[str, ...], point: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Quantile column -> (n,) log-ratio, for windows `x` whose point log-ratios (n, 3) in
        QUANTILE_TARGETS order are `point`."""
        scale = self.scale(x, features)
        return {
            column(t, q): point[:, j] + scale[:, j] * self.scores[t][q]
            for j, t in enumerate(QUANTILE_TARGETS)
            for q in QUANTILES[t]
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "split-conformal scaled residuals",
            "horizons": list(self.horizons),
            "intercept": [float(v) for v in self.intercept],
            "coef": [[float(v) for v in row] for row in self.coef],
            "floor": [float(v) for v in self.floor],
            "scores": {t: {str(q): v for q, v in s.items()} for t, s in self.scores.items()},
            "n_calibration": self.n_calibration,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResidualQuantiles:
        import numpy as np

        return cls(
            tuple(int(k) for k in data["horizons"]),
            np.asarray(data["intercept"], dtype="float64"),
            np.asarray(data["coef"], dtype="float64"),
            np.asarray(data["floor"], dtype="float64"),
            {t: {float(q): float(v) for q, v in s.items()} for t, s in data["scores"].items()},
            int(data["n_calibration"]),
        )
