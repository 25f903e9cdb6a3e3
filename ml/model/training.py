"""Train one ticker: every candidate kind, keep the one with the best validation score.

The candidates are the networks (`lstm`, `gru`) and the statistical models (`har`, `gbm`,
`ml.model.statistical`) of the config's `kinds`. Each gets its skill weights toward the
baselines on the validation block, and is then scored there in prices (`validation_score`, the
mean U2 against persistence over High, Low and Close, the gate's `score`); the lowest wins. The
test block is never seen by fitting, early stopping or selection; it is only scored afterwards,
against the persistence and range-aware baselines.

The network kinds are fitted at once, one `ml.model.networks.build_model` network per kind (a
branch) in one traced train step (`ml.model.train_step`), not `Model.fit`: same batches, summed
MSE, no shared weights, so each branch follows the gradients it would get alone. Early stopping
is per branch (`score_epoch`); each branch's best weights are copied out into a standalone
`build_model` network per kind. A statistical
winner is fitted again on train and validation together (keeping its validation skill weights):
it has no early stopping to hold the validation block for, and its selection is already made.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import date
from typing import TYPE_CHECKING, Any

from ml.config import NAIVE_KIND, NETWORK_KINDS, ModelConfig
from ml.data.store import data_fingerprint
from ml.model.networks import configure_tensorflow
from ml.model.train_step import Branch, epoch_batches, layer_sizes, score_epoch, seeded_branches
from ml.model.windows import SplitData, prepare

if TYPE_CHECKING:
    import keras
    import numpy as np
    import pandas as pd

    from ml.model.evaluation import EvaluationReport
    from ml.model.forecaster import PriceForecaster
    from ml.model.probabilistic import IntervalReport


@dataclass(frozen=True)
class CandidateResult:
    kind: str
    best_val_loss: float
    best_epoch: int
    epochs_run: int
    seconds: float  # this kind's share of the joint fit's wall time, `trace_seconds` included
    loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    # Its share of the first train step and the first validation pass: in a fresh process they
    # trace and instantiate the two graph functions (a few tenths of a second, whatever the
    # data), so the fit's wall time minus this is the epochs' own work.
    trace_seconds: float = 0.0
    # Mean U2 against persistence over High, Low and Close on the validation block, in prices,
    # after the skill weights (`validation_score`): what selects the registered kind.
    val_score: float = float("nan")


@dataclass
class TrainResult:
    ticker: str
    as_of: date
    forecaster: PriceForecaster
    candidates: list[CandidateResult]
    split: SplitData
    history: pd.DataFrame
    data_fingerprint: str
    config_fingerprint: str
    test_predictions: np.ndarray
    evaluation: EvaluationReport
    # Per candidate kind, as fitted for the selection (train block only): U2 on the test block
    # against the range-aware naive (High, Low) and persistence (Close). Reports only: the
    # selection never reads it.
    candidate_tests: dict[str, dict[str, float]] = field(default_factory=dict)
    # The forecaster's quantiles on the test block beside historical simulation and a Gaussian
    # (`ml.model.probabilistic`); None for a forecaster without quantiles.
    intervals: IntervalReport | None = None

    @property
    def chosen(self) -> CandidateResult:
        return next(c for c in self.candidates if c.kind == self.forecaster.kind)


def fit_candidates(
    kinds: tuple[str, ...], split: SplitData, config: ModelConfig
) -> list[tuple[list[Any], CandidateResult]]:
    """Fit every kind at once (one traced train step over a network per kind), early stopping
    per kind.

    Each epoch runs the train step over a fresh shuffle of the training windows; a branch's
    epoch training loss is the mean of its batch MSEs (every batch the same size, so the mean
    over the windows seen). Returns, per kind in order, the weights of its best validation epoch
    (for `ml.model.networks.build_model(kind, ...)`) and its CandidateResult; each kind's
    `seconds` and `trace_seconds` are its equal shares of the joint fit's.
    """
    import numpy as np

    kinds = tuple(kinds)
    x_train, y_train = split.scaled(split.train)
    x_val, y_val = split.scaled(split.val)
    x_train, y_train = x_train.astype("float32"), y_train.astype("float32")
    x_val = x_val.astype("float32")
    compiled = seeded_branches(kinds, config, x_train.shape[-1], y_train.shape[-1])
    branches = [Branch(kind) for kind in kinds]
    rng = np.random.default_rng(config.seed)
    started = time.perf_counter()
    first_calls = 0.0  # the first train step and the first validation pass (the traces)
    for epoch in range(config.max_epochs):
        batches = epoch_batches(len(x_train), config, rng)
        step_started = time.perf_counter()
        sums = [compiled.train_step(x_train[batches[0]], y_train[batches[0]])]
        if epoch == 0:
            first_calls += time.perf_counter() - step_started
        sums += [compiled.train_step(x_train[i], y_train[i]) for i in batches[1:]]
        train_losses = np.mean([s.numpy() for s in sums], axis=0)
        score_started = time.perf_counter()
        stop = score_epoch(compiled, branches, train_losses, x_val, y_val, epoch, config.patience)
        if epoch == 0:
            first_calls += time.perf_counter() - score_started
        if stop:
            break
    seconds = time.perf_counter() - started
    out = []
    for branch in branches:
        assert branch.best_weights is not None
        out.append(
            (
                branch.best_weights,
                CandidateResult(
                    kind=branch.kind,
                    best_val_loss=branch.best,
                    best_epoch=branch.best_epoch + 1,
                    epochs_run=len(branch.val_loss),
                    seconds=round(seconds / len(kinds), 3),
                    trace_seconds=round(first_calls / len(kinds), 3),
                    loss=branch.loss,
                    val_loss=branch.val_loss,
                ),
            )
        )
    return out


def standalone_network(
    kind: str, config: ModelConfig, n_features: int, n_targets: int, weights: list[Any]
) -> keras.Model:
    """A new `build_model(kind)` network of its own holding `weights`."""
    from ml.model.networks import build_model

    model = build_model(kind, config.window, n_features, n_targets, **layer_sizes(config))
    model.set_weights(weights)
    return model


def fit_candidate(
    kind: str, split: SplitData, config: ModelConfig
) -> tuple[keras.Model, CandidateResult]:
    """Fit one model kind; early stopping keeps the weights of the best validation epoch.

    Returns a network of its own (a copy of the best weights), not the process's compiled one.
    """
    [(weights, result)] = fit_candidates((kind,), split, config)
    n_features, n_targets = split.train.x.shape[-1], split.train.y.shape[-1]
    return standalone_network(kind, config, n_features, n_targets, weights), result


def fit_skill_weights(
    predicted: np.ndarray, actual: np.ndarray, z: float = 1.645
) -> tuple[float, ...]:
    """Per-target shrinkage of log-ratio predictions toward the target's baseline.

    Both arguments are log-ratios minus the baseline's (persistence: 0; the range-aware naive
    for High/Low: log of its ratio). On the validation block, regress the actual on the
    predicted through the origin. Where the slope is not significantly positive (one-sided
    t < z), the network shows no skill over the baseline for that target and its weight is 0, so
    it forecasts the baseline; else the weight is the slope clipped to [0, 1]. On a
    near-random-walk Close this usually gives 0: the model then claims no skill it does not
    have. Fitted on validation only, never on test.
    """
    import numpy as np

    weights = []
    for j in range(actual.shape[1]):
        p, y = predicted[:, j], actual[:, j]
        denom = float(p @ p)
        if denom <= 0 or len(p) < 3:
            weights.append(0.0)
            continue
        slope = float(p @ y) / denom
        resid = y - slope * p
        se = float(np.sqrt((resid @ resid) / (len(p) - 1) / denom))
        significant = slope > 0 and (se == 0 or slope / se >= z)
        weights.append(float(np.clip(slope, 0.0, 1.0)) if significant else 0.0)
    return tuple(round(w, 6) for w in weights)


def train_on_history(
    ticker: str, as_of: date, history: pd.DataFrame, config: ModelConfig
) -> TrainResult:
    """Train every configured kind on `history` (bars <= as_of) and score the best on test."""
    split = prepare(
        history, config.window, config.split, config.naive_lookback, config.vol_horizons
    )
    return fit_and_evaluate(ticker, as_of, history, split, config)


def validation_score(forecaster: PriceForecaster, split: SplitData) -> float:
    """Fit `forecaster`'s skill weights on the validation block (in place) and return its mean U2
    against persistence over High, Low and Close there, in prices: one number that ranks a
    network and a regression alike (their losses are in different units).

    The score is out of sample for the skill weights too: each half of the validation block is
    scored with weights fitted on the other half. Weights fitted and scored on the same bars
    would reward a spurious slope (a network's noise on Close, fitted on validation, scores
    better there than it forecasts)."""
    import numpy as np

    from ml.model.evaluation import persistence_forecast, theil_u2
    from ml.model.features import JUDGED_TARGETS, TARGETS

    val = split.val
    base = forecaster.anchor_log_ratios(val.high_ratio, val.low_ratio, len(val))
    offsets = forecaster.network_offsets(val.x, base)
    actual = val.y - base
    half = len(val) // 2
    folds = (slice(0, half), slice(half, len(val)))
    log_ratio = np.empty_like(offsets)
    for scored, fitted in (folds, folds[::-1]):
        weights = np.asarray(fit_skill_weights(offsets[fitted], actual[fitted]))
        log_ratio[scored] = base[scored] + offsets[scored] * weights
    forecaster.skill_weights = fit_skill_weights(offsets, actual)
    close = np.stack([val.last_close] * 3 + [val.last_adj_close], axis=1)
    predicted = close * np.exp(log_ratio)
    u2 = theil_u2(val.actual, predicted, persistence_forecast(val.last_close, val.last_adj_close))
    return float(sum(u2[TARGETS.index(t)] for t in JUDGED_TARGETS) / len(JUDGED_TARGETS))


def select_by_validation(
    forecasters: list[PriceForecaster], split: SplitData
) -> tuple[int, list[float]]:
    """The index of the forecaster with the lowest `validation_score` (on a tie or NaN, the one
    listed first) and every score. The test block plays no part."""
    scores = [validation_score(f, split) for f in forecasters]
    ranked = [s if s == s else float("inf") for s in scores]
    return ranked.index(min(ranked)), scores


def _forecaster(kind: str, model: Any, split: SplitData, config: ModelConfig) -> PriceForecaster:
    from ml.model.forecaster import PriceForecaster

    return PriceForecaster(
        kind=kind,
        window=config.window,
        model=model,
        x_scaler=split.x_scaler,
        y_scaler=split.y_scaler,
        horizons=tuple(config.vol_horizons),
        anchors=config.anchors(),
        naive_lookback=config.naive_lookback,
    )


def _statistical_candidates(
    kinds: tuple[str, ...], split: SplitData, config: ModelConfig
) -> list[tuple[Any, CandidateResult]]:
    """Fit each statistical kind on the train block; its `best_val_loss` is the MSE of its
    scaled log-ratio predictions on validation, comparable with the networks' loss."""
    import numpy as np

    from ml.model.statistical import fit_statistical

    out = []
    for kind in kinds:
        started = time.perf_counter()
        model = fit_statistical(kind, split.train, tuple(config.vol_horizons), config.seed)
        predicted = split.y_scaler.transform(model.predict(split.val.x))
        loss = float(np.mean((predicted - split.y_scaler.transform(split.val.y)) ** 2))
        result = CandidateResult(kind, loss, 0, 0, round(time.perf_counter() - started, 3))
        out.append((model, result))
    return out


def fit_and_evaluate(
    ticker: str, as_of: date, history: pd.DataFrame, split: SplitData, config: ModelConfig
) -> TrainResult:
    """Fit every kind on `split`'s train block (the networks with early stopping on validation),
    fit each one's skill weights on validation, keep the best validation score and score it on
    the test block against both baselines. `train_on_history` uses the 70/20/10 split; a
    rolling-origin backtest passes its own."""
    from dataclasses import replace

    from ml.model.statistical import fit_statistical, join

    networks = tuple(k for k in config.kinds if k in NETWORK_KINDS)
    others = tuple(k for k in config.kinds if k not in NETWORK_KINDS)
    n_features, n_targets = split.train.x.shape[-1], split.train.y.shape[-1]
    fitted: dict[str, tuple[Any, CandidateResult]] = {}
    if networks:
        configure_tensorflow()
        for weights, result in fit_candidates(networks, split, config):
            network = standalone_network(result.kind, config, n_features, n_targets, weights)
            fitted[result.kind] = (network, result)
    for model, result in _statistical_candidates(others, split, config):
        fitted[result.kind] = (model, result)
    kinds = [k for k in config.kinds if k in fitted]  # the config's order breaks ties
    forecasters = [_forecaster(k, fitted[k][0], split, config) for k in kinds]
    best, scores = select_by_validation(forecasters, split)
    candidates = [
        replace(fitted[k][1], val_score=round(s, 6)) for k, s in zip(kinds, scores, strict=True)
    ]
    tests = {f.kind: _test_u2(f, split) for f in forecasters}
    forecaster = forecasters[best]
    # Calibrated before the refit below: the validation block is out of sample only for the
    # model fitted without it.
    forecaster.calibrate(split)
    if not forecaster.is_network and forecaster.kind != NAIVE_KIND:
        forecaster.model = fit_statistical(
            forecaster.kind, join(split.train, split.val), tuple(config.vol_horizons), config.seed
        )
    result = _scored(ticker, as_of, history, split, config, forecaster, candidates)
    result.candidate_tests = tests
    return result


def _test_u2(forecaster: PriceForecaster, split: SplitData) -> dict[str, float]:
    """U2 of `forecaster` on the test block: High and Low against the range-aware naive, Close
    against persistence (the figures a report lists per kind)."""
    from ml.model.evaluation import range_naive_forecast, theil_u2

    test = split.test
    predicted = forecaster.predict_windows(
        test.x, test.last_close, test.last_adj_close, test.high_ratio, test.low_ratio
    )
    naive = range_naive_forecast(
        test.last_close, test.last_adj_close, test.high_ratio, test.low_ratio
    )
    u2 = theil_u2(test.actual, predicted, naive)  # the naive's Close is persistence
    return {t: round(float(u2[j]), 6) for j, t in enumerate(("High", "Low", "Close"))}


def _scored(
    ticker: str,
    as_of: date,
    history: pd.DataFrame,
    split: SplitData,
    config: ModelConfig,
    forecaster: PriceForecaster,
    candidates: list[CandidateResult],
) -> TrainResult:
    """`forecaster` scored on the test block against both baselines, as a TrainResult."""
    from ml.model.evaluation import evaluate, mase_scale
    from ml.model.probabilistic import score_block

    test = split.test
    predicted = forecaster.predict_windows(
        test.x, test.last_close, test.last_adj_close, test.high_ratio, test.low_ratio
    )
    scale = mase_scale(split.train.actual, split.train.last_close, split.train.last_adj_close)
    report = evaluate(
        test.actual,
        predicted,
        test.last_close,
        test.last_adj_close,
        test.high_ratio,
        test.low_ratio,
        scale,
    )
    return TrainResult(
        ticker=ticker,
        as_of=as_of,
        forecaster=forecaster,
        candidates=candidates,
        split=split,
        history=history,
        data_fingerprint=data_fingerprint(history),
        config_fingerprint=config.fingerprint(),
        test_predictions=predicted,
        evaluation=report,
        intervals=score_block(forecaster, split),
    )


def naive_result(
    ticker: str, as_of: date, history: pd.DataFrame, config: ModelConfig
) -> TrainResult:
    """The range-aware naive as a forecaster (`naive`: skill weights 0, so High and Low are the
    range-aware naive and Close and Adj Close persistence), scored on the pipeline's test block:
    the champion of a ticker none of whose candidates passed the gate. Its config fingerprint
    is that of `kinds=("naive",)`, so it never stands in for a trained candidate."""
    from dataclasses import replace

    from ml.model.statistical import NaiveLogRatios

    naive_config = replace(config, kinds=(NAIVE_KIND,))
    split = prepare(
        history, config.window, config.split, config.naive_lookback, config.vol_horizons
    )
    forecaster = _forecaster(NAIVE_KIND, NaiveLogRatios(), split, naive_config)
    forecaster.skill_weights = (0.0,) * int(split.train.y.shape[-1])
    forecaster.calibrate(split)
    candidate = CandidateResult(NAIVE_KIND, float("nan"), 0, 0, 0.0)
    return _scored(ticker, as_of, history, split, naive_config, forecaster, [candidate])


def candidate_summary(result: TrainResult) -> dict[str, Any]:
    return {
        c.kind: {
            "best_val_loss": c.best_val_loss,
            "val_score": c.val_score,
            "best_epoch": c.best_epoch,
            "epochs": c.epochs_run,
        }
        for c in result.candidates
    }
