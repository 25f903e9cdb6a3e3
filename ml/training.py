"""Train one ticker: both candidates with early stopping, keep the best checkpoint by validation loss.

The test block is never seen by fitting or early stopping; it is only scored afterwards, against
the persistence and range-aware baselines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Any

from ml.config import ModelConfig, Settings
from ml.store import PriceStore, data_fingerprint
from ml.universe import Instrument
from ml.windows import SplitData, prepare

if TYPE_CHECKING:
    import keras
    import numpy as np
    import pandas as pd

    from ml.evaluation import EvaluationReport
    from ml.forecasting import PriceForecaster


@dataclass(frozen=True)
class CandidateResult:
    kind: str
    best_val_loss: float
    best_epoch: int
    epochs_run: int
    seconds: float
    loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)


@dataclass
class TrainResult:
    ticker: str
    as_of: date
    forecaster: PriceForecaster
    candidates: list[CandidateResult]
    split: SplitData
    history: pd.DataFrame
    data_fingerprint: str
    config_fingerprint: str
    test_predictions: np.ndarray
    evaluation: EvaluationReport

    @property
    def chosen(self) -> CandidateResult:
        return next(c for c in self.candidates if c.kind == self.forecaster.kind)


def configure_tensorflow(threads: int | None = None) -> None:
    """Quiet TF logging and size its thread pools (call before building models).

    One thread per process by default (`TF_INTRA_OP_THREADS` overrides it): these networks are
    so small that TensorFlow's thread hand-offs cost more than they save. Measured on 2 cores,
    three tickers at the seed config: 17.0 s with one thread, 19.1 s with two, in one process;
    two processes side by side (the DAG's two training slots) finish 10 % sooner with one each.
    """
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        n = max(1, threads or int(os.environ.get("TF_INTRA_OP_THREADS") or 1))
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(min(n, 2))
    except RuntimeError:
        pass  # already initialized in this process


# Compiled networks kept for the life of the process, by kind, shapes and config. Fitting many
# tickers in one process (`python -m ml train`, the benchmark) then traces TensorFlow's train and
# test functions once per kind instead of once per ticker: about 1.3 s per model on 2 cores, more
# than three epochs of fitting. Every fit starts from the seed's initial weights and a fresh
# optimizer state, exactly as a new model would, and hands back a copy of the fitted network.
_COMPILED: dict[tuple[Any, ...], tuple[keras.Model, list[Any], list[Any]]] = {}
# Batches per call into the compiled train function: one call runs a whole epoch of up to
# 128 * batch_size windows (the Python round trip per batch dominates a model this small).
STEPS_PER_EXECUTION = 128
# Validation windows scored per call: the whole block at once.
VALIDATION_BATCH = 8192


def seeded_model(kind: str, config: ModelConfig, n_features: int, n_targets: int) -> keras.Model:
    """A compiled `kind` network with the seed's initial weights and an untouched optimizer.

    The first call for a (kind, shapes, config) builds it; later calls in the same process reset
    the same compiled model (weights and optimizer variables back to their initial values), so
    its traced functions are reused. The seed is set again before returning: whatever ran before,
    the fit that follows sees the same random stream (shuffling) as in a fresh process.
    """
    import keras

    from ml.models import build_model

    key = (
        kind,
        config.window,
        n_features,
        n_targets,
        config.units,
        config.dense_units,
        config.learning_rate,
        config.seed,
    )
    if key not in _COMPILED:
        keras.utils.set_random_seed(config.seed)
        model = build_model(
            kind,
            config.window,
            n_features,
            n_targets,
            units=config.units,
            dense_units=config.dense_units,
            learning_rate=config.learning_rate,
            steps_per_execution=STEPS_PER_EXECUTION,
        )
        model.optimizer.build(model.trainable_variables)
        optimizer_state = [v.numpy() for v in model.optimizer.variables]
        _COMPILED[key] = (model, model.get_weights(), optimizer_state)
    else:
        model, weights, optimizer_state = _COMPILED[key]
        model.set_weights(weights)
        for variable, value in zip(model.optimizer.variables, optimizer_state, strict=True):
            variable.assign(value)
    keras.utils.set_random_seed(config.seed)
    return model


def fit_candidate(
    kind: str, split: SplitData, config: ModelConfig
) -> tuple[keras.Model, CandidateResult]:
    """Fit one model kind; early stopping restores the weights of the best validation epoch.

    Returns a network of its own (a copy of the best weights), not the process's compiled one.
    """
    import keras

    x_train, y_train = split.scaled(split.train)
    x_val, y_val = split.scaled(split.val)
    model = seeded_model(kind, config, x_train.shape[-1], y_train.shape[-1])
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=config.patience, restore_best_weights=True
    )
    started = time.perf_counter()
    history = model.fit(
        x_train,
        y_train,
        validation_data=(x_val, y_val),
        epochs=config.max_epochs,
        batch_size=config.batch_size,
        validation_batch_size=VALIDATION_BATCH,
        shuffle=True,
        callbacks=[stop],
        verbose=0,
    )
    seconds = time.perf_counter() - started
    fitted = keras.models.clone_model(model)
    fitted.set_weights(model.get_weights())
    val_loss = [float(v) for v in history.history["val_loss"]]
    best_epoch = int(min(range(len(val_loss)), key=val_loss.__getitem__))
    return fitted, CandidateResult(
        kind=kind,
        best_val_loss=val_loss[best_epoch],
        best_epoch=best_epoch + 1,
        epochs_run=len(val_loss),
        seconds=round(seconds, 3),
        loss=[float(v) for v in history.history["loss"]],
        val_loss=val_loss,
    )


def fit_skill_weights(
    predicted: np.ndarray, actual: np.ndarray, z: float = 1.645
) -> tuple[float, ...]:
    """Per-target shrinkage of log-ratio predictions toward persistence (log-ratio 0).

    On the validation block, regress the actual log-ratios on the predicted ones through the
    origin. Where the slope is not significantly positive (one-sided t < z), the network shows no
    skill over persistence for that target and its weight is 0, so it forecasts persistence; else
    the weight is the slope clipped to [0, 1]. On a near-random-walk Close this usually gives 0:
    the model then claims no skill it does not have. Fitted on validation only, never on test.
    """
    import numpy as np

    weights = []
    for j in range(actual.shape[1]):
        p, y = predicted[:, j], actual[:, j]
        denom = float(p @ p)
        if denom <= 0 or len(p) < 3:
            weights.append(0.0)
            continue
        slope = float(p @ y) / denom
        resid = y - slope * p
        se = float(np.sqrt((resid @ resid) / (len(p) - 1) / denom))
        significant = slope > 0 and (se == 0 or slope / se >= z)
        weights.append(float(np.clip(slope, 0.0, 1.0)) if significant else 0.0)
    return tuple(round(w, 6) for w in weights)


def train_on_history(
    ticker: str, as_of: date, history: pd.DataFrame, config: ModelConfig
) -> TrainResult:
    """Train every configured kind on `history` (bars <= as_of) and score the best on test."""

    from ml.evaluation import evaluate, mase_scale
    from ml.forecasting import PriceForecaster

    configure_tensorflow()
    split = prepare(history, config.window, config.split, config.naive_lookback)
    best: tuple[keras.Model, CandidateResult] | None = None
    candidates: list[CandidateResult] = []
    for kind in config.kinds:
        model, result = fit_candidate(kind, split, config)
        candidates.append(result)
        if best is None or result.best_val_loss < best[1].best_val_loss:
            best = (model, result)
    assert best is not None
    forecaster = PriceForecaster(
        kind=best[1].kind,
        window=config.window,
        model=best[0],
        x_scaler=split.x_scaler,
        y_scaler=split.y_scaler,
    )
    forecaster.skill_weights = fit_skill_weights(
        forecaster.raw_log_ratios(split.val.x), split.val.y
    )
    test = split.test
    predicted = forecaster.predict_windows(test.x, test.last_close, test.last_adj_close)
    scale = mase_scale(split.train.actual, split.train.last_close, split.train.last_adj_close)
    report = evaluate(
        test.actual,
        predicted,
        test.last_close,
        test.last_adj_close,
        test.high_ratio,
        test.low_ratio,
        scale,
    )
    return TrainResult(
        ticker=ticker,
        as_of=as_of,
        forecaster=forecaster,
        candidates=candidates,
        split=split,
        history=history,
        data_fingerprint=data_fingerprint(history),
        config_fingerprint=config.fingerprint(),
        test_predictions=predicted,
        evaluation=report,
    )


def load_training_history(instrument: Instrument, as_of: date, settings: Settings) -> pd.DataFrame:
    """Published bars up to and including the logical date: a run never sees later bars."""
    return PriceStore(settings.data_dir).load(instrument, until=as_of)


def train_ticker(instrument: Instrument, as_of: date, settings: Settings) -> TrainResult:
    history = load_training_history(instrument, as_of, settings)
    return train_on_history(instrument.ticker, as_of, history, settings.model)


def candidate_summary(result: TrainResult) -> dict[str, Any]:
    return {
        c.kind: {
            "best_val_loss": c.best_val_loss,
            "best_epoch": c.best_epoch,
            "epochs": c.epochs_run,
        }
        for c in result.candidates
    }
