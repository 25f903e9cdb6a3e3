"""Fixtures for the DAG tests: a migrated Airflow metadata DB, private MLflow servers, and a runner
for `dag.test()` in a subprocess.

Nothing here imports Airflow. Airflow reads its configuration (AIRFLOW_HOME, the DAG folder, the
executor) once, at import time, and configures logging globally; every test that needs Airflow
therefore runs it in a subprocess with its own environment: `dag_runner.py` for `dag.test()`,
`dag_probe.py` for the DagBag, the real `airflow` CLI for the scheduler. This also keeps TensorFlow's
memory out of the pytest process.

The DAG tests use their own MLflow server (the same `start_mlflow_server` as the shared
`mlflow_server` fixture) rather than the shared one: registered model names are global to a server
(`price-forecast-<slug>`), so versions registered by other test modules would make the exact
counts asserted here ("31 models", "no model for the bad ticker", "no new version") meaningless.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ml.config import AIRFLOW_MAX_MAP_LENGTH, without_pipeline_env
from ml.servers import MlflowServer, sqlite_mlflow_server

REPO = Path(__file__).resolve().parents[2]
DAGS_FOLDER = REPO / "dags"
HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
AIRFLOW = str(BIN / "airflow")


def clean_env(**overrides: str) -> dict[str, str]:
    """os.environ without Airflow/pipeline settings, plus quiet defaults and `overrides`."""
    env = without_pipeline_env(os.environ)
    env.update(
        TF_CPP_MIN_LOG_LEVEL="2",
        GIT_PYTHON_REFRESH="quiet",
        PYTHONUNBUFFERED="1",
        CODE_VERSION="test",  # no `git` subprocess per registered model
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
    )
    env.update(overrides)
    return env


def airflow_env(home: Path, **overrides: str) -> dict[str, str]:
    """The environment of an Airflow process on `home` (SQLite metadata DB in it)."""
    settings = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "false",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        # Wait up to 60 s for SQLite's single writer instead of failing with "database is locked".
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS": "airflow_sqlite.CONNECT_ARGS",
        # As every launcher sets it (ml/config.py says why).
        "AIRFLOW__CORE__MAX_MAP_LENGTH": str(AIRFLOW_MAX_MAP_LENGTH),
    }
    return clean_env(**{**settings, **overrides})


def tail(path: Path, chars: int = 6000) -> str:
    if not path.exists():
        return f"(no {path})"
    text = path.read_text(errors="replace")
    return text[-chars:]


@pytest.fixture(scope="session")
def airflow_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`airflow db migrate` once per session; tests copy the resulting SQLite file."""
    return migrate_airflow_db(tmp_path_factory.mktemp("airflow_template"))


def migrate_airflow_db(home: Path) -> Path:
    """`airflow db migrate` on an empty AIRFLOW_HOME; returns its SQLite metadata DB."""
    log = home / "migrate.log"
    with open(log, "wb") as fh:
        proc = subprocess.run(
            [AIRFLOW, "db", "migrate"],
            env=airflow_env(home),
            stdout=fh,
            stderr=subprocess.STDOUT,
            timeout=300,
            check=False,
        )
    assert proc.returncode == 0, f"airflow db migrate failed:\n{tail(log)}"
    return home / "airflow.db"


def new_airflow_home(template_db: Path, home: Path) -> Path:
    """A fresh AIRFLOW_HOME whose metadata DB is a copy of the migrated template."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy2(template_db, home / "airflow.db")
    return home


@pytest.fixture(scope="module")
def private_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real `mlflow server` (SQLite backend, served artifacts) for one test module."""
    with sqlite_mlflow_server(tmp_path_factory.mktemp("dag_mlflow")) as server:
        yield server


@dataclass
class DagTestResult:
    """What `dag_runner.py` recorded, plus where its output went."""

    runs: list[dict[str, Any]]
    import_errors: dict[str, str]
    log_path: Path
    data_dir: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_of(self, index: int) -> str:
        """The output of run `index` alone (the runner prints a marker before each run)."""
        parts = self.log.split("=== dag_runner: dag.test(")
        return parts[index + 1] if index + 1 < len(parts) else ""

    def describe(self) -> str:
        """Run states and the end of the log, for assertion messages."""
        states = [
            {k: r.get(k) for k in ("logical_date", "state", "exception", "seconds")}
            for r in self.runs
        ]
        return f"runs: {json.dumps(states, default=str)[:3000]}\n--- log tail ---\n{tail(self.log_path)}"


NEVER_RAN = ("upstream_failed", "skipped", "removed")


def task_states(
    run: dict[str, Any], tickers: list[str] | None = None
) -> dict[tuple[str, str | None], str]:
    """{(task_id, ticker or None): state} of one run.

    A mapped instance is named by its rendered_map_index once it ran; one that never ran (e.g.
    upstream_failed) has none or just its index ("1"), so it is named from `tickers` (the order
    resolve_tickers returned).
    """
    states: dict[tuple[str, str | None], str] = {}
    for t in run["task_instances"]:
        name = t["rendered_map_index"]
        if t["state"] in NEVER_RAN and tickers is not None and t["map_index"] >= 0:
            name = tickers[t["map_index"]]
        states[(t["task_id"], name)] = t["state"]
    return states


@pytest.fixture(scope="session")
def run_dag_test(airflow_db_template: Path) -> Callable[..., DagTestResult]:
    """Run `dag.test()` for each of `runs` in one subprocess; returns what happened."""

    def run(
        workdir: Path,
        runs: list[dict[str, Any]],
        env: dict[str, str],
        *,
        timeout: float = 1500,
    ) -> DagTestResult:
        workdir.mkdir(parents=True, exist_ok=True)
        home = new_airflow_home(airflow_db_template, workdir / "airflow")
        spec = workdir / "spec.json"
        out = workdir / "result.json"
        log = workdir / "dag_test.log"
        spec.write_text(json.dumps({"dags_folder": str(DAGS_FOLDER), "runs": runs}))
        full_env = airflow_env(home, **env)
        with open(log, "wb") as fh:
            proc = subprocess.run(
                [sys.executable, str(HERE / "dag_runner.py"), str(spec), str(out)],
                env=full_env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
                cwd=workdir,
            )
        assert out.exists(), f"dag_runner wrote no result (exit {proc.returncode}):\n{tail(log)}"
        payload = json.loads(out.read_text())
        result = DagTestResult(
            payload["runs"], payload["import_errors"], log, Path(full_env["DATA_DIR"])
        )
        assert proc.returncode == 0, f"dag_runner exited {proc.returncode}\n{result.describe()}"
        assert not result.import_errors, result.import_errors
        return result

    return run


def pipeline_env(data_dir: Path, mlflow_uri: str, **overrides: str) -> dict[str, str]:
    """Settings of the `ml` package for a small, fast run on synthetic data."""
    env = {
        "DATA_DIR": str(data_dir),
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "MLFLOW_EXPERIMENT_NAME": "dag-tests",
        "PRICE_SOURCE": "synthetic",
        "HISTORY_START": "2022-01-03",
        "MODEL_UNITS": "8",
        "MODEL_MAX_EPOCHS": "2",
        "MODEL_PATIENCE": "1",
        "MODEL_KINDS": "lstm,gru",
    }
    env.update(overrides)
    return env
