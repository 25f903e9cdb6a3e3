"""The networks' own training step: every network kind of a fit as one traced Keras graph.

`seeded_branches` builds (once per process and shape) the `build_branches` graph of the kinds,
its traced train step (forward, summed MSE, gradients, the model's Adam in plain operations)
and its validation pass; `score_epoch` keeps each branch's best validation epoch and stops it
after `patience` epochs without improvement. `ml.model.training.fit_candidates` runs the epochs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ml.config import ModelConfig

if TYPE_CHECKING:
    import keras
    import numpy as np

    from ml.model.networks import PlainAdam


# XLA for the train step: off. It makes an epoch faster, but its compile costs more than plain
# tracing in every fresh process, and each Airflow train task is one: a default fit runs too few
# epochs to win that back (the measurements: BENCHMARKS.md, "History").
JIT_COMPILE = False


@dataclass
class _Compiled:
    model: keras.Model
    weights: list[Any]
    optimizer: PlainAdam  # the model's Adam in plain TF operations (its own state)
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
    """The config's network sizes and learning rate, as `build_model`/`build_branches` take them."""
    return {
        "units": config.units,
        "dense_units": config.dense_units,
        "learning_rate": config.learning_rate,
    }


def _compile(kinds: tuple[str, ...], config: ModelConfig, n_features: int, n_targets: int):
    """Build `build_branches(kinds)` and its two graph functions, the train step and the
    validation forward pass.

    The train step is our own (a `tf.function` around one batch: forward, the sum of the
    branches' MSEs, gradients, the model's Adam; the forward and Adam written as plain
    TensorFlow operations, `ml.model.networks.branch_forward` and `PlainAdam`, which compute
    what Keras' calls compute), not `Model.fit`: Keras' fit machinery traces
    its train function twice (inside a loop and a condition) before the first epoch runs, a
    cost every fresh process pays; this step traces once (Grappler off,
    `ml.model.networks.configure_tensorflow`), and runs an epoch as fast. The loss is what
    `compile(loss="mse")` would compute per branch: the mean squared error over the batch and
    the targets.
    """
    import keras
    import tensorflow as tf

    from ml.model.networks import PlainAdam, branch_forward, build_branches

    keras.utils.set_random_seed(config.seed)
    model = build_branches(kinds, config.window, n_features, n_targets, **layer_sizes(config))
    variables = model.trainable_variables
    # The network's forward pass and its Adam as plain TensorFlow operations on the model's own
    # variables (`ml.model.networks`): the same computation as `model(x)` and the compiled
    # optimizer's `apply`, which trace faster than Keras' layer calls and optimizer.
    forward = branch_forward(model, kinds)
    optimizer = PlainAdam(model.optimizer, variables)

    def step(x, y):
        with tf.GradientTape() as tape:
            losses = [tf.reduce_mean(tf.square(y - out)) for out in forward(x)]
            total = tf.add_n(losses)
        optimizer.apply(tape.gradient(total, variables))
        return tf.stack(losses)

    # autograph=False: neither function has Python control flow to convert, and converting
    # them (parsing and rewriting their source) costs a fresh process about 0.2 s.
    train_step = tf.function(step, jit_compile=JIT_COMPILE, autograph=False)
    val_outputs = tf.function(
        forward,
        autograph=False,
        input_signature=[tf.TensorSpec((None, config.window, n_features), tf.float32)],
    )
    return _Compiled(model, model.get_weights(), optimizer, train_step, val_outputs)


def seeded_branches(
    kinds: tuple[str, ...], config: ModelConfig, n_features: int, n_targets: int
) -> _Compiled:
    """The compiled `build_branches` model for `kinds`, at the seed's initial weights and with an
    untouched optimizer.

    The first call for a (kinds, shapes, config) builds it; later calls in the same process reset
    the same compiled model (weights and optimizer variables back to their initial values), so
    its traced functions are reused and every fit equals one in a fresh process.
    """
    key = _model_key(kinds, config, n_features, n_targets)
    if key not in _COMPILED:
        _COMPILED[key] = _compile(kinds, config, n_features, n_targets)
    else:
        compiled = _COMPILED[key]
        compiled.model.set_weights(compiled.weights)
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

    from ml.model.networks import branch_weights

    outputs = compiled.val_outputs(x_val)  # one array per branch (`branch_forward`)
    for branch, predicted, train_loss in zip(branches, outputs, train_losses, strict=True):
        if branch.stopped:
            continue
        errors = np.asarray(predicted, dtype="float64") - y_val
        current = float(np.mean(errors * errors))
        branch.loss.append(float(train_loss))
        branch.val_loss.append(current)
        branch.wait += 1
        if branch.best_weights is None or current < branch.best:
            branch.best, branch.best_epoch, branch.wait = current, epoch, 0
            branch.best_weights = branch_weights(compiled.model, branch.kind)
        if branch.wait >= patience and epoch > 0:
            branch.stopped = True
    return all(b.stopped for b in branches)
