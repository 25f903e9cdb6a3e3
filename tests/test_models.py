"""ml.model.networks: the notebook's network, `recurrent(units) -> Dense(8, relu) -> Dense(4)`, Adam + MSE."""

from __future__ import annotations

import pytest

from ml.config import MODEL_KINDS
from ml.model.networks import branch_layer_names, branch_weights, build_branches, build_model

WINDOW, N_FEATURES, N_TARGETS = 6, 8, 4


@pytest.mark.parametrize("kind", MODEL_KINDS)
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


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_build_model_default_units_is_64(kind: str) -> None:
    model = build_model(kind, WINDOW, N_FEATURES, N_TARGETS)
    assert model.layers[0].units == 64


@pytest.mark.parametrize("kind", MODEL_KINDS)
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
    with pytest.raises(ValueError, match="unknown model kind"):
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
