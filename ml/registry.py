"""MLflow: one run per (ticker, logical date), one registered model per ticker, alias promotion.

Everything goes through the tracking server URI (`MLFLOW_TRACKING_URI`); no task opens the MLflow
database. The newest candidate holds the `challenger` alias; `champion` moves only through
`promote_if_better`, serialized per ticker, after the gate (README.md, "The gate").
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.config import PROJECT_ROOT, GateConfig, Settings
from ml.faults import checkpoint
from ml.features import TARGETS
from ml.universe import Instrument

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from ml.forecasting import PriceForecaster
    from ml.training import TrainResult

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
GATE_TARGETS = ("High", "Low", "Close")
# Explicit requirements: inferring them re-imports the model in a subprocess (~6 s per model).
PIP_REQUIREMENTS = [
    "mlflow==3.17.2",
    "tensorflow-cpu==2.21.0",
    "keras==3.15.1",
    "numpy==2.4.6",
    "pandas==3.1.1",
]


@lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of the code that trained a model (or CODE_VERSION, or 'unknown')."""
    if os.environ.get("CODE_VERSION"):
        return os.environ["CODE_VERSION"]
    try:
        out = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        dirty = subprocess.run(
            [
                "git",
                "--no-optional-locks",
                "-C",
                str(PROJECT_ROOT),
                "status",
                "--porcelain",
                "--untracked-files=no",
            ],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def get_client(settings: Settings) -> MlflowClient:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient

    uri = settings.mlflow_tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ticker_lock(client: MlflowClient, instrument: Instrument, settings: Settings):
    """The ticker's lock in the registry (ml.registry_lock): one process at a time trains,
    registers or promotes it, whatever its host or DATA_DIR."""
    from ml.registry_lock import registry_lock

    return registry_lock(
        client,
        instrument.model_name,
        ttl=settings.registry_lock_ttl,
        timeout=settings.registry_lock_timeout,
    )


def ensure_experiment(client: MlflowClient, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created concurrently by another task
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def get_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version behind `alias`, None if the model or alias does not exist. Any other error
    (server down, internal error) is raised: it must never look like "no champion"."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def find_versions(client: MlflowClient, name: str, **tags: str) -> list[ModelVersion]:
    """Versions of `name` whose tags match all of `tags`, newest first.

    The tags are filtered by the tracking server (one query, whatever the number of versions);
    names and values are our own slugs, hashes and dates, checked here before they are quoted.
    """
    import re

    terms = [f"name = '{name}'"]
    for key, value in tags.items():
        if not re.fullmatch(r"[A-Za-z0-9_.:=+-]*", f"{key}{value}"):
            raise ValueError(f"unsafe tag filter {key}={value!r}")
        terms.append(f"tags.{key} = '{value}'")
    versions, token = [], None
    while True:
        page = client.search_model_versions(" AND ".join(terms), max_results=1000, page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            break
    matching = [v for v in versions if all(v.tags.get(k) == val for k, val in tags.items())]
    return sorted(matching, key=lambda v: int(v.version), reverse=True)


@dataclass(frozen=True)
class TrainingOutcome:
    """What `train` reports: a new version, a reused one, or a skip because data did not change."""

    ticker: str
    logical_date: str
    status: str  # "trained" | "reused" | "skipped"
    version: str | None
    run_id: str | None
    reason: str
    metrics: dict[str, float]
    # Test-block U2 against the range-aware naive (High, Low), the strong baseline.
    metrics_range_naive: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def trained_version(
    client: MlflowClient, instrument: Instrument, data_fp: str, config_fp: str
) -> ModelVersion | None:
    """The newest version trained on exactly these bars (data fingerprint) and config, if any."""
    matches = find_versions(
        client, instrument.model_name, data_fingerprint=data_fp, config_fingerprint=config_fp
    )
    return matches[0] if matches else None


def outcome_of(instrument: Instrument, as_of: date, version: ModelVersion) -> TrainingOutcome:
    """What `train` reports for `as_of` when `version` already covers its bars: reused (trained
    for this very date) or skipped (trained for an earlier date; no new bars since)."""
    same_day = version.tags.get("logical_date") == as_of.isoformat()
    metrics = json.loads(version.tags.get("test_u2", "{}"))
    reason = (
        f"version {version.version} was already trained for {as_of} on the same data and config"
        if same_day
        else f"no new bars since version {version.version} ({version.tags.get('logical_date')})"
    )
    return TrainingOutcome(
        instrument.ticker,
        as_of.isoformat(),
        "reused" if same_day else "skipped",
        version.version,
        version.run_id,
        reason,
        metrics,
        json.loads(version.tags.get("test_u2_range_naive", "{}")),
    )


def reuse_outcome(
    client: MlflowClient, instrument: Instrument, as_of: date, data_fp: str, config_fp: str
) -> TrainingOutcome | None:
    """A version trained on exactly these bars and config, if one exists (no retrain needed).

    A version trained for this very date is the newest candidate: `challenger` is moved onto it
    if a try killed between registering it and moving the alias left the alias behind."""
    version = trained_version(client, instrument, data_fp, config_fp)
    if version is None:
        return None
    outcome = outcome_of(instrument, as_of, version)
    if outcome.status == "reused":
        set_challenger(client, instrument.model_name, str(version.version))
    return outcome


def _plot_test_block(result: TrainResult) -> Any:
    """Actual, model and persistence on the test block for High, Low and Close (a Figure).

    Fixed margins instead of `tight_layout` and a modest size: drawing it costs about a tenth of
    a second (tight_layout alone measured 0.3 s per ticker).
    """
    from matplotlib.figure import Figure

    test = result.split.test
    fig = Figure(figsize=(9, 7), dpi=80)
    fig.subplots_adjust(left=0.09, right=0.98, top=0.95, bottom=0.06, hspace=0.12)
    axes = fig.subplots(3, 1, sharex=True)
    for ax, target in zip(axes, GATE_TARGETS, strict=True):
        j = TARGETS.index(target)
        ax.plot(test.target_dates, test.actual[:, j], label="actual", color="black", lw=1)
        ax.plot(test.target_dates, result.test_predictions[:, j], label="model", lw=1)
        ax.plot(test.target_dates, test.last_close, label="persistence", lw=0.8, ls="--")
        ax.set_ylabel(target)
    axes[0].legend(loc="upper left")
    axes[0].set_title(f"{result.ticker}: test block, next-bar forecasts ({result.forecaster.kind})")
    return fig


def _input_example(result: TrainResult):
    from ml.sources import PRICE_COLUMNS

    # Enough bars for the volatility memory, so the example's last row is the real forecast.
    bars = result.history[PRICE_COLUMNS].iloc[-result.forecaster.context_bars :]
    return bars.reset_index(drop=True)


def fail_orphan_runs(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> list[str]:
    """Mark FAILED the runs an earlier try left RUNNING for the same ticker, date, bars and config
    (a task killed inside `start_run`: nothing else would ever end them). Returns their ids."""
    keys = ("ticker", "logical_date", "data_fingerprint", "config_fingerprint")
    conditions = [f"tags.{k} = '{tags[k]}'" for k in keys] + ["attributes.status = 'RUNNING'"]
    runs = client.search_runs([experiment_id], filter_string=" and ".join(conditions))
    for run in runs:
        log.warning("marking run %s FAILED: left RUNNING by an earlier try", run.info.run_id)
        client.set_terminated(run.info.run_id, status="FAILED")
    return [run.info.run_id for run in runs]


def _drop_duplicate_versions(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    """Keep the first version registered from `run_id`, delete any other.

    The MLflow client retries a request whose answer was lost, POSTs included: a server that
    restarted while creating a version can have created it twice. Returns the version kept."""
    versions = sorted(find_versions(client, name, run_id=run_id), key=lambda v: int(v.version))
    for extra in versions[1:]:
        log.warning(
            "%s: deleting version %s, a duplicate of %s", name, extra.version, versions[0].version
        )
        client.delete_model_version(name, extra.version)
    return versions[0] if versions else None


def set_challenger(client: MlflowClient, name: str, version: str) -> None:
    """Point `challenger` at `version` unless it already points at it or at a newer version (a
    retry that reuses a version registered by a try killed before it moved the alias)."""
    holder = get_alias(client, name, CHALLENGER)
    if holder is None or int(holder.version) < int(version):
        client.set_registered_model_alias(name, CHALLENGER, version)


def log_candidate(
    result: TrainResult,
    instrument: Instrument,
    settings: Settings,
    *,
    validation_report: Path | None = None,
) -> TrainingOutcome:
    """Log the run (params, losses, metrics, plot, model) and register it as the `challenger`.

    Cheaper than `mlflow.pyfunc.log_model` on its defaults, same artifacts: the model is logged
    before the metrics, so MLflow does not fetch every metric's history back to link the step-0
    metrics to the logged model (one request per metric key); those are logged with its
    model_id directly. The input example is saved but not re-served through a reloaded copy of
    the model (`validate_serving_input=False`): the output used for the signature is the
    forecaster's own prediction on that example.
    """
    import mlflow
    from mlflow.entities import Metric
    from mlflow.models import infer_signature

    from ml.pyfunc import PriceForecastModel, log_model

    client = get_client(settings)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    experiment_id = ensure_experiment(client, settings.experiment_name)
    as_of = result.as_of.isoformat()
    model_tags = {
        "ticker": instrument.ticker,
        "asset_class": instrument.asset_class,
        "logical_date": as_of,
        "data_fingerprint": result.data_fingerprint,
        "config_fingerprint": result.config_fingerprint,
        "code_version": code_version(),
        "price_source": settings.price_source,
        "model_kind": result.forecaster.kind,
    }
    metrics = result.evaluation.as_metrics()
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=f"{instrument.slug}-{as_of}", tags=model_tags
    ) as run:
        run_id = run.info.run_id
        cfg = asdict(settings.model)
        params = {
            k: (",".join(v) if isinstance(v, tuple) and k == "kinds" else v) for k, v in cfg.items()
        }
        params.update(
            chosen_kind=result.forecaster.kind,
            n_bars=len(result.history),
            history_start=str(result.history["Date"].iloc[0].date()),
            history_end=str(result.history["Date"].iloc[-1].date()),
            n_train=len(result.split.train),
            n_val=len(result.split.val),
            n_test=len(result.split.test),
        )
        mlflow.log_params(params)
        checkpoint("run-open")  # killed here, the run stays RUNNING until the next try
        example = _input_example(result)
        with tempfile.TemporaryDirectory() as tmp:
            artifacts = result.forecaster.save(Path(tmp) / "model")
            output = result.forecaster.predict_frame(example)
            info = log_model(
                name="model",
                python_model=PriceForecastModel(),
                artifacts=artifacts,
                signature=infer_signature(example, output),
                input_example=example,
                pip_requirements=PIP_REQUIREMENTS,
                code_paths=[str(PROJECT_ROOT / "ml")],
                validate_serving_input=False,
            )
            now = int(time.time() * 1000)
            step_zero = [
                Metric(f"{c.kind}_best_val_loss", c.best_val_loss, now, 0)
                for c in result.candidates
            ]
            step_zero += [
                Metric(k, float(v), now, 0)
                for k, v in metrics.items()
                if v == v  # drop NaN
            ]
            run_metrics = [
                Metric(f"{c.kind}_{key}", value, now, step)
                for c in result.candidates
                for key, series in (("loss", c.loss), ("val_loss", c.val_loss))
                for step, value in enumerate(series, start=1)
            ]
            run_metrics += step_zero
            # What Model.log links to a model it logs after the metrics: the step-0 metrics again,
            # with the model's id.
            run_metrics += [
                Metric(m.key, m.value, m.timestamp, m.step, model_id=info.model_id, run_id=run_id)
                for m in step_zero
            ]
            for i in range(0, len(run_metrics), 900):
                client.log_batch(run_id, metrics=run_metrics[i : i + 900])
            plot = Path(tmp) / "plots" / "test_predictions.png"
            plot.parent.mkdir()
            _plot_test_block(result).savefig(plot)
            mlflow.log_artifact(str(plot), artifact_path="plots")
        if validation_report is not None and validation_report.exists():
            mlflow.log_artifact(str(validation_report), artifact_path="validation")
        mlflow.log_dict(
            {"candidates": [asdict(c) for c in result.candidates], "test": metrics},
            "training_summary.json",
        )
    # The run is complete before its model is registered: a process killed after this point
    # leaves a FINISHED run; one killed inside the run leaves it RUNNING, and the next try marks
    # it FAILED here (so is a run that a retried create_run POST duplicated).
    fail_orphan_runs(client, experiment_id, model_tags)
    u2 = {t: round(float(v), 6) for t, v in result.evaluation.u2().items()}
    u2_naive = {t: round(float(result.evaluation.u2_range_naive[t]), 6) for t in ("High", "Low")}
    version = mlflow.register_model(
        info.model_uri,
        instrument.model_name,
        tags={
            **model_tags,
            "test_u2": json.dumps(u2, sort_keys=True),
            "test_u2_range_naive": json.dumps(u2_naive, sort_keys=True),
            "test_dm": dm_table(dict(result.evaluation.dm_vs_persistence)),
            "run_id": run_id,
        },
    )
    version = _drop_duplicate_versions(client, instrument.model_name, run_id) or version
    checkpoint("registered")
    client.set_registered_model_alias(instrument.model_name, CHALLENGER, version.version)
    checkpoint("challenger")
    return TrainingOutcome(
        instrument.ticker,
        as_of,
        "trained",
        version.version,
        run_id,
        f"registered version {version.version} ({result.forecaster.kind})",
        u2,
        u2_naive,
    )


# --- promotion -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromotionDecision:
    ticker: str
    version: str
    promoted: bool
    reason: str
    champion_version: str | None
    candidate_score: float | None
    champion_score: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate_failures(
    u2: dict[str, float], dm: dict[str, dict[str, float]], gate: GateConfig
) -> list[str]:
    """Reasons the candidate fails the gate against persistence (empty when it passes).

    `u2` is the test-block U2 per target, `dm` the Diebold-Mariano test per target against
    persistence ({"stat", "p_worse", "p_better"}, `ml.evaluation.diebold_mariano`). High and Low
    must have U2 below their caps and be significantly better (p_better < p_value); Close must
    not be significantly worse (p_worse < p_value fails; a Close equal to persistence has no
    test, NaN, and passes). Missing or NaN values fail closed.
    """
    import math

    nan = float("nan")
    failures = []
    for target, limit in (("High", gate.u2_high_max), ("Low", gate.u2_low_max)):
        value = u2.get(target, nan)
        if math.isnan(value) or not value < limit:
            failures.append(f"U2 {target} {value:.4f} not < {limit}")
        p_better = (dm.get(target) or {}).get("p_better", nan)
        if not p_better < gate.p_value:
            failures.append(
                f"{target} not significantly better than persistence "
                f"(Diebold-Mariano p {p_better:.3g} not < {gate.p_value})"
            )
    if math.isnan(u2.get("Close", nan)):
        failures.append("U2 Close missing")
    p_worse = (dm.get("Close") or {}).get("p_worse", nan)
    if p_worse < gate.p_value:
        failures.append(
            f"Close significantly worse than persistence "
            f"(Diebold-Mariano p {p_worse:.3g} < {gate.p_value}, U2 {u2.get('Close', nan):.4f})"
        )
    return failures


def dm_table(dm: dict[str, dict[str, float]]) -> str:
    """The Diebold-Mariano statistics as a tag value (JSON, NaN as null)."""
    import math

    return json.dumps(
        {
            t: {k: (round(v, 6) if math.isfinite(v) else None) for k, v in stats.items()}
            for t, stats in dm.items()
        },
        sort_keys=True,
    )


def read_dm(tag: str | None) -> dict[str, dict[str, float]]:
    return {
        t: {k: (float("nan") if v is None else float(v)) for k, v in stats.items()}
        for t, stats in json.loads(tag or "{}").items()
    }


def score(u2: dict[str, float]) -> float:
    """One number to compare two models on the same block: the mean U2 over High, Low, Close."""
    return sum(u2[t] for t in GATE_TARGETS) / len(GATE_TARGETS)


def champion_as_of(client: MlflowClient, name: str, as_of: date) -> ModelVersion | None:
    """The champion a run for `as_of` must use: point in time, whatever order runs happen in.

    The `champion` alias when its version was trained for a date <= as_of (a live run, or an
    alias a user moved back by hand); otherwise, for a backfill or re-run of an earlier date, the
    newest version promoted for a date <= as_of. A model trained on later bars is never used.
    """
    day = as_of.isoformat()
    current = get_alias(client, name, CHAMPION)
    if current is not None and current.tags.get("logical_date", "") <= day:
        return current
    promoted = [
        v
        for v in find_versions(client, name, gate_status="promoted")
        if v.tags.get("logical_date", "") <= day
    ]
    return max(
        promoted, key=lambda v: (v.tags.get("logical_date", ""), int(v.version)), default=None
    )


def load_forecaster(
    instrument: Instrument,
    settings: Settings,
    alias: str = CHAMPION,
    version: str | None = None,
    as_of: date | None = None,
) -> tuple[PriceForecaster, str] | None:
    """Load a version through the registry: `version`, else the champion as of `as_of`, else
    `models:/<name>@<alias>`; None if there is none.

    Only the network and its preprocessing are fetched (`models:/<name>/<version>/artifacts/...`),
    the same files the pyfunc wrapper loads; `mlflow.pyfunc.load_model` would also download the
    code snapshot and check the installed packages, about 0.4 s more per model.
    """
    import tempfile

    import mlflow

    from ml.forecasting import KERAS_FILE, PREPROCESSING_FILE, PriceForecaster
    from ml.models import configure_tensorflow

    client = get_client(settings)
    if version is None:
        if as_of is not None and alias == CHAMPION:
            mv = champion_as_of(client, instrument.model_name, as_of)
        else:
            mv = get_alias(client, instrument.model_name, alias)
        if mv is None:
            return None
        version = mv.version
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    configure_tensorflow()
    with tempfile.TemporaryDirectory(prefix="champion-") as tmp:
        keras_path, prep_path = (
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{instrument.model_name}/{version}/artifacts/{name}",
                dst_path=tmp,
                tracking_uri=settings.mlflow_tracking_uri,
            )
            for name in (KERAS_FILE, PREPROCESSING_FILE)
        )
        return PriceForecaster.load(keras_path, prep_path), str(version)


def block_predictions(forecaster: PriceForecaster, history: Any, test: Any) -> Any:
    """(n, 4) predictions of `forecaster` for the test windows `test` of `history`."""
    import numpy as np

    frame = forecaster.predict_frame(history)
    by_end = dict(zip(frame["Date"].to_numpy(), frame[list(TARGETS)].to_numpy(), strict=True))
    dates = history["Date"].to_numpy()
    idx = np.searchsorted(dates, test.target_dates) - 1
    return np.stack([by_end[dates[i]] for i in idx])


def rescore_u2(forecaster: PriceForecaster, history: Any, test: Any) -> dict[str, float]:
    """U2 against persistence of `forecaster` on the test windows `test` of `history`."""
    from ml.evaluation import persistence_forecast, theil_u2

    predicted = block_predictions(forecaster, history, test)
    reference = persistence_forecast(test.last_close, test.last_adj_close)
    values = theil_u2(test.actual, predicted, reference)
    return {t: float(v) for t, v in zip(TARGETS, values, strict=True)}


def versus_champion(
    candidate: PriceForecaster, champion: PriceForecaster, history: Any, test: Any
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The champion's U2 against persistence on the candidate's test block, and the
    Diebold-Mariano test of the candidate against the champion per High/Low/Close."""
    from ml.evaluation import diebold_mariano, persistence_forecast, theil_u2

    ours = block_predictions(candidate, history, test)
    theirs = block_predictions(champion, history, test)
    reference = persistence_forecast(test.last_close, test.last_adj_close)
    u2 = {
        t: float(v) for t, v in zip(TARGETS, theil_u2(test.actual, theirs, reference), strict=True)
    }
    dm = {
        t: diebold_mariano(ours[:, j] - test.actual[:, j], theirs[:, j] - test.actual[:, j])
        for j, t in enumerate(TARGETS)
        if t in GATE_TARGETS
    }
    return u2, dm


def promote_if_better(
    instrument: Instrument, as_of: date, version: str, settings: Settings
) -> PromotionDecision:
    """Move `champion` to `version` if it passes the gate and beats the champion on its test block."""
    from ml.store import PriceStore
    from ml.windows import prepare

    client = get_client(settings)
    name = instrument.model_name
    store = PriceStore(settings.data_dir)
    with ticker_lock(client, instrument, settings):
        candidate = client.get_model_version(name, version)
        if candidate.tags.get("gate_status") in ("promoted", "rejected"):
            current = champion_as_of(client, name, as_of)
            return PromotionDecision(
                instrument.ticker,
                version,
                candidate.tags["gate_status"] == "promoted",
                f"decided earlier: {candidate.tags.get('gate_reason', '')}",
                current.version if current else None,
                None,
                None,
            )
        u2 = json.loads(candidate.tags.get("test_u2", "{}"))
        cand_score = score(u2) if all(t in u2 for t in GATE_TARGETS) else None
        failures = gate_failures(u2, read_dm(candidate.tags.get("test_dm")), settings.gate)
        # Compare with the champion of this date, not a model trained on later bars (backfills).
        champion = champion_as_of(client, name, as_of)
        alias_holder = get_alias(client, name, CHAMPION)
        champ_score: float | None = None
        if failures:
            promoted, reason = False, "fails the gate against persistence: " + "; ".join(failures)
        elif champion is None:
            promoted, reason = True, "first champion: beats persistence"
        elif champion.version == candidate.version:
            promoted, reason = True, "already champion"
        else:
            history = store.load(instrument, until=as_of)
            split = prepare(
                history, settings.model.window, settings.model.split, settings.model.naive_lookback
            )
            loaded = load_forecaster(instrument, settings, version=champion.version)
            mine = load_forecaster(instrument, settings, version=candidate.version)
            assert loaded is not None and mine is not None
            champ_u2, dm_champion = versus_champion(mine[0], loaded[0], history, split.test)
            champ_score = score(champ_u2)
            client.set_model_version_tag(
                name, version, "gate_dm_vs_champion", dm_table(dm_champion)
            )
            worse = [
                f"{t} (Diebold-Mariano p {dm_champion[t]['p_worse']:.3g})"
                for t in GATE_TARGETS
                if dm_champion[t]["p_worse"] < settings.gate.p_value
            ]
            assert cand_score is not None
            if worse:
                promoted = False
                reason = (
                    f"significantly worse than champion v{champion.version} on the same test "
                    f"block: {', '.join(worse)}"
                )
            elif cand_score < champ_score - settings.gate.min_improvement:
                promoted = True
                reason = (
                    f"beats persistence and champion v{champion.version} "
                    f"(mean U2 {cand_score:.4f} < {champ_score:.4f})"
                )
            else:
                promoted = False
                reason = (
                    f"does not beat champion v{champion.version} on the same test block "
                    f"(mean U2 {cand_score:.4f} >= {champ_score:.4f})"
                )
        naive = json.loads(candidate.tags.get("test_u2_range_naive", "{}"))
        if naive:  # shown beside the gate; High/Low already fall back to it where it is better
            reason += "; U2 vs range-aware naive " + ", ".join(
                f"{t} {naive[t]:.4f}" for t in ("High", "Low") if t in naive
            )
        # The alias only moves forward in time: a backfilled date's winner is recorded as promoted
        # (it is the champion as of its date) but does not displace a champion of a later date.
        moves_alias = (
            alias_holder is None or alias_holder.tags.get("logical_date", "") <= as_of.isoformat()
        )
        if promoted and moves_alias:
            client.set_registered_model_alias(name, CHAMPION, version)
        client.set_model_version_tag(
            name, version, "gate_status", "promoted" if promoted else "rejected"
        )
        client.set_model_version_tag(name, version, "gate_reason", reason)
        client.set_model_version_tag(
            name, version, "validation_status", "passed" if promoted else "failed"
        )
        client.set_model_version_tag(name, version, "validation_reason", reason)
        return PromotionDecision(
            instrument.ticker,
            version,
            promoted,
            reason,
            version if promoted else (champion.version if champion else None),
            cand_score,
            champ_score,
        )
