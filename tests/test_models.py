"""ml.model.networks: the notebook's network, `recurrent(units) -> Dense(8, relu) -> Dense(4)`, Adam + MSE."""

from __future__ import annotations

import pytest

from ml.config import NETWORK_KINDS
from ml.model.networks import branch_layer_names, branch_weights, build_branches, build_model

WINDOW, N_FEATURES, N_TARGETS = 6, 8, 4


@pytest.mark.parametrize("kind", NETWORK_KINDS)
def test_build_model_has_the_notebook_shape(kind: str) -> None:
    import keras

    model = build_model(kind, WINDOW, N_FEATURES, N_TARGETS, units=12)
    recurrent_cls = keras.layers.LSTM if kind == "lstm" else keras.layers.GRU

    layers = model.layers
    assert len(layers) == 3
    recurrent, hidden, out = layers
    assert type(recurrent) is recurrent_cls
    assert recurrent.units == 12
    assert not recurrent.return_sequences  # one vector per window, not a sequence
    assert isinstance(hidden, keras.layers.Dense)
    assert hidden.units == 8
    assert hidden.activation is keras.activations.relu
    assert isinstance(out, keras.layers.Dense)
    assert out.units == N_TARGETS
    assert out.activation is keras.activations.linear

    assert tuple(model.input_shape) == (None, WINDOW, N_FEATURES)
    assert tuple(model.output_shape) == (None, N_TARGETS)


@pytest.mark.parametrize("kind", NETWORK_KINDS)
def test_build_model_default_units_is_64(kind: str) -> None:
    model = build_model(kind, WINDOW, N_FEATURES, N_TARGETS)
    assert model.layers[0].units == 64


@pytest.mark.parametrize("kind", NETWORK_KINDS)
def test_build_model_is_compiled_with_adam_and_mse(kind: str) -> None:
    import keras
    import numpy as np

    model = build_model(kind, 5, 3, 2, units=4, learning_rate=0.005)
    assert model.compiled
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.005)
    assert model.loss in ("mse", "mean_squared_error") or isinstance(
        model.loss, keras.losses.MeanSquaredError
    )

    # The compiled loss really is the mean squared error of the outputs.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 5, 3)).astype("float32")
    y = rng.normal(size=(7, 2)).astype("float32")
    predicted = model.predict(x, verbose=0)
    expected = float(np.mean((predicted - y) ** 2))
    assert model.evaluate(x, y, verbose=0, batch_size=7) == pytest.approx(expected, rel=1e-4)


def test_build_model_honours_window_features_and_dense_units() -> None:
    model = build_model("gru", 10, 3, 2, units=5, dense_units=7)
    assert tuple(model.input_shape) == (None, 10, 3)
    assert tuple(model.output_shape) == (None, 2)
    assert model.layers[1].units == 7


@pytest.mark.parametrize("kind", ["rnn", "LSTM", "", "transformer"])
def test_build_model_unknown_kind_raises(kind: str) -> None:
    with pytest.raises(ValueError, match="unknown network kind"):
        build_model(kind, WINDOW, N_FEATURES, N_TARGETS)


# --------------------------------------------------------------------------------------------------
# build_branches: every kind side by side in one graph (what ml.model.training fits)
# --------------------------------------------------------------------------------------------------


def test_build_branches_has_one_notebook_network_per_kind() -> None:
    import keras

    model = build_branches(("lstm", "gru"), WINDOW, N_FEATURES, N_TARGETS, units=12)
    assert tuple(model.input_shape) == (None, WINDOW, N_FEATURES)
    assert [tuple(s) for s in model.output_shape] == [(None, N_TARGETS), (None, N_TARGETS)]
    for kind, recurrent_cls in (("lstm", keras.layers.LSTM), ("gru", keras.layers.GRU)):
        recurrent, hidden, out = (model.get_layer(n) for n in branch_layer_names(kind))
        assert type(recurrent) is recurrent_cls and recurrent.units == 12
        assert hidden.units == 8 and hidden.activation is keras.activations.relu
        assert out.units == N_TARGETS and out.activation is keras.activations.linear
    # The branches share no weights: the model holds exactly both networks' weights.
    lstm = build_model("lstm", WINDOW, N_FEATURES, N_TARGETS, units=12)
    gru = build_model("gru", WINDOW, N_FEATURES, N_TARGETS, units=12)
    assert model.count_params() == lstm.count_params() + gru.count_params()


def test_branch_weights_make_the_standalone_network_of_that_branch() -> None:
    import numpy as np

    model = build_branches(("lstm", "gru"), WINDOW, N_FEATURES, N_TARGETS, units=6)
    x = np.random.default_rng(1).normal(size=(9, WINDOW, N_FEATURES)).astype("float32")
    outputs = model(x)
    for i, kind in enumerate(("lstm", "gru")):
        alone = build_model(kind, WINDOW, N_FEATURES, N_TARGETS, units=6)
        alone.set_weights(branch_weights(model, kind))
        np.testing.assert_allclose(alone(x), outputs[i], rtol=1e-5, atol=1e-6)


def test_build_branches_loss_is_the_sum_of_the_branch_mses() -> None:
    import keras
    import numpy as np

    model = build_branches(("gru", "lstm"), 5, 3, 2, units=4, learning_rate=0.005)
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.005)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 5, 3)).astype("float32")
    y = rng.normal(size=(7, 2)).astype("float32")
    predicted = model.predict(x, verbose=0)
    expected = [float(np.mean((p - y) ** 2)) for p in predicted]
    logs = model.evaluate(x, [y, y], verbose=0, batch_size=7, return_dict=True)
    assert logs["loss"] == pytest.approx(sum(expected), rel=1e-4)
    assert logs["gru_targets_loss"] == pytest.approx(expected[0], rel=1e-4)
    assert logs["lstm_targets_loss"] == pytest.approx(expected[1], rel=1e-4)


@pytest.mark.parametrize("kinds", [(), ("lstm", "lstm"), ("lstm", "rnn")])
def test_build_branches_rejects_empty_repeated_or_unknown_kinds(kinds: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="kind"):
        build_branches(kinds, WINDOW, N_FEATURES, N_TARGETS)


@pytest.mark.parametrize("kinds", [("lstm", "gru"), ("gru",), ("lstm",)])
def test_branch_forward_computes_what_the_keras_model_computes(kinds: tuple[str, ...]) -> None:
    """The train step's and validation pass's forward in plain TF ops (`branch_forward`) gives
    the Keras model's outputs: same operations, same order, so equal bit for bit here."""
    import keras
    import numpy as np

    from ml.model.networks import branch_forward

    keras.utils.set_random_seed(3)
    model = build_branches(kinds, WINDOW, N_FEATURES, N_TARGETS, units=7, dense_units=5)
    x = np.random.default_rng(2).normal(size=(11, WINDOW, N_FEATURES)).astype("float32")
    ours = branch_forward(model, kinds)(x)
    theirs = model(x, training=True)
    theirs = theirs if isinstance(theirs, (list, tuple)) else [theirs]
    assert len(ours) == len(kinds)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_train_steps_in_plain_ops_update_every_weight_as_keras_does() -> None:
    """Three steps through `branch_forward` and `PlainAdam` (the train step's forward and Adam)
    move every weight as the same steps through Keras' layer calls and the compiled Adam do
    (same seed, same batches, two fresh models)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from ml.model.networks import PlainAdam, branch_forward

    rng = np.random.default_rng(4)
    x = rng.normal(size=(16, WINDOW, N_FEATURES)).astype("float32")
    y = rng.normal(size=(16, N_TARGETS)).astype("float32")
    after = []
    for use_keras in (True, False):
        keras.utils.set_random_seed(5)
        model = build_branches(("lstm", "gru"), WINDOW, N_FEATURES, N_TARGETS, units=6)
        forward = (
            (lambda v, m=model: m(v, training=True))
            if use_keras
            else branch_forward(model, ("lstm", "gru"))
        )
        variables = model.trainable_variables
        if use_keras:
            model.optimizer.build(variables)

            def apply(gradients, m=model, v=variables):
                m.optimizer.apply(gradients, v)
        else:
            apply = PlainAdam(model.optimizer, variables).apply
        for _ in range(3):
            with tf.GradientTape() as tape:
                total = tf.add_n([tf.reduce_mean(tf.square(y - o)) for o in forward(x)])
            apply(tape.gradient(total, variables))
        after.append(model.get_weights())
    for ours, theirs in zip(after[1], after[0], strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_plain_adam_refuses_an_optimizer_it_does_not_compute() -> None:
    import keras

    from ml.model.networks import PlainAdam

    model = build_model("lstm", WINDOW, N_FEATURES, N_TARGETS, units=4)
    clipped = keras.optimizers.Adam(1e-3, clipnorm=1.0)
    with pytest.raises(ValueError, match="clipnorm"):
        PlainAdam(clipped, model.trainable_variables)


def test_branch_forward_refuses_layers_it_does_not_compute() -> None:
    import keras

    from ml.model.networks import branch_forward

    inputs = keras.Input(shape=(WINDOW, N_FEATURES))
    h = keras.layers.GRU(4, name="gru", reset_after=False)(inputs)
    h = keras.layers.Dense(3, activation="relu", name="gru_hidden")(h)
    model = keras.Model(inputs, keras.layers.Dense(N_TARGETS, name="gru_targets")(h))
    with pytest.raises(ValueError, match="reset_after"):
        branch_forward(model, ("gru",))


@pytest.mark.parametrize("kind", NETWORK_KINDS)
@pytest.mark.parametrize("window", [WINDOW, 40])  # unrolled, and a window Keras loops over
def test_numpy_forward_computes_what_the_keras_model_computes(kind: str, window: int) -> None:
    """A forecaster's predictions in NumPy (`numpy_forward`) equal the Keras network's own, with
    weights away from their initial values (biases included), read at each call."""
    import keras
    import numpy as np

    from ml.model.networks import numpy_forward

    keras.utils.set_random_seed(6)
    model = build_model(kind, window, N_FEATURES, N_TARGETS, units=9, dense_units=5)
    rng = np.random.default_rng(7)
    model.set_weights([w + rng.normal(scale=0.3, size=w.shape) for w in model.get_weights()])
    x = rng.normal(size=(23, window, N_FEATURES)).astype("float32")
    forward = numpy_forward(model)
    assert forward is not None
    np.testing.assert_allclose(forward(x), np.asarray(model(x)), rtol=1e-5, atol=1e-6)
    model.set_weights([w * 0.5 for w in model.get_weights()])
    np.testing.assert_allclose(forward(x), np.asarray(model(x)), rtol=1e-5, atol=1e-6)


def test_numpy_forward_declines_a_network_it_does_not_compute() -> None:
    """Other layers or cell settings: None, and the forecaster calls Keras instead (same
    predictions as the network's own)."""
    import keras
    import numpy as np

    from ml.model.forecaster import PriceForecaster
    from ml.model.networks import numpy_forward
    from ml.model.windows import Scaler

    other = keras.Sequential(
        [
            keras.Input(shape=(WINDOW, N_FEATURES)),
            keras.layers.GRU(4, reset_after=False),
            keras.layers.Dense(3, activation="relu"),
            keras.layers.Dense(N_TARGETS),
        ]
    )
    tanh_head = build_model("lstm", WINDOW, N_FEATURES, N_TARGETS, units=4)
    tanh_head.layers[1].activation = keras.activations.tanh
    assert numpy_forward(other) is None
    assert numpy_forward(tanh_head) is None
    x = np.random.default_rng(8).normal(size=(5, WINDOW, N_FEATURES))
    identity = Scaler(np.zeros(N_FEATURES), np.ones(N_FEATURES))
    forecaster = PriceForecaster("gru", WINDOW, other, identity, Scaler(np.zeros(4), np.ones(4)))
    np.testing.assert_allclose(
        forecaster.raw_log_ratios(x), np.asarray(other(x.astype("float32"))), rtol=1e-6
    )


@pytest.mark.parametrize("window", [WINDOW, 40])
def test_gru_branch_gradient_equals_the_one_through_kerass_layer(window: int) -> None:
    """The gradient through the GRU branch's plain operations (`branch_forward`, what the train
    step differentiates) is the one through Keras' own GRU layer, for every weight of the branch,
    with weights away from their initial values, a loss that weighs the outputs unevenly, and a
    window Keras loops over as well as the unrolled one."""
    import keras
    import numpy as np
    import tensorflow as tf

    from ml.model.networks import branch_forward

    keras.utils.set_random_seed(9)
    model = build_branches(("gru",), window, N_FEATURES, N_TARGETS, units=7, dense_units=5)
    rng = np.random.default_rng(10)
    model.set_weights([w + rng.normal(scale=0.2, size=w.shape) for w in model.get_weights()])
    x = rng.normal(size=(13, window, N_FEATURES)).astype("float32")
    y = rng.normal(size=(13, N_TARGETS)).astype("float32")
    weights = tf.constant(rng.uniform(0.5, 2.0, size=N_TARGETS).astype("float32"))
    variables = model.trainable_variables
    gradients = []
    for forward in (lambda v: [model(v, training=True)], branch_forward(model, ("gru",))):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(weights * tf.square(y - forward(x)[0]))
        gradients.append(tape.gradient(loss, variables))
    for variable, theirs, ours in zip(variables, *gradients, strict=True):
        assert ours is not None, variable.path
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6, err_msg=variable.path)


def test_numpy_forward_saturates_without_warnings() -> None:
    """Gate inputs far out on either side (large weights): the NumPy sigmoid saturates to 0 and 1
    as Keras' does, with no overflow warning and no NaN."""
    import warnings

    import keras
    import numpy as np

    from ml.model.networks import numpy_forward

    keras.utils.set_random_seed(11)
    for kind in NETWORK_KINDS:
        model = build_model(kind, WINDOW, N_FEATURES, N_TARGETS, units=5, dense_units=4)
        model.set_weights([w * 400.0 for w in model.get_weights()])
        x = np.random.default_rng(12).normal(size=(9, WINDOW, N_FEATURES)).astype("float32")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours = numpy_forward(model)(x)
        assert np.isfinite(ours).all()
        np.testing.assert_allclose(ours, np.asarray(model(x)), rtol=1e-4, atol=1e-3)
