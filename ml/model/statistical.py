"""The statistical candidates beside the networks: a HAR regression (`har`), gradient boosting on
its residual (`gbm`), and the range-aware naive itself (`naive`, the fallback champion).

Each one maps the same relative windows the networks read (`ml.model.windows`) to the next bar's
log-ratios (High, Low, Close to the last Close; Adj Close to the last Adj Close), so a
`PriceForecaster` holds it in place of a network: the same skill weights toward the baselines,
the same pyfunc, signature and input example. Their inputs are read off the window's last bar:

- the mean log range over each memory horizon (`Range<k>`, as a level: exp of the feature), the
  HAR regressors of volatility's memory;
- that bar's Open, High and Low relative to its Close, its Gap and its Return: where the last bar
  closed inside its own range says something about where the next one's High and Low fall.

The fits minimize the error in PRICES, not in log-ratios: a forecast's price error is about the
last Close times its log-ratio error, so each window's squared error is weighted by its last
Close squared (last Adj Close for Adj Close). Unweighted, the quiet low-price years of a long
history count as much as the recent ones that the test blocks (and tomorrow's forecast) are
priced in. The coefficients and boosted trees are stored as JSON in the model's
`preprocessing.json`; predicting needs NumPy (and LightGBM for `gbm`), not scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ml.model.features import FEATURES, TARGETS, feature_names

if TYPE_CHECKING:
    import numpy as np

    from ml.model.windows import WindowSet

# The last bar's own inputs a statistical model reads besides the memory (relative to its Close).
BAR_INPUTS = ("Open", "High", "Low", "Gap", "Return")
# LightGBM on the HAR residual: few shallow trees, slow learning rate, large leaves, so a few
# thousand noisy windows cannot be memorized. One thread: the train slots share two cores.
GBM_PARAMS: dict[str, Any] = {
    "objective": "regression",
    "n_estimators": 200,
    "learning_rate": 0.03,
    "num_leaves": 8,
    "min_child_samples": 50,
    "subsample": 0.8,
    "subsample_freq": 1,
    "colsample_bytree": 0.8,
    "n_jobs": 1,
    "verbose": -1,
}


def design(x: np.ndarray, horizons: tuple[int, ...]) -> np.ndarray:
    """(n, p) regressors of relative windows `x` (n, window, n_features): the last bar's mean log
    range per horizon (a level, exp of `Range<k>`) and its `BAR_INPUTS`."""
    import numpy as np

    names = feature_names(horizons) if horizons else FEATURES
    last = x[:, -1, :]
    ranges = [np.exp(last[:, names.index(f"Range{k}")]) for k in horizons]
    bar = [last[:, names.index(name)] for name in BAR_INPUTS]
    return np.column_stack([*ranges, *bar])


def price_weights(part: WindowSet) -> np.ndarray:
    """(n, 4) per window and target, the weight that turns a squared log-ratio error into about
    the squared price error: last Close squared (last Adj Close squared for Adj Close), scaled
    to a mean of 1 per target."""
    import numpy as np

    anchors = np.stack([part.last_close] * 3 + [part.last_adj_close], axis=1) ** 2
    return anchors / anchors.mean(axis=0)


def join(*parts: WindowSet) -> WindowSet:
    """Consecutive window sets as one (train and validation, for the final fit)."""
    import numpy as np

    from ml.model.windows import WindowSet

    first = parts[0]
    return WindowSet(
        *(np.concatenate([getattr(p, f) for p in parts]) for f in first.__dataclass_fields__)
    )


@dataclass
class LinearLogRatios:
    """`har`: per target, log-ratio = intercept + coef @ `design(x)`, weighted least squares."""

    horizons: tuple[int, ...]
    intercept: np.ndarray  # (4,)
    coef: np.ndarray  # (4, p)
    kind: str = "har"

    @classmethod
    def fit(cls, part: WindowSet, horizons: tuple[int, ...]) -> LinearLogRatios:
        """scikit-learn's `LinearRegression` per target, weighted by `price_weights`."""
        import numpy as np
        from sklearn.linear_model import LinearRegression

        inputs = design(part.x, horizons)
        weights = price_weights(part)
        fits = [
            LinearRegression().fit(inputs, part.y[:, j], sample_weight=weights[:, j])
            for j in range(len(TARGETS))
        ]
        return cls(
            tuple(horizons),
            np.array([float(f.intercept_) for f in fits]),
            np.stack([np.asarray(f.coef_, dtype="float64") for f in fits]),
        )

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.intercept + design(x, self.horizons) @ self.coef.T

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "intercept": [float(v) for v in self.intercept],
            "coef": [[float(v) for v in row] for row in self.coef],
        }


@dataclass
class BoostedLogRatios:
    """`gbm`: the HAR regression plus, per target, LightGBM trees fitted on its residual (same
    inputs, same price weights): the trees can only add what the linear fit left."""

    linear: LinearLogRatios
    trees: list[str]  # one LightGBM model (its text form) per target
    kind: str = "gbm"
    _boosters: list[Any] = field(default_factory=list, repr=False)

    @classmethod
    def fit(cls, part: WindowSet, horizons: tuple[int, ...], seed: int = 42) -> BoostedLogRatios:
        import lightgbm as lgb

        linear = LinearLogRatios.fit(part, horizons)
        inputs = design(part.x, horizons)
        residual = part.y - linear.predict(part.x)
        weights = price_weights(part)
        trees = []
        for j in range(len(TARGETS)):
            model = lgb.LGBMRegressor(**GBM_PARAMS, random_state=seed)
            model.fit(inputs, residual[:, j], sample_weight=weights[:, j])
            trees.append(model.booster_.model_to_string())
        return cls(linear, trees)

    def predict(self, x: np.ndarray) -> np.ndarray:
        import numpy as np

        if not self._boosters:
            import lightgbm as lgb

            self._boosters = [lgb.Booster(model_str=text) for text in self.trees]
        inputs = design(x, self.linear.horizons)
        boosted = np.stack([b.predict(inputs) for b in self._boosters], axis=1)
        return self.linear.predict(x) + boosted

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "linear": self.linear.to_dict(), "trees": self.trees}


@dataclass
class NaiveLogRatios:
    """`naive`: no fitted part. With skill weights of 0 the forecaster gives its anchors: High
    and Low the range-aware naive, Close and Adj Close persistence."""

    kind: str = "naive"

    def predict(self, x: np.ndarray) -> np.ndarray:
        import numpy as np

        return np.zeros((len(x), len(TARGETS)))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}


StatisticalModel = LinearLogRatios | BoostedLogRatios | NaiveLogRatios


def fit_statistical(
    kind: str, part: WindowSet, horizons: tuple[int, ...], seed: int = 42
) -> StatisticalModel:
    """Fit `kind` (`har`, `gbm` or `naive`) on the windows `part`."""
    if kind == "har":
        return LinearLogRatios.fit(part, horizons)
    if kind == "gbm":
        return BoostedLogRatios.fit(part, horizons, seed)
    if kind == "naive":
        return NaiveLogRatios()
    raise ValueError(f"unknown statistical kind {kind!r}: choose from har, gbm, naive")


def from_dict(data: dict[str, Any], horizons: tuple[int, ...]) -> StatisticalModel:
    """The model `to_dict` wrote (inside a forecaster's preprocessing.json)."""
    import numpy as np

    kind = data["kind"]
    if kind == "har":
        return LinearLogRatios(
            tuple(horizons),
            np.asarray(data["intercept"], dtype="float64"),
            np.asarray(data["coef"], dtype="float64"),
        )
    if kind == "gbm":
        return BoostedLogRatios(from_dict(data["linear"], horizons), list(data["trees"]))
    if kind == "naive":
        return NaiveLogRatios()
    raise ValueError(f"unknown statistical kind {kind!r} in a saved model")
