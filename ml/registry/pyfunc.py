"""The MLflow pyfunc face of a `PriceForecaster` (imported only when logging or loading models)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

# Offline by design: no usage telemetry from MLflow (it would write under ~/.config and call out).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow.pyfunc
import pandas as pd

from ml.data.schema import PRICE_COLUMNS
from ml.model.forecaster import PriceForecaster


class PriceForecastModel(mlflow.pyfunc.PythonModel):
    """Input: consecutive daily bars (Date, Open, High, Low, Close, Adj Close, Volume), oldest first.

    Output: for each window end `Date`, the next bar's High, Low, Close and Adj Close in prices; the
    last row is the forecast for the bar after the input. Send at least the model's
    `context_bars` bars (73 with the default config: a window of 6, 66 bars of volatility memory
    and one for the return); with fewer, the memory inputs and the range-aware baseline are
    averaged over the bars there are, and the forecast differs from the pipeline's.
    """

    def load_context(self, context: Any) -> None:
        # A network has `keras_model` beside `preprocessing`; a statistical model (`har`, `gbm`,
        # `naive`) is all in `preprocessing` and needs no TensorFlow.
        keras_path = context.artifacts.get("keras_model")
        if keras_path is not None:
            from ml.model.networks import configure_tensorflow

            configure_tensorflow()
        self.forecaster = PriceForecaster.load(keras_path, context.artifacts["preprocessing"])

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        missing = [c for c in PRICE_COLUMNS if c not in model_input.columns]
        if missing:
            raise ValueError(f"input is missing column(s) {missing}")
        return self.forecaster.predict_frame(model_input[PRICE_COLUMNS].copy())


# The model logged as code: MLflow runs this file at load time (it calls `set_model`).
MODEL_CODE = Path(__file__).with_name("model_code.py")


class _PyfuncFlavor:
    """`mlflow.pyfunc` as the flavor of `mlflow.models.Model.log` (which only calls its
    `save_model`), taking the `validate_serving_input` switch that `Model.log` reads but
    `mlflow.pyfunc.save_model` refuses."""

    @staticmethod
    def save_model(*, validate_serving_input: bool = True, **kwargs: Any) -> Any:
        return mlflow.pyfunc.save_model(**kwargs)


def log_model(*, validate_serving_input: bool = True, **kwargs: Any) -> Any:
    """`mlflow.pyfunc.log_model(**kwargs)` of a `PythonModel` (or of a models-from-code file,
    `python_model=str(MODEL_CODE)`), optionally without the serving check.

    With `validate_serving_input=False`, MLflow still saves the input example (and its serving
    form) but does not load the saved model back and predict on it (about 0.3 s per model).
    """
    from mlflow.models import Model

    return Model.log(
        artifact_path=None,
        flavor=_PyfuncFlavor,
        flavor_name="pyfunc.CustomPythonModel",  # what mlflow.pyfunc.log_model records for it
        validate_serving_input=validate_serving_input,
        **kwargs,
    )


def serving_code(destination: Path) -> Path:
    """Copy the code the registered model needs into `destination`/ml and return that folder
    (for `code_paths`): this module and every `ml` module it imports at any depth, with their
    packages' `__init__.py` (`ml.codebase.closure`), about a third of the package.

    The model then loads where the project is not installed (`mlflow models serve`), and each
    model's upload is 12 files instead of the whole package's 43; every artifact file is one
    request to the tracking server, when logging and again when a champion is downloaded.
    """
    from ml.codebase import ROOT, closure

    for source in closure(__name__):
        target = destination / source.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return destination / "ml"
