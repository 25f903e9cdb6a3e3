"""From a trained network to prices: the forecaster, its MLflow pyfunc wrapper, the forecasts table.

`PriceForecaster` bundles the Keras network with the train-only scalers; it takes raw bars and
returns the next bar's High, Low, Close and Adj Close in prices. The registered MLflow model is that
same object behind the pyfunc interface, so `models:/price-forecast-<slug>@champion` predicts
prices from a frame of recent bars.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.features import FEATURES, TARGETS, feature_names
from ml.store import CorruptFile
from ml.windows import Scaler, _relative_inputs, trailing_ratios

if TYPE_CHECKING:
    import keras
    import numpy as np
    import pandas as pd

    from ml.config import Settings
    from ml.universe import Instrument

FORECAST_COLUMNS = [
    "ticker",
    "logical_date",
    "last_bar_date",
    "last_close",
    "pred_high",
    "pred_low",
    "pred_close",
    "pred_adj_close",
    "model_name",
    "model_version",
    "source",
]
KERAS_FILE = "model.keras"
PREPROCESSING_FILE = "preprocessing.json"


@dataclass
class PriceForecaster:
    kind: str
    window: int
    model: keras.Model
    x_scaler: Scaler
    y_scaler: Scaler
    # Per-target shrinkage toward the target's baseline (`anchors`) in log-ratio space, fitted on
    # the validation block (see ml.training.fit_skill_weights): 0 = the baseline, 1 = the network.
    skill_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    # The volatility-memory horizons of the inputs (ml.features); () = the notebook's 8 inputs.
    horizons: tuple[int, ...] = ()
    # Per target, the baseline a weight of 0 falls back to: "persistence" (log-ratio 0) or
    # "range_naive" (High/Low: last Close x the trailing mean High/Low-to-previous-Close ratio).
    anchors: tuple[str, ...] = ("persistence",) * len(TARGETS)
    naive_lookback: int = 20

    @property
    def context_bars(self) -> int:
        """Bars before a forecast that make its inputs exactly those of training: the window,
        the longest memory horizon or naive lookback before it, and one bar for the return."""
        return self.window + max((*self.horizons, self.naive_lookback)) + 1

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
        """The network's log-ratio predictions for relative windows `x`, before shrinkage.

        A direct (eager) call, not `model.predict`: the few thousand windows of one ticker fit in
        one batch, and `predict` would trace a graph function for every new model (about 0.3 s
        each, more than the prediction itself).
        """
        import numpy as np

        scaled = self.model(self.x_scaler.transform(x).astype("float32"), training=False)
        return self.y_scaler.inverse(np.asarray(scaled, dtype="float64"))

    def network_offsets(self, x: np.ndarray, base: np.ndarray) -> np.ndarray:
        """(n, 4) how far the network's log-ratio forecast lies from the anchors' `base`."""
        return self.raw_log_ratios(x) - base

    def predict_windows(
        self,
        x: np.ndarray,
        last_close: np.ndarray,
        last_adj_close: np.ndarray,
        high_ratio: np.ndarray | None = None,
        low_ratio: np.ndarray | None = None,
    ) -> np.ndarray:
        """Prices (n, 4) for relative windows `x` (n, window, n_features): per target, the
        baseline's log-ratio plus the skill weight times the network's difference from it."""
        import numpy as np

        if len(x) == 0:
            return np.empty((0, len(TARGETS)))
        base = self.anchor_log_ratios(high_ratio, low_ratio, len(x))
        log_ratio = base + self.network_offsets(x, base) * np.asarray(self.skill_weights)
        prices = np.stack([last_close, last_close, last_close, last_adj_close], axis=1)
        return prices * np.exp(log_ratio)

    def predict_frame(self, bars: pd.DataFrame) -> pd.DataFrame:
        """One forecast per window of `bars`: row i predicts the bar after `Date` (window's end)."""
        import pandas as pd

        from ml.features import build_features

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
        prices = self.predict_windows(
            x,
            ends["Close"].to_numpy(dtype="float64"),
            ends["Adj Close"].to_numpy(dtype="float64"),
            high_ratio[self.window - 1 :],
            low_ratio[self.window - 1 :],
        )
        out = pd.DataFrame(prices, columns=list(TARGETS))
        out.insert(0, "Date", ends["Date"].to_numpy())
        return out

    def save(self, directory: Path) -> dict[str, str]:
        """Write the network and scalers to `directory`; returns the artifact paths by name."""
        directory.mkdir(parents=True, exist_ok=True)
        keras_path = directory / KERAS_FILE
        self.model.save(keras_path)
        prep_path = directory / PREPROCESSING_FILE
        prep_path.write_text(
            json.dumps(
                {
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
        return {"keras_model": str(keras_path), "preprocessing": str(prep_path)}

    @classmethod
    def load(cls, keras_path: str | Path, preprocessing_path: str | Path) -> PriceForecaster:
        import keras

        prep = json.loads(Path(preprocessing_path).read_text())
        return cls(
            kind=prep["kind"],
            window=int(prep["window"]),
            model=keras.saving.load_model(keras_path, compile=False),
            x_scaler=Scaler.from_dict(prep["x_scaler"]),
            y_scaler=Scaler.from_dict(prep["y_scaler"]),
            skill_weights=tuple(prep.get("skill_weights", (1.0, 1.0, 1.0, 1.0))),
            # Models saved before these keys existed: 8 inputs, persistence anchors.
            horizons=tuple(int(k) for k in prep.get("horizons", ())),
            anchors=tuple(prep.get("anchors", ("persistence",) * len(TARGETS))),
            naive_lookback=int(prep.get("naive_lookback", 20)),
        )


# --- the forecasts table -------------------------------------------------------------------------


def forecasts_path(settings: Settings) -> Path:
    return settings.data_dir / "forecasts" / "forecasts.csv"


def read_forecasts(settings: Settings) -> pd.DataFrame:
    """The forecasts export (every column filled in: the ledger holds nothing less). A file that
    is not such a table (garbage, a cut-off row, a value that is not a number) raises
    CorruptForecastsFile naming it and the way out; it is left in place, never overwritten."""
    import pandas as pd

    path = forecasts_path(settings)
    if not path.exists():
        return pd.DataFrame(columns=FORECAST_COLUMNS)
    # Text columns stay text: a ticker such as "NA" or "NULL" is not a missing value.
    text = ["ticker", "logical_date", "last_bar_date", "model_name", "model_version", "source"]
    try:
        table = pd.read_csv(
            path, dtype=dict.fromkeys(text, str), keep_default_na=False, na_values=[""]
        )
    except ValueError as exc:  # not UTF-8, not CSV, empty (ParserError, EmptyDataError)
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        raise _corrupt_forecasts(settings, path, error) from exc
    missing = [c for c in FORECAST_COLUMNS if c not in table.columns]
    if missing:
        raise _corrupt_forecasts(settings, path, f"no column(s) {', '.join(missing)}")
    for column in FORECAST_COLUMNS:
        values = table[column]
        if column not in text:
            values = pd.to_numeric(values, errors="coerce")
        bad = values.isna().to_numpy().nonzero()[0]
        if len(bad):
            what = "empty" if column in text else "empty or not a number"
            more = f", {len(bad) - 1} more row(s) too" if len(bad) > 1 else ""
            where = f"line {int(bad[0]) + 2}: {column} is {what}{more}"
            raise _corrupt_forecasts(settings, path, where)
        if column not in text:
            table[column] = values
    return table


class CorruptForecastsFile(CorruptFile):
    """The forecasts export could not be read; it is left in place (see the message)."""


def _corrupt_forecasts(settings: Settings, path: Path, error: str) -> CorruptForecastsFile:
    from ml.ledger import ledger_location

    return CorruptForecastsFile(
        f"the forecasts export {path} is not a readable forecasts table ({error}). It is "
        "left as it is and nothing is written over it. It is an export: every forecast is in "
        f"the ledger ({ledger_location(settings)}), the store of record. Restore the file from a "
        "backup, or move it aside: the next forecast run then starts a new export with its "
        "own rows.",
        path,
    )


def upsert_forecasts(settings: Settings, rows: list[dict[str, Any]]) -> Path:
    """Insert or replace the (ticker, logical_date) rows of the forecasts table in one write."""
    import pandas as pd

    from ml.store import PriceStore, atomic_write

    store = PriceStore(settings.data_dir)
    path = forecasts_path(settings)
    new = pd.DataFrame(rows, columns=FORECAST_COLUMNS)
    with store.lock("forecasts"):
        table = read_forecasts(settings)
        replaced = table.set_index(["ticker", "logical_date"]).index.isin(
            new.set_index(["ticker", "logical_date"]).index
        )
        keep = table.loc[~replaced]
        table = pd.concat([keep, new], ignore_index=True) if len(keep) else new
        table = table.drop_duplicates(["ticker", "logical_date"], keep="last")
        table = table.sort_values(["logical_date", "ticker"], kind="stable").reset_index(drop=True)
        atomic_write(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6f"))
    return path


def upsert_forecast(settings: Settings, row: dict[str, Any]) -> Path:
    """Insert or replace one (ticker, logical_date) row of the forecasts table, atomically."""
    return upsert_forecasts(settings, [row])


def forecast_next_bar(
    forecaster: PriceForecaster, history: pd.DataFrame
) -> tuple[pd.Timestamp, dict[str, float]]:
    """The next bar after the last bar of `history`, in prices."""
    tail = history.iloc[-forecaster.context_bars :]
    predicted = forecaster.predict_frame(tail).iloc[-1]
    return predicted["Date"], {t: float(predicted[t]) for t in TARGETS}


def forecast_row(
    instrument: Instrument,
    as_of: date,
    history: pd.DataFrame,
    forecaster: PriceForecaster,
    version: str,
    settings: Settings,
) -> dict[str, Any]:
    """The forecasts-table row of `forecaster` (model `version`) for the bar after `history`."""
    last_date, prices = forecast_next_bar(forecaster, history)
    return {
        "ticker": instrument.ticker,
        "logical_date": as_of.isoformat(),
        "last_bar_date": last_date.date().isoformat(),
        "last_close": float(history["Close"].iloc[-1]),
        "pred_high": prices["High"],
        "pred_low": prices["Low"],
        "pred_close": prices["Close"],
        "pred_adj_close": prices["Adj Close"],
        "model_name": instrument.model_name,
        "model_version": str(version),
        "source": settings.price_source,
    }
