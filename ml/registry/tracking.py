"""A candidate's MLflow run (params, losses, metrics, test-block plot, pyfunc model) and its
registration as the ticker's `challenger`."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.config import Settings
from ml.faults import checkpoint
from ml.model.features import JUDGED_TARGETS, TARGETS
from ml.registry.client import CHALLENGER, code_version, ensure_experiment, get_client
from ml.registry.gate import dm_table
from ml.registry.versions import TrainingOutcome, drop_duplicate_versions
from ml.universe import Instrument

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models.model import ModelInfo

    from ml.model.training import TrainResult

log = logging.getLogger(__name__)

# Explicit requirements: inferring them re-imports the model in a subprocess (~6 s per model).
PIP_REQUIREMENTS = [
    "mlflow==3.17.2",
    "tensorflow-cpu==2.21.0",
    "keras==3.15.1",
    "numpy==2.4.6",
    "pandas==3.1.1",
]
# What a kind needs beyond those to predict (its fitting libraries are not needed to serve it).
KIND_REQUIREMENTS = {"gbm": ["lightgbm==4.7.0"]}


def _plot_test_block(result: TrainResult) -> str:
    """Actual, model and persistence on the test block for High, Low and Close: an SVG document
    (`ml.charts`), one chart per target. Written as markup, a few milliseconds; matplotlib's
    ticks and text layout made the same chart a noticeable share of every train task."""
    from ml.charts import line_chart, stacked

    test = result.split.test
    dates = [str(d)[:10] for d in test.target_dates]
    charts = [
        line_chart(
            dates,
            {
                "actual": test.actual[:, j].tolist(),
                "model": result.test_predictions[:, j].tolist(),
                "persistence": test.last_close.tolist(),
            },
            target,
            ref=None,
            colours=("#111111", "#2563eb", "#f97316"),
        )
        for target in JUDGED_TARGETS
        for j in [TARGETS.index(target)]
    ]
    title = f"{result.ticker}: test block, next-bar forecasts ({result.forecaster.kind})"
    return stacked(charts, title)


def _input_example(result: TrainResult):
    from ml.data.schema import PRICE_COLUMNS

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


def log_candidate(
    result: TrainResult,
    instrument: Instrument,
    settings: Settings,
    *,
    validation_report: Path | None = None,
    alias: str | None = CHALLENGER,
) -> TrainingOutcome:
    """Log the run (params, losses, metrics, plot, model) and register it as the `challenger`
    (`alias`; None moves no alias: the naive fallback champion, `ml.registry.promotion`).

    The run is complete before its model is registered: a process killed after that leaves a
    FINISHED run; one killed inside the run leaves it RUNNING, and the next try marks it FAILED
    here (so is a run that a retried create_run POST duplicated).
    """
    import mlflow

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
    run_id, model = _log_run(
        client, experiment_id, result, instrument, settings, model_tags, validation_report
    )
    fail_orphan_runs(client, experiment_id, model_tags)
    u2 = {t: round(float(v), 6) for t, v in result.evaluation.u2().items()}
    u2_naive = {t: round(float(result.evaluation.u2_range_naive[t]), 6) for t in ("High", "Low")}
    version = _create_version(
        client,
        instrument.model_name,
        model,
        tags={
            **model_tags,
            "test_u2": json.dumps(u2, sort_keys=True),
            "test_u2_range_naive": json.dumps(u2_naive, sort_keys=True),
            "test_dm": dm_table(dict(result.evaluation.dm_vs_persistence)),
            "test_dm_range_naive": dm_table(dict(result.evaluation.dm_vs_range_naive)),
            **({"test_intervals": result.intervals.to_tag()} if result.intervals else {}),
            "run_id": run_id,
        },
    )
    version = drop_duplicate_versions(client, instrument.model_name, run_id) or version
    checkpoint("registered")
    if alias is not None:
        client.set_registered_model_alias(instrument.model_name, alias, version.version)
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
        json.loads(result.intervals.to_tag()) if result.intervals else {},
    )


def _create_version(
    client: MlflowClient, name: str, model: ModelInfo, tags: dict[str, str]
) -> ModelVersion:
    """A new version of the registered model `name` from the logged `model`:
    what `mlflow.register_model` does, without first asking the server to create the
    registered model, which exists after a ticker's first version (the server answers that
    request with a failed insert, one of the dearest requests of the registration). The first
    version creates it."""
    from mlflow.exceptions import MlflowException

    def create() -> ModelVersion:
        return client.create_model_version(
            name, model.model_uri, tags=tags, model_id=model.model_id
        )

    try:
        return create()
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # created meanwhile by another process
            raise
    return create()


def _log_run(
    client: MlflowClient,
    experiment_id: str,
    result: TrainResult,
    instrument: Instrument,
    settings: Settings,
    tags: dict[str, str],
    validation_report: Path | None,
) -> tuple[str, ModelInfo]:
    """The candidate's run: params, the pyfunc model, metrics, the test-block plot, the
    validation report and a training summary. Returns (run id, the logged model).

    Cheaper than `mlflow.pyfunc.log_model` on its defaults, same artifacts: the model is logged
    before the metrics, so MLflow does not fetch every metric's history back to link the step-0
    metrics to the logged model (one request per metric key); those are logged with its
    model_id directly. The input example is saved but not re-served through a reloaded copy of
    the model (`validate_serving_input=False`): the output used for the signature is the
    forecaster's own prediction on that example.
    """
    import mlflow
    from mlflow.models import infer_signature

    from ml.registry.pyfunc import MODEL_CODE, log_model, serving_code

    metrics = result.evaluation.as_metrics()
    if result.intervals is not None:
        metrics.update(result.intervals.as_metrics())
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=f"{instrument.slug}-{tags['logical_date']}", tags=tags
    ) as run:
        run_id = run.info.run_id
        mlflow.log_params(_params(result, settings))
        checkpoint("run-open")  # killed here, the run stays RUNNING until the next try
        example = _input_example(result)
        with tempfile.TemporaryDirectory() as tmp:
            artifacts = result.forecaster.save(Path(tmp) / "model")
            output = result.forecaster.predict_frame(example)
            info = log_model(
                name="model",
                python_model=str(MODEL_CODE),  # models from code: nothing pickled
                artifacts=artifacts,
                signature=infer_signature(example, output),
                input_example=example,
                pip_requirements=PIP_REQUIREMENTS
                + KIND_REQUIREMENTS.get(result.forecaster.kind, []),
                code_paths=[str(serving_code(Path(tmp) / "code"))],
                validate_serving_input=False,
            )
            # The metrics go to the server from a second thread while this one draws the plot
            # and uploads the files (the server stores a few hundred metric rows meanwhile);
            # the run is not ended before they are all stored (`result` raises if one failed).
            # Not MLflow's async logging: ending a run waits up to a second for its thread.
            run_metrics = _run_metrics(result, metrics, info.model_id, run_id)
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics") as sender:
                pending = [
                    sender.submit(client.log_batch, run_id, metrics=run_metrics[i : i + 900])
                    for i in range(0, len(run_metrics), 900)
                ]
                plot = Path(tmp) / "plots" / "test_predictions.svg"
                plot.parent.mkdir()
                plot.write_text(_plot_test_block(result), encoding="utf-8")
                mlflow.log_artifact(str(plot), artifact_path="plots")
                if validation_report is not None and validation_report.exists():
                    mlflow.log_artifact(str(validation_report), artifact_path="validation")
                mlflow.log_dict(
                    {"candidates": [asdict(c) for c in result.candidates], "test": metrics},
                    "training_summary.json",
                )
                for sent in pending:
                    sent.result()
    uri = settings.mlflow_tracking_uri.rstrip("/")
    if uri.startswith(("http://", "https://")):
        log.info("run %s: %s/#/experiments/%s/runs/%s", run_id, uri, experiment_id, run_id)
    return run_id, info


def _params(result: TrainResult, settings: Settings) -> dict[str, Any]:
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
    return params


def _run_metrics(
    result: TrainResult, metrics: dict[str, float], model_id: str, run_id: str
) -> list[Any]:
    """Per-epoch losses of each candidate, the step-0 metrics, and the step-0 metrics again
    linked to the logged model (what Model.log would link to a model logged after them)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    step_zero = [
        Metric(f"{c.kind}_{key}", value, now, 0)
        for c in result.candidates
        for key, value in (("best_val_loss", c.best_val_loss), ("val_score", c.val_score))
        if value == value  # no NaN (the naive has neither)
    ]
    step_zero += [Metric(k, float(v), now, 0) for k, v in metrics.items() if v == v]  # no NaN
    run_metrics = [
        Metric(f"{c.kind}_{key}", value, now, step)
        for c in result.candidates
        for key, series in (("loss", c.loss), ("val_loss", c.val_loss))
        for step, value in enumerate(series, start=1)
    ]
    run_metrics += step_zero
    run_metrics += [
        Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, run_id=run_id)
        for m in step_zero
    ]
    return run_metrics
