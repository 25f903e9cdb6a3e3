"""Model factory: the notebook's recurrent network and its GRU twin."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ml.config import MODEL_KINDS

UNROLL_MAX_WINDOW = 32

if TYPE_CHECKING:
    import keras


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
    CPU, same results up to float rounding. `steps_per_execution` runs that many batches per call
    into the compiled train function (`ml.training` passes enough for a whole epoch), which saves
    the Python round trip per batch that dominates a model this small.
    """
    import keras

    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}: choose from {', '.join(MODEL_KINDS)}")
    recurrent = keras.layers.LSTM if kind == "lstm" else keras.layers.GRU
    model = keras.Sequential(
        [
            keras.Input(shape=(window, n_features)),
            recurrent(units, name=kind, unroll=window <= UNROLL_MAX_WINDOW),
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
