"""The networks: `network_layers` defines every kind once, `build_model` builds it in Keras,
and what runs faster than a Keras call is derived from the built model (docs/models.md).

The Keras model is what training fits and what is registered (`model.keras`). Read off it,
layer by layer, from each layer's class, config and weights (no second description of the
network exists):

- `tf_forward(model)`: TensorFlow operations on the model's own variables, for the traced train
  step and its validation pass (`ml.model.train_step`). Tracing through Keras' layer calls (input
  checks, autocasting, name scopes, the RNN layer's step function) took about a third of
  building a fresh process's train step, and each Airflow train task is a fresh process.
- `numpy_forward(model)`: the same arithmetic in NumPy from the model's weights, for a
  forecaster's predictions (`ml.model.forecaster`): an eager Keras call dispatches the unrolled
  cell's operations one by one, 10-40 ms a call, where this takes a few ms.

A layer is computed here when `KERNELS` has its Keras class and the kernel computes its config
(`Kernel.declines`); any other layer still works: the train step calls the Keras layer itself,
and `numpy_forward` returns None so the forecaster calls Keras. A kernel only adds speed, and
tests/test_models.py checks every one against Keras for every network kind.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from ml.config import NETWORK_KINDS

UNROLL_MAX_WINDOW = 32
# (pid, threads) of the last BLAS limit `configure_tensorflow` set: once per process.
_BLAS_LIMIT: tuple[int, int] | None = None

if TYPE_CHECKING:
    import keras
    import numpy as np


def configure_tensorflow(threads: int | None = None) -> None:
    """Quiet TF logging and size its thread pools and NumPy's BLAS pool (call before building
    or running models).

    One thread per process by default (`TF_INTRA_OP_THREADS` overrides it): these networks are
    so small that TensorFlow's thread hand-offs cost more than they save, and the DAG runs two
    training processes side by side on two cores. NumPy's BLAS (OpenBLAS, which runs the
    forecaster's `numpy_forward`) gets the same number: its default of one spinning thread per
    core takes the other process's core (the measurements: BENCHMARKS.md, "History").
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
        # unrolled two-branch network that is a fixed cost of every fresh process (each Airflow
        # train task is one) and it bought no epoch speed (BENCHMARKS.md, "History").
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
    and the forecaster compute each layer with its class's kernel (`KERNELS`) where one computes
    its config, and through Keras otherwise (docs/models.md). The names are those
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


# --------------------------------------------------------------------------------------------------
# Derived from the built model: the train step's TensorFlow operations, the forecaster's NumPy
# --------------------------------------------------------------------------------------------------

_ACTIVATIONS = ("linear", "relu", "tanh", "sigmoid")
# What the recurrent kernels assume of an LSTM or GRU layer's config (Keras' defaults) and what
# they compute: the last output from zero states, no dropout, no masking.
_RECURRENT = {
    "activation": "tanh",
    "recurrent_activation": "sigmoid",
    "use_bias": True,
    "dropout": 0.0,
    "recurrent_dropout": 0.0,
    "return_sequences": False,
    "return_state": False,
    "go_backwards": False,
    "stateful": False,
}


@functools.cache
def _ops(backend: str) -> SimpleNamespace:
    """The few operations the kernels use, in NumPy or TensorFlow (float32, as Keras computes).
    `@`, `+`, `*` and `-` are the arrays' own."""
    import numpy as np

    if backend == "numpy":

        def steps(x: Any, kernel: Any, bias: Any) -> list[Any]:
            n, window, features = x.shape
            projected = (x.reshape(-1, features) @ kernel + bias).reshape(n, window, -1)
            return [projected[:, t] for t in range(window)]

        return SimpleNamespace(
            weights=lambda layer: [np.asarray(w, np.float32) for w in layer.get_weights()],
            steps=steps,
            zeros=lambda x, units: np.zeros((x.shape[0], units), np.float32),
            split=lambda a, n: np.split(a, n, axis=1),
            linear=lambda z: z,
            relu=lambda z: np.maximum(z, 0.0),
            tanh=np.tanh,
            sigmoid=lambda z: 0.5 + 0.5 * np.tanh(0.5 * z),  # 1 / (1 + exp(-z)) without overflow
            fused_lstm=None,
        )
    import tensorflow as tf

    def steps(x: Any, kernel: Any, bias: Any) -> list[Any]:
        batch, window = tf.shape(x)[0], x.shape[1]
        flat = tf.reshape(x, (-1, x.shape[2]))
        projected = tf.reshape(tf.matmul(flat, kernel) + bias, (batch, window, kernel.shape[1]))
        return tf.unstack(projected, num=window, axis=1)

    return SimpleNamespace(
        # Each variable read once per call, not once per step: fewer operations to trace and run.
        weights=lambda layer: [tf.convert_to_tensor(v) for v in layer.weights],
        steps=steps,
        zeros=lambda x, units: tf.zeros((tf.shape(x)[0], units), x.dtype),
        split=lambda a, n: tf.split(a, n, axis=1),
        linear=lambda z: z,
        relu=tf.nn.relu,
        tanh=tf.tanh,
        sigmoid=tf.sigmoid,
        fused_lstm=_block_lstm,
    )


def _dense(ops: SimpleNamespace, config: dict[str, Any], weights: list[Any], x: Any) -> Any:
    out = x @ weights[0]
    if config["use_bias"]:
        out = out + weights[1]
    return getattr(ops, config["activation"])(out)


def _lstm(ops: SimpleNamespace, config: dict[str, Any], weights: list[Any], x: Any) -> Any:
    """Keras' LSTMCell (gates i, f, c, o) over the steps of `x` from zero states: the last
    output. The input half of each step (x_t @ kernel + bias) does not depend on the state, so
    it is one product over all steps."""
    kernel, recurrent, bias = weights
    if ops.fused_lstm is not None:
        return ops.fused_lstm(x, kernel, recurrent, bias)
    h = c = ops.zeros(x, config["units"])
    for projected in ops.steps(x, kernel, bias):
        i, f, g, o = ops.split(projected + h @ recurrent, 4)
        c = ops.sigmoid(f) * c + ops.sigmoid(i) * ops.tanh(g)
        h = ops.sigmoid(o) * ops.tanh(c)
    return h


def _gru(ops: SimpleNamespace, config: dict[str, Any], weights: list[Any], x: Any) -> Any:
    """Keras' GRUCell (gates z, r, h; reset_after: the reset gate applies after the recurrent
    product) over the steps of `x` from a zero state: the last output."""
    kernel, recurrent, bias = weights
    h = ops.zeros(x, config["units"])
    for projected in ops.steps(x, kernel, bias[0]):
        x_z, x_r, x_h = ops.split(projected, 3)
        h_z, h_r, h_h = ops.split(h @ recurrent + bias[1], 3)
        z = ops.sigmoid(x_z + h_z)
        h = z * h + (1 - z) * ops.tanh(x_h + ops.sigmoid(x_r + h_r) * h_h)
    return h


def _block_lstm(x: Any, kernel: Any, recurrent: Any, bias: Any) -> Any:
    """`_lstm` in TensorFlow as one fused operation for all the steps (`BlockLSTM`, forward and
    gradient), not a graph of a dozen operations per step: a fresh process traces and
    instantiates the train step in less time. `BlockLSTM` orders the gates i, c, f, o (Keras:
    i, f, c, o), so the gate blocks are swapped to match; no forget bias, clipping or
    peepholes. Not `BlockLSTMV2`, whose gate order is Keras' own: TensorFlow registers the
    gradient of the first version for it, which assumes the other order."""
    import tensorflow as tf

    units = recurrent.shape[0]
    i, f, c, o = tf.split(tf.concat([kernel, recurrent], axis=0), 4, axis=1)
    b_i, b_f, b_c, b_o = tf.split(bias, 4)
    zeros = tf.zeros((tf.shape(x)[0], units), x.dtype)
    no_peephole = tf.zeros((units,), x.dtype)
    out = tf.raw_ops.BlockLSTM(
        seq_len_max=tf.constant(x.shape[1], tf.int64),
        x=tf.transpose(x, (1, 0, 2)),  # time major
        cs_prev=zeros,
        h_prev=zeros,
        w=tf.concat([i, c, f, o], axis=1),
        wci=no_peephole,
        wcf=no_peephole,
        wco=no_peephole,
        b=tf.concat([b_i, b_c, b_f, b_o], axis=0),
        forget_bias=0.0,
        cell_clip=-1.0,  # <= 0: no clipping
        use_peephole=False,
    )
    return out.h[-1]


def _dense_declines(config: dict[str, Any]) -> dict[str, Any]:
    wrong = {} if config["activation"] in _ACTIVATIONS else {"activation": config["activation"]}
    if config.get("lora_rank"):
        wrong["lora_rank"] = config["lora_rank"]
    return wrong


def _recurrent_declines(config: dict[str, Any]) -> dict[str, Any]:
    return {k: config.get(k) for k, v in _RECURRENT.items() if config.get(k) != v}


def _gru_declines(config: dict[str, Any]) -> dict[str, Any]:
    wrong = _recurrent_declines(config)
    if not config.get("reset_after"):
        wrong["reset_after"] = config.get("reset_after")
    return wrong


@dataclass(frozen=True)
class Kernel:
    """One Keras layer class computed outside Keras."""

    # (ops, the layer's config, its weights in `get_weights` order, input) -> output
    forward: Callable[[SimpleNamespace, dict[str, Any], list[Any], Any], Any]
    # config -> what in it the kernel does not compute ({} when it computes the layer)
    declines: Callable[[dict[str, Any]], dict[str, Any]]


# By the Keras layer's class name (exactly: a subclass may compute something else).
KERNELS: dict[str, Kernel] = {
    "Dense": Kernel(_dense, _dense_declines),
    "LSTM": Kernel(_lstm, _recurrent_declines),
    "GRU": Kernel(_gru, _gru_declines),
}


def layer_kernel(layer: keras.layers.Layer) -> tuple[Kernel, dict[str, Any]] | None:
    """`layer`'s kernel and config, or None when no kernel computes it."""
    kernel = KERNELS.get(type(layer).__name__)
    if kernel is None:
        return None
    config = layer.get_config()
    return None if kernel.declines(config) else (kernel, config)


def _chain(model: keras.Model) -> list[keras.layers.Layer] | None:
    """The layers of a model that applies them one after another (a `keras.Sequential`)."""
    import keras

    return list(model.layers) if isinstance(model, keras.Sequential) else None


def tf_forward(model: keras.Model, training: bool = False) -> Callable[[Any], Any]:
    """`model(x, training=training)` as TensorFlow operations on the model's own variables (read
    at each call): a kernel per layer where `KERNELS` has one, the Keras layer's own call
    otherwise."""
    layers = _chain(model)
    if layers is None:
        return lambda x: model(x, training=training)
    ops = _ops("tensorflow")
    steps: list[Callable[[Any], Any]] = []
    for layer in layers:
        found = layer_kernel(layer)
        if found is None:
            steps.append(functools.partial(layer, training=training))
        else:
            kernel, config = found
            steps.append(functools.partial(_run, kernel, ops, config, layer))

    def forward(x: Any) -> Any:
        for step in steps:
            x = step(x)
        return x

    return forward


def _run(kernel: Kernel, ops: SimpleNamespace, config: dict[str, Any], layer: Any, x: Any) -> Any:
    return kernel.forward(ops, config, ops.weights(layer), x)


def numpy_forward(model: keras.Model) -> Callable[[np.ndarray], np.ndarray] | None:
    """`model(x)` computed with NumPy from the model's weights (read at each call), or None when a
    layer has no kernel (its caller calls Keras instead)."""
    import numpy as np

    layers = _chain(model)
    found = [layer_kernel(layer) for layer in layers or ()]
    if layers is None or any(f is None for f in found):
        return None
    ops = _ops("numpy")
    steps = [(*f, layer) for layer, f in zip(layers, found, strict=True) if f is not None]

    def forward(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        for kernel, config, layer in steps:
            x = kernel.forward(ops, config, ops.weights(layer), x)
        return x

    return forward
