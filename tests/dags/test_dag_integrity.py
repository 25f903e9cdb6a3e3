"""The DAG file parses cleanly and fast, and `price_forecast` is wired as the README's "What a daily run does" says.

Airflow is loaded in a subprocess (`dag_probe.py`), which describes the DagBag as JSON; the params
are checked with jsonschema and a FormatChecker exactly as Airflow's `Param.resolve` validates them
at trigger time.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from jsonschema import FormatChecker, ValidationError, validate

from ml.pipeline import STAGES
from tests.dags.conftest import DAGS_FOLDER, HERE, airflow_env, tail

DAG_FILE = DAGS_FOLDER / "price_forecast.py"
# One pass: the data phase, promotion and forecasting are one task each; only train is mapped.
CHAIN = tuple(s for s in STAGES if s != "report")
EXPECTED_TASKS = {*CHAIN, "report"}
NO_RETRY_BY_DESIGN = {"resolve_tickers", "report"}
HEAVY = ("tensorflow", "keras", "mlflow", "great_expectations", "pandas")
PARSE_BUDGET_SECONDS = 2.0


def _probe(tmp_path: Path, *args: str, **env: str) -> dict[str, Any]:
    home = tmp_path / "airflow"
    home.mkdir()
    out = tmp_path / "probe.json"
    log = tmp_path / "probe.log"
    with open(log, "wb") as fh:
        proc = subprocess.run(
            [sys.executable, str(HERE / "dag_probe.py"), *args, str(out)],
            env={**airflow_env(home), **env},
            stdout=fh,
            stderr=subprocess.STDOUT,
            timeout=300,
            check=False,
        )
    assert proc.returncode == 0 and out.exists(), f"dag_probe failed:\n{tail(log)}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _probe(tmp_path_factory.mktemp("dag_probe"), str(DAGS_FOLDER))


@pytest.fixture(scope="module")
def dag(probe: dict[str, Any]) -> dict[str, Any]:
    assert "dag" in probe, f"price_forecast not in the DagBag: {probe.get('dag_ids')}"
    return probe["dag"]


@pytest.fixture(scope="module")
def tasks(dag: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dag["tasks"]


def _accepts(schema: dict[str, Any], value: Any) -> bool:
    """What Airflow's Param.resolve does with a value given at trigger time."""
    try:
        validate(value, schema, format_checker=FormatChecker())
    except ValidationError:
        return False
    return True


# --- the DagBag and the parse ---------------------------------------------------------------------


def test_dagbag_has_no_import_errors(probe: dict[str, Any]) -> None:
    assert probe["import_errors"] == {}
    assert probe["dag_ids"] == ["price_forecast"]


def test_dag_file_parses_fast_without_heavy_imports(tmp_path: Path) -> None:
    result = _probe(tmp_path, "--parse-time", str(DAG_FILE))
    print(
        f"parse of {DAG_FILE.name}: {result['dag_file_seconds']:.3f} s "
        f"(airflow.sdk import {result['airflow_import_seconds']:.2f} s); "
        f"new modules: {result['new_top_level_modules']}"
    )
    assert result["dag_file_seconds"] < PARSE_BUDGET_SECONDS, result
    loaded = [m for m in HEAVY if m in result["heavy_loaded"]]
    assert not loaded, f"parsing the DAG file imported {loaded}: move those imports into tasks"


# --- DAG-level settings -----------------------------------------------------------------------------


def test_dag_settings(dag: dict[str, Any]) -> None:
    assert dag["dag_id"] == "price_forecast"
    assert dag["timetable"] == "CronTriggerTimetable", dag["schedule"]
    assert dag["timetable_expression"] == "30 22 * * *"
    assert dag["timetable_timezone"] == "UTC"
    assert dag["catchup"] is False
    assert dag["max_active_runs"] == 1
    assert dag["tags"], "tags must not be empty"
    assert dag["doc_md"] and dag["doc_md"].strip(), "doc_md must not be empty"
    assert Path(dag["fileloc"]).resolve() == DAG_FILE.resolve()


def test_tasks_are_exactly_the_expected_ones(tasks: dict[str, dict[str, Any]]) -> None:
    assert set(tasks) == EXPECTED_TASKS


def test_task_dependencies(tasks: dict[str, dict[str, Any]]) -> None:
    for upstream, downstream in itertools.pairwise(CHAIN):
        assert upstream in tasks[downstream]["upstream"], (upstream, downstream)
    assert set(tasks["report"]["upstream"]) == set(CHAIN)
    assert tasks["report"]["downstream"] == []


@pytest.mark.parametrize("task_id", sorted(EXPECTED_TASKS))
def test_retries_and_timeout(tasks: dict[str, dict[str, Any]], task_id: str) -> None:
    task = tasks[task_id]
    if task_id in NO_RETRY_BY_DESIGN:
        assert task["retries"] == 0, f"{task_id}: retrying cannot fix bad params or a failed ticker"
    else:
        assert task["retries"] >= 1, f"{task_id} must retry transient failures"
    assert task["execution_timeout"], f"{task_id} has no execution_timeout"
    assert 0 < task["execution_timeout"] <= 3 * 3600


def test_steps_after_training_run_whatever_happened_to_it(tasks: dict[str, dict[str, Any]]) -> None:
    """One ticker's failed training must not stop the others' promotion, forecast or report."""
    for task_id in ("promote", "forecast", "report"):
        assert tasks[task_id]["trigger_rule"] == "all_done", task_id


def test_only_train_is_mapped_and_named_by_ticker(tasks: dict[str, dict[str, Any]]) -> None:
    assert tasks["train"]["map_index_template"] == "{{ ticker_name }}"
    assert [t for t, task in tasks.items() if task["mapped"]] == ["train"]


def test_each_task_pushes_its_result_as_one_xcom(tasks: dict[str, dict[str, Any]]) -> None:
    """No task splits a dict result into one XCom per key (Airflow infers that from `-> dict`):
    the steps read only return values, and a train instance's split cost ten API calls."""
    assert {
        t: task["multiple_outputs"] for t, task in tasks.items() if task["multiple_outputs"]
    } == {}
    assert all(task["multiple_outputs"] is False for task in tasks.values()), tasks


def test_pools(tasks: dict[str, dict[str, Any]]) -> None:
    assert tasks["ingest"]["pool"] == "price_source"
    assert tasks["train"]["pool"] == "training"


def test_forecast_updates_an_asset(tasks: dict[str, dict[str, Any]]) -> None:
    outlets = tasks["forecast"]["outlets"]
    assert [o["type"] for o in outlets] == ["Asset"], outlets
    assert outlets[0]["name"] == "price_forecasts"
    assert outlets[0]["uri"].endswith("/forecasts/forecasts.csv")


# --- params ---------------------------------------------------------------------------------------


def test_params_exist_with_schemas(dag: dict[str, Any]) -> None:
    params = dag["params"]
    assert set(params) >= {"tickers", "model_kinds", "max_epochs", "force_retrain", "as_of"}
    for name, param in params.items():
        assert param["schema"].get("type"), f"param {name} has no schema type"
        assert _accepts(param["schema"], param["default"]), f"default of {name} is invalid"


def test_model_params_default_to_the_validated_settings_of_ml_config(
    dag: dict[str, Any], tmp_path: Path
) -> None:
    """One source of the model settings: the params' defaults are `ml.config.model_settings()`
    of the environment, and an invalid value is the DAG's import error, naming the setting."""
    from ml.config import ModelConfig

    assert dag["params"]["model_kinds"]["default"] == list(ModelConfig().kinds)
    assert dag["params"]["max_epochs"]["default"] == ModelConfig().max_epochs
    for name in ("chosen", "bad"):
        (tmp_path / name).mkdir()
    chosen = _probe(
        tmp_path / "chosen", str(DAGS_FOLDER), MODEL_KINDS="GBM, har", MODEL_MAX_EPOCHS="7"
    )
    assert chosen["dag"]["params"]["model_kinds"]["default"] == ["gbm", "har"]
    assert chosen["dag"]["params"]["max_epochs"]["default"] == 7
    bad = _probe(tmp_path / "bad", str(DAGS_FOLDER), MODEL_KINDS="xgboost")
    [error] = bad["import_errors"].values()
    assert "MODEL_KINDS='xgboost': choose from" in error


@pytest.mark.parametrize(
    "tickers", [[], ["AMD"], ["EURUSD=X", "SOL-USD", "ZB=F", "^GSPC", "BRK-B", "BF.B"]]
)
def test_tickers_param_accepts_symbols(dag: dict[str, Any], tickers: list[str]) -> None:
    assert _accepts(dag["params"]["tickers"]["schema"], tickers)


@pytest.mark.parametrize(
    "tickers",
    [
        ["../x"],
        ["AMD", "../x"],
        ["amd"],
        ["A MD"],
        ["AMD;rm -rf /"],
        ["AMD/../../etc"],
        [""],
        ["X" * 30],
        "AMD",
        [1],
    ],
)
def test_tickers_param_rejects_malformed(dag: dict[str, Any], tickers: Any) -> None:
    assert not _accepts(dag["params"]["tickers"]["schema"], tickers)


def test_tickers_param_rejects_trailing_newline(dag: dict[str, Any]) -> None:
    assert not _accepts(dag["params"]["tickers"]["schema"], ["AMD\n"])


def test_other_params_validate(dag: dict[str, Any]) -> None:
    params = dag["params"]
    kinds = params["model_kinds"]["schema"]
    assert _accepts(kinds, ["gru"]) and _accepts(kinds, ["lstm", "gru"])
    assert not _accepts(kinds, []) and not _accepts(kinds, ["xgboost"])
    epochs = params["max_epochs"]["schema"]
    assert _accepts(epochs, 1) and _accepts(epochs, 500)
    assert not any(_accepts(epochs, v) for v in (0, -1, 501, "10", 2.5))
    force = params["force_retrain"]["schema"]
    assert _accepts(force, True) and not _accepts(force, "yes")
    as_of = params["as_of"]["schema"]
    assert _accepts(as_of, None) and _accepts(as_of, "2024-06-28")
    assert not any(_accepts(as_of, v) for v in ("2024-13-01", "yesterday", "28/06/2024", 20240628))
