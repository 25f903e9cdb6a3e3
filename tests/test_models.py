"""ml.model.networks: the notebook's network, `recurrent(units) -> Dense(8, relu) -> Dense(4)`, Adam + MSE;
and every path derived from it (ml.model.networks, the train step) against Keras, for every kind."""

from __future__ import annotations

import pytest

from ml.config import NETWORK_KINDS, ModelConfig
from ml.model.networks import build_model

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


def test_build_model_keeps_the_layer_names_of_saved_models() -> None:
    for kind in NETWORK_KINDS:
        model = build_model(kind, WINDOW, N_FEATURES, N_TARGETS, units=4)
        assert model.name == f"{kind}_w{WINDOW}"
        assert [layer.name for layer in model.layers] == [kind, "hidden", "targets"]


# --------------------------------------------------------------------------------------------------
# Every path derived from the one definition (ml.model.networks, the train step) against Keras
# --------------------------------------------------------------------------------------------------


def _away_from_init(model, rng, scale: float = 0.3) -> None:
    """Weights away from their initial values (biases included), so a swapped gate or a missed
    bias shows."""
    model.set_weights(
        [w + rng.normal(scale=scale, size=w.shape).astype("float32") for w in model.get_weights()]
    )


def _forecaster(kind: str, window: int, model):
    """A forecaster of `model` with identity scalers: its raw predictions are the network's."""
    import numpy as np

    from ml.model.forecaster import PriceForecaster
    from ml.model.windows import Scaler

    identity = Scaler(np.zeros(N_FEATURES), np.ones(N_FEATURES))
    return PriceForecaster(kind, window, model, identity, Scaler(np.zeros(4), np.ones(4)))


def check_derived_paths(kind: str, window: int, tmp_path, *, numpy_kernels: bool = True) -> None:
    """What the train step and a forecaster compute for a `build_model(kind)` network is what
    Keras computes for it: the forward pass (`tf_forward`, the traced validation pass, the
    forecaster's predictions, also after a save and load) on random weights and inputs, and
    three steps of the traced train step against Keras' own `train_on_batch` (the compiled MSE
    and Adam) from the same weights on the same batches: losses and every weight after."""
    import keras
    import numpy as np

    from ml.model.networks import numpy_forward, tf_forward
    from ml.model.train_step import seeded_branches

    rng = np.random.default_rng(window)
    sizes = {"units": 7, "dense_units": 5, "learning_rate": 0.01}
    config = ModelConfig(window=window, **sizes)
    compiled = seeded_branches((kind,), config, N_FEATURES, N_TARGETS)
    [network] = compiled.networks
    _away_from_init(network, rng)
    reference = build_model(kind, window, N_FEATURES, N_TARGETS, **sizes)
    reference.set_weights(network.get_weights())
    x = rng.normal(size=(24, window, N_FEATURES)).astype("float32")
    expected = np.asarray(reference(x))

    assert (numpy_forward(network) is not None) == numpy_kernels
    network.save(tmp_path / f"{kind}.keras")
    loaded = keras.saving.load_model(tmp_path / f"{kind}.keras", compile=False)
    for name, outputs in (
        ("tf_forward", tf_forward(network)(x)),
        ("the traced validation pass", compiled.val_outputs(x)[0]),
        ("the forecaster", _forecaster(kind, window, network).raw_log_ratios(x)),
        ("the forecaster, loaded", _forecaster(kind, window, loaded).raw_log_ratios(x)),
    ):
        np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-6, err_msg=name)

    y = rng.normal(size=(len(x), N_TARGETS)).astype("float32")
    for batch in np.split(np.arange(len(x)), 3):
        theirs = float(reference.train_on_batch(x[batch], y[batch]))
        [ours] = compiled.train_step(x[batch], y[batch]).numpy()
        assert ours == pytest.approx(theirs, rel=1e-5)
    for ours, theirs in zip(network.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", NETWORK_KINDS)
@pytest.mark.parametrize("window", [WINDOW, 40])  # unrolled, and a window Keras loops over
def test_every_derived_path_computes_what_keras_computes(kind: str, window: int, tmp_path) -> None:
    check_derived_paths(kind, window, tmp_path)


@pytest.mark.parametrize("new_layer", ["Dense", "LayerNormalization"])
def test_a_new_layer_is_one_edit_to_network_layers(new_layer: str, monkeypatch, tmp_path) -> None:
    """The steps of docs/models.md: add the layer to `network_layers`, nothing else, and the
    train step and the forecaster compute the new network as Keras does. A layer class with a
    kernel in `ml.model.networks` (Dense) keeps the NumPy predictions; one without
    (LayerNormalization) trains through its own Keras call and predicts through Keras."""
    import keras

    from ml.model import networks, train_step

    defined = networks.network_layers

    def with_the_new_layer(kind, window, n_targets, *, units, dense_units):  # the one edit
        *body, targets = defined(kind, window, n_targets, units=units, dense_units=dense_units)
        if new_layer == "Dense":
            return [*body, keras.layers.Dense(6, activation="tanh", name="new"), targets]
        return [*body, keras.layers.LayerNormalization(name="new"), targets]

    monkeypatch.setattr(networks, "network_layers", with_the_new_layer)
    # Networks compiled under the old definition earlier in this process (the definition never
    # changes inside a real one).
    monkeypatch.setattr(train_step, "_COMPILED", {})
    for kind in NETWORK_KINDS:
        model = build_model(kind, WINDOW, N_FEATURES, N_TARGETS, units=4)
        assert [layer.name for layer in model.layers] == [kind, "hidden", "new", "targets"]
        check_derived_paths(kind, WINDOW, tmp_path, numpy_kernels=new_layer == "Dense")


@pytest.mark.parametrize("kind", NETWORK_KINDS)
def test_a_model_saved_by_an_earlier_version_predicts_as_it_did(kind: str) -> None:
    """tests/fixtures/models: `build_model` networks (window 6, 8 inputs, 4 units, weights away
    from their initial values) saved by the code before the networks were defined once, and
    their Keras outputs then: they load and predict the same, with the NumPy kernels."""
    import json
    from pathlib import Path

    import keras
    import numpy as np

    from ml.model.networks import numpy_forward

    fixtures = Path(__file__).parent / "fixtures" / "models"
    saved = json.loads((fixtures / "outputs.json").read_text())
    model = keras.saving.load_model(fixtures / f"{kind}_w6.keras", compile=False)
    x = np.asarray(saved["x"], dtype="float32")
    assert numpy_forward(model) is not None
    predicted = _forecaster(kind, WINDOW, model).raw_log_ratios(x)
    np.testing.assert_allclose(predicted, saved[kind], rtol=1e-5, atol=1e-6)


def test_a_layer_config_no_kernel_computes_goes_through_keras() -> None:
    """A GRU without `reset_after` (not what the GRU kernel computes): no NumPy forward, so the
    forecaster calls Keras, and `tf_forward` calls the layer itself; both give Keras' outputs."""
    import keras
    import numpy as np

    from ml.model.networks import layer_kernel, numpy_forward, tf_forward

    model = keras.Sequential(
        [
            keras.Input(shape=(WINDOW, N_FEATURES)),
            keras.layers.GRU(4, reset_after=False),
            keras.layers.Dense(3, activation="relu"),
            keras.layers.Dense(N_TARGETS),
        ]
    )
    assert layer_kernel(model.layers[0]) is None
    assert layer_kernel(model.layers[1]) is not None
    assert numpy_forward(model) is None
    x = np.random.default_rng(8).normal(size=(5, WINDOW, N_FEATURES)).astype("float32")
    expected = np.asarray(model(x))
    np.testing.assert_allclose(tf_forward(model)(x), expected, rtol=1e-6)
    np.testing.assert_allclose(
        _forecaster("gru", WINDOW, model).raw_log_ratios(x), expected, rtol=1e-6
    )


def test_plain_adam_refuses_an_optimizer_it_does_not_compute() -> None:
    import keras

    from ml.model.train_step import PlainAdam

    model = build_model("lstm", WINDOW, N_FEATURES, N_TARGETS, units=4)
    clipped = keras.optimizers.Adam(1e-3, clipnorm=1.0)
    with pytest.raises(ValueError, match="clipnorm"):
        PlainAdam(clipped, model.trainable_variables)


@pytest.mark.parametrize("kinds", [(), ("lstm", "lstm"), ("lstm", "rnn")])
def test_the_train_step_rejects_empty_repeated_or_unknown_kinds(kinds: tuple[str, ...]) -> None:
    from ml.model.train_step import seeded_branches

    with pytest.raises(ValueError, match="kind"):
        seeded_branches(kinds, ModelConfig(units=4), N_FEATURES, N_TARGETS)


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
