"""Model factory: the notebook's recurrent network, its GRU twin, and both trained side by side."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


# What `branch_forward` assumes of the recurrent layers `_recurrent` builds (Keras' defaults).
_CELL_DEFAULTS = {
    "activation": "tanh",
    "recurrent_activation": "sigmoid",
    "use_bias": True,
    "dropout": 0.0,
    "recurrent_dropout": 0.0,
}


def branch_forward(model: keras.Model, kinds: Sequence[str]) -> Callable[[Any], list[Any]]:
    """The forward pass of a `build_branches` model as plain TensorFlow operations on the model's
    own variables: x (batch, window, features) -> one forecast tensor per kind, what
    `model(x)` computes (tests/test_models.py compares them), for the traced train step and
    validation pass.

    Tracing through Keras' layer calls (input checks, autocasting, name scopes, the RNN
    layer's step function) was about a third of building a fresh process's train step; these
    operations trace in a fraction of it. The input half of each cell (x_t @ kernel + bias)
    does not depend on the state, so it is one product over all steps, and each variable is
    read once, not once per step: fewer operations to trace (and to run). The layers are
    Keras' LSTM (gates i, f, c, o) and GRU (gates z, r, h; reset after the recurrent product)
    cells with their default activations; any other configuration raises here instead of
    computing something else.
    """
    import tensorflow as tf

    branches = []
    for kind in kinds:
        recurrent, hidden, targets = (model.get_layer(n) for n in branch_layer_names(kind))
        wrong = _unlike_build_model(kind, recurrent, hidden, targets)
        if wrong:
            raise ValueError(f"branch_forward: {kind} layers are not the ones it computes: {wrong}")
        branches.append(
            (_gru_last if kind == "gru" else _lstm_last, recurrent.cell, hidden, targets)
        )

    def forward(x: Any) -> list[Any]:
        outputs = []
        for last_state, cell, hidden, targets in branches:
            h = last_state(x, cell)
            h = tf.nn.relu(tf.matmul(h, hidden.kernel) + hidden.bias)
            outputs.append(tf.matmul(h, targets.kernel) + targets.bias)
        return outputs

    return forward


def _unlike_build_model(kind: str, recurrent: Any, hidden: Any, targets: Any) -> dict[str, Any]:
    """What in these layers differs from a `build_model(kind)` branch ({} when nothing): the
    cell's activations, bias and dropout, the GRU's `reset_after`, the last output only, the
    Dense activations."""
    config = recurrent.cell.get_config()
    wrong = {k: config.get(k) for k, v in _CELL_DEFAULTS.items() if config.get(k) != v}
    if kind == "gru" and not config.get("reset_after"):
        wrong["reset_after"] = config.get("reset_after")
    layer = recurrent.get_config()
    for key in ("return_sequences", "go_backwards", "stateful"):
        if layer.get(key):
            wrong[key] = layer[key]
    for dense, activation in ((hidden, "relu"), (targets, "linear")):
        dense_config = dense.get_config()
        if dense_config["activation"] != activation or not dense_config["use_bias"]:
            wrong[dense.name] = dense_config["activation"]
    return wrong


def numpy_forward(model: keras.Model) -> Callable[[np.ndarray], np.ndarray] | None:
    """`model(x)` for a `build_model` network, computed with NumPy from the model's current
    weights (read at each call); None when `model` is not such a network (other layers or cell
    settings), and its caller calls Keras instead.

    A forecaster predicts a few hundred windows at a time (the validation and test blocks of a
    train task, one ticker's recent bars in the forecast step); a direct Keras call spends most
    of its time dispatching the unrolled cell's operations one by one, 10-40 ms a call in a
    fresh process, where this arithmetic takes a few ms. The same gates, order and activations
    as Keras' cells (see `_lstm_last` and `_gru_last`), in float32 as Keras computes:
    tests/test_models.py compares the outputs.
    """
    import numpy as np

    layers = list(model.layers)
    kinds = {"LSTM": "lstm", "GRU": "gru"}
    if len(layers) != 3 or type(layers[0]).__name__ not in kinds:
        return None
    recurrent, hidden, targets = layers
    kind = kinds[type(recurrent).__name__]
    if _unlike_build_model(kind, recurrent, hidden, targets):
        return None
    units = recurrent.cell.units

    def sigmoid(z: np.ndarray) -> np.ndarray:
        return 0.5 + 0.5 * np.tanh(0.5 * z)  # = 1 / (1 + exp(-z)), without overflowing exp

    def forward(x: np.ndarray) -> np.ndarray:
        kernel, recurrent_kernel, bias, w_hidden, b_hidden, w_out, b_out = (
            np.asarray(w, dtype=np.float32) for w in model.get_weights()
        )
        x = np.asarray(x, dtype=np.float32)
        n, window, n_features = x.shape
        input_bias = bias if kind == "lstm" else bias[0]
        # The input half of every step in one product (it does not depend on the state).
        projected = (x.reshape(-1, n_features) @ kernel + input_bias).reshape(n, window, -1)
        h = np.zeros((n, units), np.float32)
        c = np.zeros((n, units), np.float32)
        for t in range(window):
            if kind == "lstm":  # gates i, f, c, o
                i, f, g, o = np.split(projected[:, t] + h @ recurrent_kernel, 4, axis=1)
                c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
                h = sigmoid(o) * np.tanh(c)
            else:  # gates z, r, h; the reset gate applies after the recurrent product
                x_z, x_r, x_h = np.split(projected[:, t], 3, axis=1)
                h_z, h_r, h_h = np.split(h @ recurrent_kernel + bias[1], 3, axis=1)
                update = sigmoid(x_z + h_z)
                candidate = np.tanh(x_h + sigmoid(x_r + h_r) * h_h)
                h = update * h + (1.0 - update) * candidate
        hidden_out = np.maximum(h @ w_hidden + b_hidden, 0.0)
        return hidden_out @ w_out + b_out

    return forward


def _input_projections(x: Any, kernel: Any, bias: Any) -> list[Any]:
    """x (batch, window, features) @ kernel + bias for every step in one product: the input
    half of a recurrent cell, which does not depend on the state; one tensor per step."""
    import tensorflow as tf

    batch, window = tf.shape(x)[0], x.shape[1]
    flat = tf.reshape(x, (-1, x.shape[2]))
    projected = tf.reshape(tf.matmul(flat, kernel) + bias, (batch, window, kernel.shape[1]))
    return tf.unstack(projected, num=window, axis=1)


def _lstm_last(x: Any, cell: Any) -> Any:
    """Keras' LSTMCell over the steps of `x`, from zero states: the last output.

    One fused operation for all the steps (TensorFlow's `BlockLSTM`, forward and gradient), not
    a graph of a dozen operations per step: a fresh process traces and instantiates the train
    step in less time. `BlockLSTM` orders the gates i, c, f, o (Keras: i, f, c, o), so the
    kernel's and bias's gate blocks are swapped to match; no forget bias is added, no clipping,
    no peepholes: the same computation as the Keras cell (tests/test_models.py compares the
    outputs and the gradients). Not `BlockLSTMV2`, whose gate order is Keras' own: TensorFlow
    registers the gradient of the first version for it, which assumes the other order.
    """
    import tensorflow as tf

    kernel = tf.concat([cell.kernel, cell.recurrent_kernel], axis=0)
    i, f, c, o = tf.split(kernel, 4, axis=1)
    b_i, b_f, b_c, b_o = tf.split(cell.bias, 4)
    zeros = tf.zeros((tf.shape(x)[0], cell.units), x.dtype)
    no_peephole = tf.zeros((cell.units,), x.dtype)
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


def _gru_last(x: Any, cell: Any) -> Any:
    """Keras' GRUCell (reset_after=True) over the steps of `x`, from a zero state: the last
    output."""
    import tensorflow as tf

    bias = tf.convert_to_tensor(cell.bias)
    recurrent = tf.convert_to_tensor(cell.recurrent_kernel)
    h = tf.zeros((tf.shape(x)[0], cell.units), x.dtype)
    for projected in _input_projections(x, cell.kernel, bias[0]):
        x_z, x_r, x_h = tf.split(projected, 3, axis=1)
        h_z, h_r, h_h = tf.split(tf.matmul(h, recurrent) + bias[1], 3, axis=1)
        z = tf.sigmoid(x_z + h_z)
        r = tf.sigmoid(x_r + h_r)
        h = z * h + (1 - z) * tf.tanh(x_h + r * h_h)
    return h


class PlainAdam:
    """The update of the model's own `keras.optimizers.Adam` (as `build_model` and
    `build_branches` compile it: no weight decay, clipping, AMSGrad or EMA) as plain TensorFlow
    operations: the same formula in the same order (tests/test_models.py compares them), with
    its own moments and step counter. Keras' `apply` traced about 1.3 times as long; a fresh
    process traces the train step once. The moments of all variables are two flat vectors
    (`apply`), which traces about 300 operations fewer than a set per variable.
    """

    def __init__(self, optimizer: Any, variables: Sequence[Any]) -> None:
        import numpy as np
        import tensorflow as tf

        config = optimizer.get_config()
        extras = {
            k: config.get(k)
            for k in (
                "weight_decay",
                "clipnorm",
                "clipvalue",
                "global_clipnorm",
                "amsgrad",
                "use_ema",
                "loss_scale_factor",
                "gradient_accumulation_steps",
            )
            if config.get(k)
        }
        if extras:
            raise ValueError(f"PlainAdam: the optimizer uses what it does not compute: {extras}")
        self.learning_rate = float(optimizer.learning_rate)
        self.beta_1, self.beta_2 = float(config["beta_1"]), float(config["beta_2"])
        self.epsilon = float(config["epsilon"])
        self.variables = list(variables)
        self.sizes = [int(np.prod(v.shape)) for v in self.variables]
        self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="adam_iterations")
        # Both moments of every variable in one flat vector each (in the variables' order): the
        # update is element-wise, so one set of operations over all of them computes what one
        # set per variable would, and traces in a fraction of the time.
        self.moments = tuple(
            tf.Variable(tf.zeros(sum(self.sizes)), trainable=False) for _ in range(2)
        )

    def apply(self, gradients: Sequence[Any]) -> None:
        """One step (inside the traced train step), as `keras.optimizers.Adam.update_step`."""
        import tensorflow as tf

        step = tf.cast(self.iterations + 1, tf.float32)
        beta_1_power = tf.pow(tf.constant(self.beta_1, tf.float32), step)
        beta_2_power = tf.pow(tf.constant(self.beta_2, tf.float32), step)
        alpha = self.learning_rate * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
        gradient = tf.concat([tf.reshape(g, (-1,)) for g in gradients], axis=0)
        m, v = self.moments
        m.assign_add((gradient - m) * (1 - self.beta_1))
        v.assign_add((tf.square(gradient) - v) * (1 - self.beta_2))
        update = (m * alpha) / (tf.sqrt(v) + self.epsilon)
        for variable, part in zip(self.variables, tf.split(update, self.sizes), strict=True):
            variable.assign_sub(tf.reshape(part, variable.shape))
        self.iterations.assign_add(1)

    def reset(self) -> None:
        """Back to a fresh optimizer: no step taken, zero moments."""
        import tensorflow as tf

        self.iterations.assign(0)
        for moment in self.moments:
            moment.assign(tf.zeros_like(moment))


def branch_weights(model: keras.Model, kind: str) -> list[np.ndarray]:
    """Copies of `kind`'s branch weights, in the order `build_model(kind, ...).set_weights` takes."""
    return [
        w.copy() for name in branch_layer_names(kind) for w in model.get_layer(name).get_weights()
    ]
