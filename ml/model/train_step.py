"""The networks' own training step: every network kind of a fit in one traced function.

`seeded_branches` builds (once per process and shape) one `build_model` network per kind (the
branches), its traced train step (forward, summed MSE, gradients, the model's Adam in plain
operations) and its validation pass; `score_epoch` keeps each branch's best validation epoch
and stops it after `patience` epochs without improvement. `ml.model.training.fit_candidates`
runs the epochs.

The branches share no weights, so the gradient of the summed loss with respect to a branch's
weights is the gradient of that branch's own MSE, and Adam's update of each weight depends only
on that weight's gradients: each branch trains as it would alone on the same batches, while
one call of the traced step advances them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ml.config import ModelConfig

if TYPE_CHECKING:
    import keras
    import numpy as np


# XLA for the train step: off. It makes an epoch faster, but its compile costs more than plain
# tracing in every fresh process, and each Airflow train task is one: a default fit runs too few
# epochs to win that back (the measurements: BENCHMARKS.md, "History").
JIT_COMPILE = False


@dataclass
class _Compiled:
    networks: tuple[keras.Model, ...]  # one `build_model` network per kind, in the kinds' order
    weights: list[list[Any]]  # each network's initial weights
    optimizer: PlainAdam  # the networks' Adam in plain TF operations (its own state)
    train_step: Any  # tf.function: one batch -> one MSE per branch (and one Adam update)
    val_outputs: Any  # tf.function: windows -> one forecast array per branch


# Compiled networks kept for the life of the process, by kinds, shapes and config. Fitting many
# tickers in one process (`python -m ml train`, the benchmark) then traces the train step once
# instead of once per ticker. Every fit starts from the seed's initial weights and a fresh
# optimizer state, exactly as a new model would, and hands back networks of its own.
_COMPILED: dict[tuple[Any, ...], _Compiled] = {}


def _model_key(kinds: tuple[str, ...], config: ModelConfig, n_features: int, n_targets: int):
    return (
        kinds,
        config.window,
        n_features,
        n_targets,
        config.units,
        config.dense_units,
        config.learning_rate,
        config.seed,
    )


def layer_sizes(config: ModelConfig) -> dict[str, Any]:
    """The config's network sizes and learning rate, as `build_model` takes them."""
    return {
        "units": config.units,
        "dense_units": config.dense_units,
        "learning_rate": config.learning_rate,
    }


def _compile(kinds: tuple[str, ...], config: ModelConfig, n_features: int, n_targets: int):
    """Build one `build_model` network per kind and the two graph functions over all of them,
    the train step and the validation forward pass.

    The train step is our own (a `tf.function` around one batch: forward, the sum of the
    branches' MSEs, gradients, the model's Adam), not `Model.fit`: Keras' fit machinery traces
    its train function twice (inside a loop and a condition) before the first epoch runs, a
    cost every fresh process pays; this step traces once (Grappler off,
    `ml.model.networks.configure_tensorflow`), and runs an epoch as fast. The forward pass is
    `ml.model.networks.tf_forward` of each network and the optimizer `PlainAdam`, both derived
    from the Keras model and computing what its own calls compute, which trace faster than
    Keras' layer calls and optimizer. The loss is what `compile(loss="mse")` would compute per
    branch: the mean squared error over the batch and the targets.
    """
    import keras
    import tensorflow as tf

    from ml.model.networks import build_model, tf_forward

    if not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds must be distinct and non-empty, got {kinds!r}")
    keras.utils.set_random_seed(config.seed)
    networks = tuple(
        build_model(kind, config.window, n_features, n_targets, **layer_sizes(config))
        for kind in kinds
    )
    variables = [v for network in networks for v in network.trainable_variables]
    optimizer = PlainAdam(networks[0].optimizer, variables)
    train_forwards = [tf_forward(network, training=True) for network in networks]
    val_forwards = [tf_forward(network) for network in networks]

    def step(x, y):
        with tf.GradientTape() as tape:
            losses = [tf.reduce_mean(tf.square(y - forward(x))) for forward in train_forwards]
            total = tf.add_n(losses)
        optimizer.apply(tape.gradient(total, variables))
        return tf.stack(losses)

    # autograph=False: neither function has Python control flow to convert, and converting
    # them (parsing and rewriting their source) costs a fresh process about 0.2 s.
    train_step = tf.function(step, jit_compile=JIT_COMPILE, autograph=False)
    val_outputs = tf.function(
        lambda x: [forward(x) for forward in val_forwards],
        autograph=False,
        input_signature=[tf.TensorSpec((None, config.window, n_features), tf.float32)],
    )
    weights = [network.get_weights() for network in networks]
    return _Compiled(networks, weights, optimizer, train_step, val_outputs)


def seeded_branches(
    kinds: tuple[str, ...], config: ModelConfig, n_features: int, n_targets: int
) -> _Compiled:
    """The compiled networks for `kinds`, at the seed's initial weights and with an untouched
    optimizer.

    The first call for a (kinds, shapes, config) builds them; later calls in the same process
    reset the same networks (weights and optimizer variables back to their initial values), so
    their traced functions are reused and every fit equals one in a fresh process.
    """
    key = _model_key(kinds, config, n_features, n_targets)
    if key not in _COMPILED:
        _COMPILED[key] = _compile(kinds, config, n_features, n_targets)
    else:
        compiled = _COMPILED[key]
        for network, weights in zip(compiled.networks, compiled.weights, strict=True):
            network.set_weights(weights)
        compiled.optimizer.reset()
    return _COMPILED[key]


def epoch_batches(n: int, config: ModelConfig, rng: np.random.Generator):
    """Index arrays of one epoch's batches: a fresh shuffle (from the fit's seeded generator),
    cut into batches of exactly `batch_size` windows.

    The ragged last batch is dropped: with one batch shape the step is traced once and runs
    about 25 % faster than with a ragged last batch. The windows left out (fewer than one batch)
    change from epoch to epoch with the shuffle.
    """
    batch = min(config.batch_size, n)
    order = rng.permutation(n)
    return [order[i : i + batch] for i in range(0, n - batch + 1, batch)]


@dataclass
class Branch:
    kind: str
    best: float = float("inf")
    best_epoch: int = 0
    best_weights: list[Any] | None = None
    wait: int = 0
    stopped: bool = False
    loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)


def score_epoch(
    compiled: _Compiled, branches: list[Branch], train_losses, x_val, y_val, epoch, patience
) -> bool:
    """Early stopping per branch, as `keras.callbacks.EarlyStopping(monitor='val_loss',
    patience=patience, restore_best_weights=True)` would do on that branch alone; True when every
    branch has stopped.

    After each epoch every branch still running scores the validation block; a branch that has
    not improved for `patience` epochs stops (its losses are no longer recorded, its best
    weights are kept; its layers still train, unseen, until the last branch stops).
    """
    import numpy as np

    outputs = compiled.val_outputs(x_val)  # one array per branch
    for branch, network, predicted, train_loss in zip(
        branches, compiled.networks, outputs, train_losses, strict=True
    ):
        if branch.stopped:
            continue
        errors = np.asarray(predicted, dtype="float64") - y_val
        current = float(np.mean(errors * errors))
        branch.loss.append(float(train_loss))
        branch.val_loss.append(current)
        branch.wait += 1
        if branch.best_weights is None or current < branch.best:
            branch.best, branch.best_epoch, branch.wait = current, epoch, 0
            branch.best_weights = [w.copy() for w in network.get_weights()]
        if branch.wait >= patience and epoch > 0:
            branch.stopped = True
    return all(b.stopped for b in branches)


class PlainAdam:
    """The update of the model's own `keras.optimizers.Adam` (as `build_model` compiles it: no
    weight decay, clipping, AMSGrad or EMA; its settings read from the optimizer, anything else
    refused) as plain TensorFlow operations: the same formula in the same order
    (tests/test_models.py compares them), with its own moments and step counter. Keras' `apply` traced about 1.3 times as long; a fresh
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
