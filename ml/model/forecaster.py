"""From a trained model to prices.

`PriceForecaster` bundles a fitted model of the next bar's log-ratios (a Keras network, `lstm` or
`gru`, with the train-only scalers; or a statistical model of `ml.model.statistical`: `har`,
`gbm`, `naive`) with the skill weights toward the baselines; it takes raw bars and
returns the next bar's High, Low, Close and Adj Close in prices. The registered MLflow model is that
same object behind the pyfunc interface (`ml.registry.pyfunc`), so
`models:/price-forecast-<slug>@champion` predicts prices from a frame of recent bars.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.config import NETWORK_KINDS
from ml.model.features import FEATURES, TARGETS, feature_names
from ml.model.windows import Scaler, _relative_inputs, trailing_ratios

if TYPE_CHECKING:
    import keras
    import numpy as np
    import pandas as pd

    from ml.model.quantiles import ResidualQuantiles
    from ml.model.statistical import StatisticalModel
    from ml.model.windows import SplitData, WindowSet


KERAS_FILE = "model.keras"


PREPROCESSING_FILE = "preprocessing.json"


@dataclass
class PriceForecaster:
    kind: str
    window: int
    # The network (NETWORK_KINDS) or the statistical model (`ml.model.statistical`).
    model: keras.Model | StatisticalModel
    x_scaler: Scaler
    y_scaler: Scaler
    # Per-target shrinkage toward the target's baseline (`anchors`) in log-ratio space, fitted on
    # the validation block (see ml.model.training.fit_skill_weights): 0 = the baseline, 1 = the network.
    skill_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    # The volatility-memory horizons of the inputs (ml.model.features); () = the notebook's 8 inputs.
    horizons: tuple[int, ...] = ()
    # Per target, the baseline a weight of 0 falls back to: "persistence" (log-ratio 0) or
    # "range_naive" (High/Low: last Close x the trailing mean High/Low-to-previous-Close ratio).
    anchors: tuple[str, ...] = ("persistence",) * len(TARGETS)
    naive_lookback: int = 20
    # The next bar's quantiles (`ml.model.quantiles`), calibrated on the validation block; None:
    # a model saved before they existed, or one without the volatility memory they read.
    intervals: ResidualQuantiles | None = None

    @property
    def context_bars(self) -> int:
        """Bars before a forecast that make its inputs exactly those of training: the window,
        the longest memory horizon or naive lookback before it, and one bar for the return."""
        return self.window + max((*self.horizons, self.naive_lookback)) + 1

    @property
    def is_network(self) -> bool:
        return self.kind in NETWORK_KINDS

    @property
    def features(self) -> tuple[str, ...]:
        return feature_names(self.horizons) if self.horizons else FEATURES

    def anchor_log_ratios(self, high_ratio: Any, low_ratio: Any, n: int) -> np.ndarray:
        """(n, 4) log-ratios of the baselines in `anchors` for windows whose range-naive ratios
        are `high_ratio` and `low_ratio` (None where every anchor is persistence)."""
        import numpy as np

        base = np.zeros((n, len(TARGETS)))
        for j, anchor in enumerate(self.anchors):
            if anchor == "persistence":
                continue
            ratio = {"High": high_ratio, "Low": low_ratio}.get(TARGETS[j])
            if anchor != "range_naive" or ratio is None:
                raise ValueError(f"{TARGETS[j]}: anchor {anchor!r} needs the range-naive ratios")
            base[:, j] = np.log(np.asarray(ratio, dtype="float64"))
        return base

    def raw_log_ratios(self, x: np.ndarray) -> np.ndarray:
        """The model's log-ratio predictions for relative windows `x`, before shrinkage.

        A statistical model reads the unscaled windows. A network: its arithmetic in NumPy
        (`ml.model.networks.numpy_forward`), or, for a network with a layer no NumPy kernel
        computes, a direct (eager) Keras call; not `model.predict`, which would trace a graph
        function for every new model (about 0.3 s each, more than the prediction itself).
        """
        import numpy as np

        if not self.is_network:
            return np.asarray(self.model.predict(x), dtype="float64")
        from ml.model.networks import numpy_forward

        inputs = self.x_scaler.transform(x).astype("float32")
        forward = numpy_forward(self.model)
        scaled = forward(inputs) if forward else self.model(inputs, training=False)
        return self.y_scaler.inverse(np.asarray(scaled, dtype="float64"))

    def network_offsets(self, x: np.ndarray, base: np.ndarray) -> np.ndarray:
        """(n, 4) how far the model's log-ratio forecast lies from the anchors' `base`."""
        return self.raw_log_ratios(x) - base

    def point_log_ratios(
        self, x: np.ndarray, high_ratio: Any = None, low_ratio: Any = None
    ) -> np.ndarray:
        """(n, 4) log-ratios for relative windows `x` (n, window, n_features): per target, the
        baseline's log-ratio plus the skill weight times the model's difference from it."""
        import numpy as np

        base = self.anchor_log_ratios(high_ratio, low_ratio, len(x))
        return base + self.network_offsets(x, base) * np.asarray(self.skill_weights)

    def predict_windows(
        self,
        x: np.ndarray,
        last_close: np.ndarray,
        last_adj_close: np.ndarray,
        high_ratio: np.ndarray | None = None,
        low_ratio: np.ndarray | None = None,
    ) -> np.ndarray:
        """Prices (n, 4) of `point_log_ratios`."""
        return self.forecast_windows(x, last_close, last_adj_close, high_ratio, low_ratio)[0]

    def forecast_windows(
        self,
        x: np.ndarray,
        last_close: np.ndarray,
        last_adj_close: np.ndarray,
        high_ratio: np.ndarray | None = None,
        low_ratio: np.ndarray | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The point prices (n, 4) and the quantile column -> (n,) prices (empty without
        `intervals`), both from one computation of the point log-ratios."""
        import numpy as np

        if len(x) == 0:
            return np.empty((0, len(TARGETS))), {}
        log_ratio = self.point_log_ratios(x, high_ratio, low_ratio)
        prices = np.stack([last_close, last_close, last_close, last_adj_close], axis=1)
        return prices * np.exp(log_ratio), self.quantile_windows(x, last_close, log_ratio)

    def quantile_windows(
        self, x: np.ndarray, last_close: np.ndarray, log_ratio: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Quantile column -> (n,) prices, for windows `x` whose point log-ratios (n, 4) are
        `log_ratio` (empty without `intervals`)."""
        import numpy as np

        from ml.model.quantiles import QUANTILE_TARGETS

        if self.intervals is None or len(x) == 0:
            return {}
        order = [TARGETS.index(t) for t in QUANTILE_TARGETS]
        logs = self.intervals.log_quantiles(x, self.features, log_ratio[:, order])
        return {name: last_close * np.exp(value) for name, value in logs.items()}

    def residuals(self, part: WindowSet) -> np.ndarray:
        """(n, 3) log-ratio residuals of the point forecast on `part`, in QUANTILE_TARGETS order."""
        from ml.model.quantiles import QUANTILE_TARGETS

        order = [TARGETS.index(t) for t in QUANTILE_TARGETS]
        point = self.point_log_ratios(part.x, part.high_ratio, part.low_ratio)
        return (part.y - point)[:, order]

    def calibrate(self, split: SplitData) -> None:
        """Fit `intervals` (in place): the scale on the train block's residuals, the scores on
        those of every bar before the test block (`ml.model.quantiles`); nothing of the test
        block. A forecaster without volatility memory (`horizons` empty) gets none."""
        import numpy as np

        from ml.model.quantiles import ResidualQuantiles

        if not self.horizons or len(split.val) < 2:
            self.intervals = None
            return
        train = (split.train.x, self.residuals(split.train))
        val = (split.val.x, self.residuals(split.val))
        calibration = tuple(np.concatenate(pair) for pair in zip(train, val, strict=True))
        self.intervals = ResidualQuantiles.fit(self.features, self.horizons, train, calibration)

    def predict_frame(self, bars: pd.DataFrame) -> pd.DataFrame:
        """One forecast per window of `bars`: row i predicts the bar after `Date` (window's end)."""
        import pandas as pd

        from ml.model.features import build_features

        bars = bars.sort_values("Date").reset_index(drop=True)
        bars["Date"] = pd.to_datetime(bars["Date"]).astype("datetime64[ns]")
        feats = build_features(bars, self.horizons)
        if len(feats) < self.window:
            raise ValueError(
                f"need at least {self.window + 1} consecutive bars to forecast, got {len(bars)}"
            )
        x = _relative_inputs(feats, self.window, self.features)
        high_ratio, low_ratio = trailing_ratios(feats, self.naive_lookback)
        ends = bars.iloc[self.window :].reset_index(drop=True)
        prices, quantiles = self.forecast_windows(
            x,
            ends["Close"].to_numpy(dtype="float64"),
            ends["Adj Close"].to_numpy(dtype="float64"),
            high_ratio[self.window - 1 :],
            low_ratio[self.window - 1 :],
        )
        out = pd.DataFrame(prices, columns=list(TARGETS))
        for name, values in quantiles.items():
            out[name] = values
        out.insert(0, "Date", ends["Date"].to_numpy())
        return out

    def save(self, directory: Path) -> dict[str, str]:
        """Write the model and scalers to `directory`; returns the artifact paths by name.

        A network: `model.keras` and `preprocessing.json`; a statistical model is JSON inside
        `preprocessing.json` (key `model`), one file: every artifact file is one request to the
        tracking server when logging and again when a champion is downloaded."""
        directory.mkdir(parents=True, exist_ok=True)
        paths = {}
        extra: dict[str, Any] = {}
        if self.is_network:
            keras_path = directory / KERAS_FILE
            self.model.save(keras_path)
            paths["keras_model"] = str(keras_path)
        else:
            extra["model"] = self.model.to_dict()
        if self.intervals is not None:
            extra["intervals"] = self.intervals.to_dict()
        prep_path = directory / PREPROCESSING_FILE
        prep_path.write_text(
            json.dumps(
                {
                    **extra,
                    "kind": self.kind,
                    "window": self.window,
                    "x_scaler": self.x_scaler.to_dict(),
                    "y_scaler": self.y_scaler.to_dict(),
                    "skill_weights": list(self.skill_weights),
                    "horizons": list(self.horizons),
                    "anchors": list(self.anchors),
                    "naive_lookback": self.naive_lookback,
                    "features": list(self.features),
                },
                indent=2,
                sort_keys=True,
            )
        )
        return {**paths, "preprocessing": str(prep_path)}

    @classmethod
    def load(cls, keras_path: str | Path | None, preprocessing_path: str | Path) -> PriceForecaster:
        """The forecaster `save` wrote; `keras_path` is None for a statistical model."""
        prep = json.loads(Path(preprocessing_path).read_text())
        horizons = tuple(int(k) for k in prep.get("horizons", ()))
        model: Any
        if prep["kind"] in NETWORK_KINDS:
            import keras

            if keras_path is None:
                raise ValueError(f"a {prep['kind']} forecaster needs its {KERAS_FILE}")
            model = keras.saving.load_model(keras_path, compile=False)
        else:
            from ml.model.statistical import from_dict

            model = from_dict(prep["model"], horizons)
        return cls(
            kind=prep["kind"],
            window=int(prep["window"]),
            model=model,
            x_scaler=Scaler.from_dict(prep["x_scaler"]),
            y_scaler=Scaler.from_dict(prep["y_scaler"]),
            skill_weights=tuple(prep.get("skill_weights", (1.0, 1.0, 1.0, 1.0))),
            # Models saved before these keys existed: 8 inputs, persistence anchors.
            horizons=horizons,
            anchors=tuple(prep.get("anchors", ("persistence",) * len(TARGETS))),
            naive_lookback=int(prep.get("naive_lookback", 20)),
            intervals=_intervals(prep.get("intervals")),
        )


def _intervals(data: dict[str, Any] | None) -> ResidualQuantiles | None:
    from ml.model.quantiles import ResidualQuantiles

    return None if data is None else ResidualQuantiles.from_dict(data)


def forecast_next_bar(
    forecaster: PriceForecaster, history: pd.DataFrame
) -> tuple[pd.Timestamp, dict[str, float]]:
    """The next bar after the last bar of `history`, in prices: the points and, when the model
    has them, the quantile columns (`ml.model.quantiles.column`)."""
    tail = history.iloc[-forecaster.context_bars :]
    predicted = forecaster.predict_frame(tail).iloc[-1]
    return predicted["Date"], {k: float(v) for k, v in predicted.items() if k != "Date"}
