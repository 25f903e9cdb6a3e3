"""ml.model.training: candidates, early stopping, reproducibility, no test-block leakage, skill weights.

Real Keras training on ~3 years of synthetic GOOGL bars ingested through the pipeline's own
ingest/publish steps, with a tiny config so the whole module runs in well under a minute.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from ml.config import ModelConfig, Settings, get_settings
from ml.data.store import PriceStore, data_fingerprint
from ml.model.evaluation import evaluate, mase_scale
from ml.model.features import TARGETS
from ml.model.training import (
    TrainResult,
    fit_candidate,
    fit_candidates,
    fit_skill_weights,
    train_on_history,
)
from ml.model.windows import prepare, split_sizes
from ml.steps.common import instrument_for
from ml.steps.data import ingest_step, publish_step

TICKER = "GOOGL"
AS_OF = date(2023, 12, 29)  # a Friday: ~3 years of bars from 2021-01-04
TINY = ModelConfig(kinds=("lstm", "gru"), units=8, max_epochs=3, patience=2, batch_size=64)


# --------------------------------------------------------------------------------------------------
# Fixtures: one ingest and three trainings shared by the whole module
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    data_dir: Path = tmp_path_factory.mktemp("training") / "data"
    data_dir.mkdir()
    return replace(get_settings({}), data_dir=data_dir, history_start=date(2021, 1, 4))


@pytest.fixture(scope="module")
def history(module_settings: Settings):
    ingest_step(TICKER, AS_OF, module_settings)
    publish_step(TICKER, AS_OF, module_settings)
    instrument = instrument_for(TICKER, module_settings)
    frame = PriceStore(module_settings.data_dir).load(instrument, until=AS_OF)
    assert 700 < len(frame) < 800  # ~3 years of business days
    return frame


@pytest.fixture(scope="module")
def trained(history) -> TrainResult:
    return train_on_history(TICKER, AS_OF, history, TINY)


@pytest.fixture(scope="module")
def retrained(history) -> TrainResult:
    """A second, independent training on the same data and config."""
    return train_on_history(TICKER, AS_OF, history, TINY)


def _test_only_start(n_bars: int, config: ModelConfig) -> int:
    """Index of the first bar that only test windows see (as input or as target).

    Window i covers feature rows i..i+window-1 (history rows i+1..i+window) and predicts history
    row i+window+1, so the last validation window predicts history row window + n_train + n_val.
    """
    n_windows = n_bars - 1 - config.window
    n_train, n_val, _ = split_sizes(n_windows, config.split)
    return config.window + n_train + n_val + 1


@pytest.fixture(scope="module")
def changed_test_block(history):
    """The same history with every test-only bar's prices scaled by 1.5 and volume doubled."""
    changed = history.copy()
    start = _test_only_start(len(history), TINY)
    rows = changed.index >= start
    for col in ("Open", "High", "Low", "Close", "Adj Close"):
        changed.loc[rows, col] = changed.loc[rows, col] * 1.5
    changed.loc[rows, "Volume"] = changed.loc[rows, "Volume"] * 2
    return changed


@pytest.fixture(scope="module")
def trained_on_changed_test_block(changed_test_block) -> TrainResult:
    return train_on_history(TICKER, AS_OF, changed_test_block, TINY)


# --------------------------------------------------------------------------------------------------
# Candidates and the chosen model
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_trains_both_kinds_and_keeps_the_better_validation_score(trained: TrainResult) -> None:
    assert [c.kind for c in trained.candidates] == ["lstm", "gru"]
    for c in trained.candidates:
        assert 1 <= c.best_epoch <= c.epochs_run <= TINY.max_epochs
        assert len(c.loss) == len(c.val_loss) == c.epochs_run
        assert c.best_val_loss == min(c.val_loss)
        assert c.best_val_loss == c.val_loss[c.best_epoch - 1]
        assert np.isfinite(c.loss).all() and np.isfinite(c.val_loss).all()
        # the first step and validation pass are part of the fit, and timed apart
        assert 0 < c.trace_seconds <= c.seconds
    chosen = trained.chosen
    assert chosen.kind == trained.forecaster.kind
    assert chosen.val_score == min(c.val_score for c in trained.candidates)
    other = next(c for c in trained.candidates if c.kind != chosen.kind)
    assert chosen.val_score <= other.val_score
    # The network that was kept is the one of the chosen kind.
    assert trained.forecaster.model.layers[0].name == chosen.kind


@pytest.mark.slow
def test_result_carries_fingerprints_split_and_evaluation(trained: TrainResult, history) -> None:
    assert trained.ticker == TICKER
    assert trained.as_of == AS_OF
    assert trained.data_fingerprint == data_fingerprint(history)
    assert trained.config_fingerprint == TINY.fingerprint()
    split = trained.split
    n_windows = len(history) - 1 - TINY.window
    assert (len(split.train), len(split.val), len(split.test)) == split_sizes(n_windows, TINY.split)
    # Chronological: train < val < test in target dates.
    assert split.train.target_dates[-1] < split.val.target_dates[0]
    assert split.val.target_dates[-1] < split.test.target_dates[0]
    assert trained.test_predictions.shape == (len(split.test), len(TARGETS))
    assert trained.evaluation.n_test == len(split.test)
    # The report is exactly the evaluation of the stored test predictions.
    train = split.train
    again = evaluate(
        split.test.actual,
        trained.test_predictions,
        split.test.last_close,
        split.test.last_adj_close,
        split.test.high_ratio,
        split.test.low_ratio,
        mase_scale(train.actual, train.last_close, train.last_adj_close),
    )
    assert again.as_metrics() == pytest.approx(trained.evaluation.as_metrics(), nan_ok=True)


@pytest.mark.slow
def test_predictions_are_prices_near_the_last_close(trained: TrainResult) -> None:
    test = trained.split.test
    predicted = trained.test_predictions
    assert np.isfinite(predicted).all()
    assert (predicted > 0).all()
    anchors = np.stack([test.last_close] * 3 + [test.last_adj_close], axis=1)
    ratio = predicted / anchors
    assert ((ratio > 0.8) & (ratio < 1.25)).all(), ratio
    # Same magnitude as the actual next-bar prices (not standardized values or log-ratios).
    assert np.median(predicted[:, 2]) == pytest.approx(np.median(test.actual[:, 2]), rel=0.2)
    hi, lo = TARGETS.index("High"), TARGETS.index("Low")
    assert (predicted[:, hi] >= predicted[:, lo]).all()


# --------------------------------------------------------------------------------------------------
# Early stopping
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_early_stopping_stops_and_restores_the_best_weights(history) -> None:
    config = ModelConfig(
        kinds=("lstm",), units=8, max_epochs=200, patience=1, batch_size=32, learning_rate=0.01
    )
    tiny = history.iloc[-200:].reset_index(drop=True)  # ~190 windows: overfits quickly
    split = prepare(tiny, config.window, config.split, config.naive_lookback)
    model, result = fit_candidate("lstm", split, config)

    assert result.epochs_run < config.max_epochs
    assert 1 <= result.best_epoch <= result.epochs_run
    # Keras stops `patience` epochs after the last improvement.
    assert result.epochs_run == result.best_epoch + config.patience
    assert result.val_loss[-1] >= result.best_val_loss
    # The returned model holds the best epoch's weights, not the last epoch's.
    x_val, y_val = split.scaled(split.val)
    restored = float(model.evaluate(x_val, y_val, verbose=0, batch_size=len(x_val)))
    assert restored == pytest.approx(result.best_val_loss, rel=1e-4)
    if result.val_loss[-1] > result.best_val_loss * (1 + 1e-3):
        assert restored != pytest.approx(result.val_loss[-1], rel=1e-4)


def test_train_step_returns_each_branch_mse_and_takes_one_adam_step() -> None:
    """The fit's own train step (not `Model.fit`): per branch, the batch MSE the compiled
    `loss="mse"` would report, computed before the update; then one Adam update of every weight."""
    import numpy as np

    from ml.model.train_step import seeded_branches

    config = ModelConfig(units=4, dense_units=3, learning_rate=0.01)
    compiled = seeded_branches(("gru", "lstm"), config, 5, 2)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, config.window, 5)).astype("float32")
    y = rng.normal(size=(16, 2)).astype("float32")

    def weights(c):
        return [w for network in c.networks for w in network.get_weights()]

    assert [n.name for n in compiled.networks] == [
        f"gru_w{config.window}",
        f"lstm_w{config.window}",
    ]
    expected = [float(np.mean((np.asarray(n(x)) - y) ** 2)) for n in compiled.networks]
    before = weights(compiled)
    losses = compiled.train_step(x, y).numpy()
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    assert int(compiled.optimizer.iterations.numpy()) == 1
    after = weights(compiled)
    assert all(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    # The next fit of the same shapes starts again from the seed's weights and a fresh optimizer.
    again = seeded_branches(("gru", "lstm"), config, 5, 2)
    assert again is compiled and int(again.optimizer.iterations.numpy()) == 0
    assert all(not moment.numpy().any() for moment in again.optimizer.moments)
    for a, b in zip(before, weights(again), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_each_kind_trains_in_the_joint_fit_as_it_would_alone(history) -> None:
    """Both kinds are fitted by one train step (ml.model.train_step) with early stopping per kind.
    The first kind's branch starts from the same initial weights as that kind alone and sees the
    same batches, so its losses, stopping epoch and best weights are those of a fit of it alone;
    it stops when its own patience runs out, whatever the other kind does."""
    config = ModelConfig(units=8, max_epochs=12, patience=2, batch_size=64, learning_rate=0.01)
    split = prepare(history, config.window, config.split, config.naive_lookback)
    joint = fit_candidates(("lstm", "gru"), split, config)
    [(alone_weights, alone)] = fit_candidates(("lstm",), split, config)

    (lstm_weights, lstm), (_, gru) = joint
    assert (lstm.kind, gru.kind) == ("lstm", "gru")
    np.testing.assert_allclose(lstm.val_loss, alone.val_loss, rtol=1e-4)
    np.testing.assert_allclose(lstm.loss, alone.loss, rtol=1e-4)
    assert (lstm.best_epoch, lstm.epochs_run) == (alone.best_epoch, alone.epochs_run)
    for a, b in zip(lstm_weights, alone_weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for c in (lstm, gru):
        # Stopped by its own patience, or ran out of epochs.
        assert c.epochs_run in (c.best_epoch + config.patience, config.max_epochs)
        assert len(c.loss) == len(c.val_loss) == c.epochs_run
        assert c.best_val_loss == min(c.val_loss) == c.val_loss[c.best_epoch - 1]


# --------------------------------------------------------------------------------------------------
# Reproducibility and no test-block leakage
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_same_data_and_config_give_the_same_model(
    trained: TrainResult, retrained: TrainResult
) -> None:
    assert retrained.data_fingerprint == trained.data_fingerprint
    assert retrained.config_fingerprint == trained.config_fingerprint
    assert retrained.forecaster.kind == trained.forecaster.kind
    for a, b in zip(trained.candidates, retrained.candidates, strict=True):
        assert a.kind == b.kind
        np.testing.assert_allclose(a.val_loss, b.val_loss, rtol=1e-6)
    np.testing.assert_allclose(
        retrained.test_predictions, trained.test_predictions, rtol=1e-9, atol=1e-9
    )
    assert retrained.forecaster.skill_weights == trained.forecaster.skill_weights


@pytest.mark.slow
def test_a_fit_is_the_same_in_a_fresh_process(trained: TrainResult, history, tmp_path) -> None:
    """The compiled network reused within a process (ml.model.training.seeded_model) starts every fit
    from the seed's weights and optimizer state: `trained` (after other fits in this process)
    equals a fit in a process that never fitted anything before."""
    import json
    import subprocess
    import sys

    path = tmp_path / "history.parquet"
    history.to_parquet(path, index=False)
    script = (
        "import json, sys\n"
        "from datetime import date\n"
        "import pandas as pd\n"
        "from ml.model.training import train_on_history\n"
        "from tests.test_training import AS_OF, TICKER, TINY\n"
        "r = train_on_history(TICKER, AS_OF, pd.read_parquet(sys.argv[1]), TINY)\n"
        "print(json.dumps({'val_loss': {c.kind: c.val_loss for c in r.candidates},\n"
        "                  'pred': r.test_predictions.tolist()}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    for c in trained.candidates:
        np.testing.assert_allclose(fresh["val_loss"][c.kind], c.val_loss, rtol=1e-6)
    np.testing.assert_allclose(fresh["pred"], trained.test_predictions, rtol=1e-6)


@pytest.mark.slow
def test_each_result_owns_its_network(history) -> None:
    """A later fit in the same process never changes the network of an earlier result."""
    first = train_on_history(TICKER, AS_OF, history, TINY)
    snapshot = [w.copy() for w in first.forecaster.model.get_weights()]
    other = train_on_history(TICKER, AS_OF, history.iloc[:-60], TINY)  # other bars, other weights
    assert other.forecaster.model is not first.forecaster.model
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(snapshot, other.forecaster.model.get_weights(), strict=True)
    )
    for a, b in zip(snapshot, first.forecaster.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_test_block_is_not_used_for_fitting(
    trained: TrainResult, trained_on_changed_test_block: TrainResult, history, changed_test_block
) -> None:
    changed = trained_on_changed_test_block
    # Precondition: only test windows differ between the two histories.
    assert data_fingerprint(changed_test_block) != data_fingerprint(history)
    for part in ("train", "val"):
        a, b = getattr(trained.split, part), getattr(changed.split, part)
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)
    assert not np.allclose(trained.split.test.actual, changed.split.test.actual)

    # Scalers, losses, skill weights and the network itself are unchanged.
    np.testing.assert_array_equal(trained.split.x_scaler.mean, changed.split.x_scaler.mean)
    np.testing.assert_array_equal(trained.split.y_scaler.std, changed.split.y_scaler.std)
    for a, b in zip(trained.candidates, changed.candidates, strict=True):
        assert a.val_loss == b.val_loss
        assert a.loss == b.loss
        assert a.best_epoch == b.best_epoch
    assert changed.forecaster.kind == trained.forecaster.kind
    assert changed.forecaster.skill_weights == trained.forecaster.skill_weights
    for w_a, w_b in zip(
        trained.forecaster.model.get_weights(), changed.forecaster.model.get_weights(), strict=True
    ):
        np.testing.assert_array_equal(w_a, w_b)
    # ...while the test-block predictions follow the changed bars.
    assert not np.allclose(trained.test_predictions, changed.test_predictions)


# --------------------------------------------------------------------------------------------------
# fit_skill_weights (pure numpy)
# --------------------------------------------------------------------------------------------------


def _orthogonal_to(y: np.ndarray, seed: int) -> np.ndarray:
    """Random predictions with exactly zero correlation (through the origin) with each column of y."""
    p = np.random.default_rng(seed).normal(size=y.shape)
    for j in range(y.shape[1]):
        p[:, j] -= (p[:, j] @ y[:, j]) / (y[:, j] @ y[:, j]) * y[:, j]
    return p


def test_skill_weights_are_zero_for_predictions_uncorrelated_with_targets() -> None:
    y = np.random.default_rng(0).normal(size=(300, 4))
    p = _orthogonal_to(y, seed=1)
    assert fit_skill_weights(p, y) == (0.0, 0.0, 0.0, 0.0)


def test_skill_weights_are_zero_for_independent_noise() -> None:
    rng = np.random.default_rng(3)
    y = rng.normal(size=(300, 4)) * 0.01
    p = rng.normal(size=(300, 4)) * 0.01
    weights = fit_skill_weights(p, y)
    # Independent noise shows no significant skill on any target (checked for this seed).
    assert weights == (0.0, 0.0, 0.0, 0.0)


def test_skill_weights_are_zero_for_anti_correlated_predictions() -> None:
    rng = np.random.default_rng(4)
    p = rng.normal(size=(200, 4))
    y = -p + 0.1 * rng.normal(size=(200, 4))
    assert fit_skill_weights(p, y) == (0.0, 0.0, 0.0, 0.0)


def test_skill_weights_are_one_for_perfect_predictions() -> None:
    y = np.random.default_rng(5).normal(size=(100, 4)) * 0.02
    assert fit_skill_weights(y.copy(), y) == (1.0, 1.0, 1.0, 1.0)


def test_skill_weights_are_one_for_nearly_perfect_predictions() -> None:
    rng = np.random.default_rng(6)
    y = rng.normal(size=(200, 4)) * 0.02
    p = y + rng.normal(size=y.shape) * 1e-6
    np.testing.assert_allclose(fit_skill_weights(p, y), 1.0, atol=1e-4)


def test_skill_weights_are_clipped_to_one_and_equal_the_slope_below_one() -> None:
    rng = np.random.default_rng(7)
    p = rng.normal(size=(400, 4))
    noise = 0.05 * rng.normal(size=(400, 4))
    slopes = np.array([2.0, 0.5, 0.25, 1.5])
    y = p * slopes + noise
    weights = np.array(fit_skill_weights(p, y))
    assert ((weights >= 0) & (weights <= 1)).all()
    assert weights[0] == 1.0 and weights[3] == 1.0  # slopes > 1 are clipped
    np.testing.assert_allclose(weights[[1, 2]], slopes[[1, 2]], atol=0.02)


def test_skill_weights_per_target_and_degenerate_inputs() -> None:
    rng = np.random.default_rng(8)
    y = rng.normal(size=(300, 4))
    p = _orthogonal_to(y, seed=9)
    p[:, 1] = y[:, 1] * 2 + 0.01 * rng.normal(size=300)  # skill on Low only, slope ~0.5
    p[:, 3] = 0.0  # a constant-zero prediction carries no information
    weights = fit_skill_weights(p, y)
    assert weights[0] == 0.0 and weights[2] == 0.0 and weights[3] == 0.0
    assert weights[1] == pytest.approx(0.5, abs=0.01)
    # Fewer than 3 rows: no evidence of skill.
    assert fit_skill_weights(y[:2], y[:2]) == (0.0, 0.0, 0.0, 0.0)


# --------------------------------------------------------------------------------------------------
# Selection by validation: the test block only scores
# --------------------------------------------------------------------------------------------------


class _Signal:
    """A stand-in model: High = +s, Low = -s log-ratios, s read off one input of the last bar."""

    def __init__(self, column: int) -> None:
        self.column = column

    def predict(self, x: np.ndarray) -> np.ndarray:
        s = x[:, -1, self.column]
        return np.column_stack([s, -s, np.zeros_like(s), np.zeros_like(s)])


def _regime_split():
    """Validation driven by input 6, test by input 7: a model reading 6 wins validation, one
    reading 7 would win the test block."""
    from ml.model.windows import Scaler, SplitData, WindowSet

    rng = np.random.default_rng(0)

    def part(n: int, driver: int) -> WindowSet:
        x = np.zeros((n, 6, 8))
        x[:, -1, 6:8] = rng.normal(0, 0.01, (n, 2))
        s = x[:, -1, driver]
        y = np.column_stack([s, -s, np.zeros(n), np.zeros(n)]) + rng.normal(0, 0.002, (n, 4))
        close = np.full(n, 100.0)
        return WindowSet(
            x, y, close, close, close[:, None] * np.exp(y), np.ones(n), np.ones(n), np.arange(n)
        )

    train, val, test = part(50, 6), part(200, 6), part(200, 7)
    return SplitData(train, val, test, Scaler.fit(train.x), Scaler.fit(train.y))


def test_selection_uses_validation_even_where_the_test_block_would_pick_the_other() -> None:
    from ml.model.forecaster import PriceForecaster
    from ml.model.training import _test_u2, select_by_validation

    split = _regime_split()

    def forecaster(kind: str, column: int) -> PriceForecaster:
        return PriceForecaster(kind, 6, _Signal(column), split.x_scaler, split.y_scaler)

    candidates = [forecaster("gbm", 7), forecaster("har", 6)]
    best, scores = select_by_validation(candidates, split)
    assert candidates[best].kind == "har" and scores[1] < scores[0]
    # On the test block the other one is better: selection never looked there.
    tests = {f.kind: _test_u2(f, split) for f in candidates}
    assert tests["gbm"]["High"] < tests["har"]["High"]
    # Its skill weights were fitted on validation: the input that drives it gets weight ~1.
    assert candidates[1].skill_weights[0] > 0.9


def test_a_model_without_validation_skill_scores_as_its_baseline() -> None:
    """A model of pure noise on validation (its skill weights are fitted on each half of the
    block and scored on the other) scores no better than the baseline it falls back to."""
    from ml.model.forecaster import PriceForecaster
    from ml.model.training import validation_score

    split = _regime_split()
    noise = PriceForecaster("gbm", 6, _Signal(7), split.x_scaler, split.y_scaler)
    assert validation_score(noise, split) >= 0.999
