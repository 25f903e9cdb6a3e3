"""The networks: `network_layers` defines every kind once, `build_model` builds it in Keras.

The Keras model is what training fits and what is registered (`model.keras`). What runs faster
than a Keras call (the train step's TensorFlow operations, the forecaster's NumPy) is derived
from the built model in `ml.model.kernels`; docs/models.md says how to change a network.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ml.config import NETWORK_KINDS

UNROLL_MAX_WINDOW = 32
# (pid, threads) of the last BLAS limit `configure_tensorflow` set: once per process.
_BLAS_LIMIT: tuple[int, int] | None = None

if TYPE_CHECKING:
    import keras


def configure_tensorflow(threads: int | None = None) -> None:
    """Quiet TF logging and size its thread pools and NumPy's BLAS pool (call before building
    or running models).

    One thread per process by default (`TF_INTRA_OP_THREADS` overrides it): these networks are
    so small that TensorFlow's thread hand-offs cost more than they save. Measured on 2 cores,
    three tickers at the seed config: 17.0 s with one thread, 19.1 s with two, in one process;
    two processes side by side (the DAG's two training slots) finish 10 % sooner with one each.
    NumPy's BLAS (OpenBLAS, which runs the forecaster's `numpy_forward`) gets the same number:
    with its default of one spinning thread per core, the forecast step's two worker processes
    on 2 cores took 3.5-3.8 s for 31 champions against 2.2-2.5 s with one thread each (forked
    from a preloaded parent, alternating).
    """
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    from threadpoolctl import threadpool_limits

    global _BLAS_LIMIT
    n = max(1, threads or int(os.environ.get("TF_INTRA_OP_THREADS") or 1))
    if (os.getpid(), n) != _BLAS_LIMIT:  # a few ms each (it looks up the loaded libraries)
        threadpool_limits(limits=n, user_api="blas")
        _BLAS_LIMIT = (os.getpid(), n)
    try:
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
    if kind not in NETWORK_KINDS:
        raise ValueError(f"unknown network kind {kind!r}: choose from {', '.join(NETWORK_KINDS)}")


def network_layers(
    kind: str, window: int, n_targets: int, *, units: int, dense_units: int
) -> list[keras.layers.Layer]:
    """Every network kind's layers after its input, in order: the one definition of the
    networks (the notebook's `recurrent(units) -> Dense(dense_units, relu) -> Dense(n_targets)`).

    A layer added here is built, trained, saved and served with no other change: the train step
    and the forecaster compute each layer with a kernel of `ml.model.kernels` where one exists
    for its class and config, and through Keras otherwise (docs/models.md). The names are those
    of the registered `model.keras` files; renaming a layer makes new files, not a reason for
    old ones to stop loading (a saved model carries its own layers).

    The recurrent layer is unrolled over windows of up to `UNROLL_MAX_WINDOW` bars: for the
    6-bar default that replaces TensorFlow's while-loop with six fused steps in Keras' own
    calls, same results up to float rounding.
    """
    import keras

    _check_kind(kind)
    recurrent = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU}[kind]
    return [
        recurrent(units, name=kind, unroll=window <= UNROLL_MAX_WINDOW),
        keras.layers.Dense(dense_units, activation="relu", name="hidden"),
        keras.layers.Dense(n_targets, name="targets"),
    ]


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
    """The `network_layers(kind)` network on (window, n_features) inputs, Adam + MSE: the model
    that is trained (`ml.model.train_step`) and registered."""
    import keras

    layers = network_layers(kind, window, n_targets, units=units, dense_units=dense_units)
    model = keras.Sequential(
        [keras.Input(shape=(window, n_features)), *layers], name=f"{kind}_w{window}"
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="mse",
        steps_per_execution=max(1, int(steps_per_execution)),
    )
    return model
