"""Model factory: the notebook's recurrent network, its GRU twin, and both trained side by side."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ml.config import MODEL_KINDS

UNROLL_MAX_WINDOW = 32

if TYPE_CHECKING:
    import keras
    import numpy as np


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
    if os.environ.get("TF_GRAPPLER", "off").lower() == "off":
        # Grappler rewrites every traced graph before its first run. For the train step of the
        # unrolled two-branch network that took 0.2-0.9 s of each fresh process (measured
        # several times; each Airflow train task is one) and bought no speed: an epoch ran
        # 0.113 s with it off against 0.116 s on (2,048 windows, both kinds, 2 cores).
        # TF_GRAPPLER=on keeps it.
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})


def _check_kind(kind: str) -> None:
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}: choose from {', '.join(MODEL_KINDS)}")


def _recurrent(kind: str, units: int, window: int, name: str) -> keras.layers.Layer:
    import keras

    layer = keras.layers.LSTM if kind == "lstm" else keras.layers.GRU
    return layer(units, name=name, unroll=window <= UNROLL_MAX_WINDOW)


def build_model(
    kind: str,
    window: int,
    n_features: int,
    n_targets: int,
    *,
    units: int = 64,
    dense_units: int = 8,
    learning_rate: float = 1e-3,
    steps_per_execution: int = 1,
) -> keras.Model:
    """`LSTM(units) -> Dense(dense_units, relu) -> Dense(n_targets)` (or GRU), Adam + MSE.

    The recurrent layer is unrolled over windows of up to `UNROLL_MAX_WINDOW` bars: for the
    6-bar default that replaces TensorFlow's while-loop with six fused steps, about 15 % faster on
    CPU, same results up to float rounding. This is the network that is registered; training fits
    it as one branch of `build_branches` and copies the fitted weights in (`branch_weights`).
    """
    import keras

    _check_kind(kind)
    model = keras.Sequential(
        [
            keras.Input(shape=(window, n_features)),
            _recurrent(kind, units, window, kind),
            keras.layers.Dense(dense_units, activation="relu", name="hidden"),
            keras.layers.Dense(n_targets, name="targets"),
        ],
        name=f"{kind}_w{window}",
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="mse",
        steps_per_execution=max(1, int(steps_per_execution)),
    )
    return model


def branch_layer_names(kind: str) -> tuple[str, str, str]:
    """The layers of `kind`'s branch in a `build_branches` model, in `build_model`'s order."""
    return kind, f"{kind}_hidden", f"{kind}_targets"


def build_branches(
    kinds: Sequence[str],
    window: int,
    n_features: int,
    n_targets: int,
    *,
    units: int = 64,
    dense_units: int = 8,
    learning_rate: float = 1e-3,
) -> keras.Model:
    """One `build_model` network per kind, side by side on the same input, in one Keras graph.

    Output i is kind i's forecast; the loss is the sum of the per-output MSEs. The branches share
    no weights, so the gradient of the sum with respect to a branch's weights is the gradient of
    that branch's own MSE, and Adam's update of each weight depends only on that weight's
    gradients: each branch trains as it would alone on the same batches, while one call into the
    compiled train function advances them all.
    """
    import keras

    if not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds must be distinct and non-empty, got {kinds!r}")
    for kind in kinds:
        _check_kind(kind)
    inputs = keras.Input(shape=(window, n_features), name="bars")
    outputs = []
    for kind in kinds:
        recurrent_name, hidden_name, targets_name = branch_layer_names(kind)
        h = _recurrent(kind, units, window, recurrent_name)(inputs)
        h = keras.layers.Dense(dense_units, activation="relu", name=hidden_name)(h)
        outputs.append(keras.layers.Dense(n_targets, name=targets_name)(h))
    model = keras.Model(inputs, outputs, name="_".join(kinds) + f"_w{window}")
    # Training runs its own step (`ml.model.training`); the compiled loss (the sum of the
    # per-output MSEs) serves `evaluate`.
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=["mse"] * len(kinds))
    return model


def branch_weights(model: keras.Model, kind: str) -> list[np.ndarray]:
    """Copies of `kind`'s branch weights, in the order `build_model(kind, ...).set_weights` takes."""
    return [
        w.copy() for name in branch_layer_names(kind) for w in model.get_layer(name).get_weights()
    ]
