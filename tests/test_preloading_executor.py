"""Pins what plugins/preloading_executor.py relies on in Airflow's LocalExecutor (issue 14).

The PreloadingLocalExecutor overrides LocalExecutor's private `_spawn_worker` and calls the private
`local_executor._run_worker` with the stock arguments. An Airflow upgrade that renames, reshapes or
stops calling either would otherwise leave the pipeline on workers without the preload (every task
importing TensorFlow again) or with broken ones, and nothing would say so. These tests fail first,
naming the Airflow version and what changed:

1. the contract: `_spawn_worker(self)` and `_run_worker(logger_name, input, output,
   unread_messages, team_conf)` still exist; the stock `start()` (fork) and `_check_workers()`
   (spawn) start every worker through `_spawn_worker`, and the override starts the same process
   (same arguments, taken from the same executor attributes) with only the target wrapped;
2. the executor's own guards: on a LocalExecutor with those parts removed or changed, importing
   or starting the PreloadingLocalExecutor raises PreloadingExecutorIncompatible naming the
   Airflow version (and raises nothing on the real one);
3. live: the real executor, `start()`ed as the scheduler does, runs a worker process that imports
   the default preload (in its sys.modules, libtensorflow mapped into it; the parent never imports
   TensorFlow) and then waits in Airflow's own worker loop; `end()` and `terminate()` leave no
   worker process behind.

Airflow runs in subprocesses (tests/preloading_probe.py) with a temp AIRFLOW_HOME: no metadata DB
is needed, as no task is run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ml.config import without_pipeline_env

REPO = Path(__file__).resolve().parent.parent
PROBE = Path(__file__).resolve().parent / "preloading_probe.py"
RUN_WORKER_PARAMETERS = ["logger_name", "input", "output", "unread_messages", "team_conf"]
STOCK_KWARGS = {
    "input": "self.activity_queue",
    "logger_name": "self.log.name",
    "output": "self.result_queue",
    "team_conf": "self.conf",
    "unread_messages": "self._unread_messages",
}
STOCK_TARGET = "airflow.executors.local_executor._run_worker"
PRELOADED_TARGET = "preloading_executor._run_preloaded_worker"
LIBTENSORFLOW = {"libtensorflow_cc.so.2", "libtensorflow_framework.so.2"}


def run_probe(mode: str, tmp: Path, timeout: float = 240) -> dict[str, Any]:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "reports").mkdir(exist_ok=True)
    env = without_pipeline_env(os.environ)
    env.pop("PRELOAD_MODULES", None)  # the default preload
    env.update(
        AIRFLOW_HOME=str(tmp / "airflow"),
        AIRFLOW__CORE__LOAD_EXAMPLES="false",
        PRELOAD_REPORT_DIR=str(tmp / "reports"),
        TF_CPP_MIN_LOG_LEVEL="2",
        GIT_PYTHON_REFRESH="quiet",
        PYTHONUNBUFFERED="1",
    )
    out, log = tmp / f"{mode}.json", tmp / f"{mode}.log"
    with open(log, "wb") as fh:
        proc = subprocess.run(
            [sys.executable, str(PROBE), mode, str(out)],
            env=env,
            cwd=REPO,
            stdout=fh,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    text = log.read_text(errors="replace")
    tail = "\n".join(ln for ln in text.splitlines() if "Skipping registering" not in ln)[-5000:]
    assert proc.returncode == 0 and out.exists(), f"probe {mode} exited {proc.returncode}:\n{tail}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def contract(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_probe("contract", tmp_path_factory.mktemp("preloading_contract"))


def _airflow(result: dict[str, Any]) -> str:
    return f"Airflow {result['airflow']}"


def _plugin_loaded(contract: dict[str, Any]) -> None:
    assert contract["import_error"] is None, (
        f"{_airflow(contract)}: importing plugins/preloading_executor.py raised "
        f"{contract['import_error']['type']}: {contract['import_error']['message']}"
    )


def test_the_private_parts_it_overrides_still_exist_unchanged(contract: dict[str, Any]) -> None:
    airflow = _airflow(contract)
    spawn, run = contract["spawn_worker_signature"], contract["run_worker_signature"]
    assert spawn == "(self)", (
        f"{airflow}: LocalExecutor._spawn_worker "
        + ("is gone" if spawn is None else f"is now _spawn_worker{spawn}")
        + "; PreloadingLocalExecutor overrides it as _spawn_worker(self)"
    )
    assert contract["run_worker_parameters"] == RUN_WORKER_PARAMETERS, (
        f"{airflow}: airflow.executors.local_executor._run_worker "
        + ("is gone" if run is None else f"is now _run_worker{run}")
        + f"; PreloadingLocalExecutor calls it with the keyword arguments {RUN_WORKER_PARAMETERS}"
    )
    _plugin_loaded(contract)
    assert contract["plugin_run_worker_parameters"] == RUN_WORKER_PARAMETERS


@pytest.mark.parametrize(
    "path, count",
    [("start_fork", 2), ("start_spawn", 0), ("check_workers_spawn", 1)],
    ids=["start() with fork", "start() with spawn", "_check_workers() with spawn"],
)
def test_local_executor_starts_every_worker_through_spawn_worker(
    contract: dict[str, Any], path: str, count: int
) -> None:
    """The stock executor (parallelism 2) starts `count` workers on `path`, each one the stock
    worker; the preloading one starts the same workers, each through the override."""
    airflow = _airflow(contract)
    stock = contract["stock"]
    assert "error" not in stock, f"{airflow}: the stock LocalExecutor raised {stock.get('error')}"
    assert len(stock[path]) == count, (
        f"{airflow}: LocalExecutor's {path} now starts {len(stock[path])} worker(s), was {count}: "
        f"{stock[path]}"
    )
    for started in stock[path]:
        assert started["target"] == STOCK_TARGET and started["kwargs"] == STOCK_KWARGS, (
            f"{airflow}: LocalExecutor._spawn_worker now starts {started}; the override copies "
            f"Process(target={STOCK_TARGET}, kwargs={STOCK_KWARGS})"
        )
        assert started["pid_in_workers"] and not started["other_args"], started
    _plugin_loaded(contract)
    preloading = contract["preloading"]
    assert "error" not in preloading, (
        f"{airflow}: PreloadingLocalExecutor raised {preloading.get('error')}\n"
        f"{preloading.get('traceback')}"
    )
    assert [p["target"] for p in preloading[path]] == [PRELOADED_TARGET] * count, (
        f"{airflow}: PreloadingLocalExecutor's {path} started workers without the preload "
        f"(target {STOCK_TARGET} instead of {PRELOADED_TARGET}): LocalExecutor no longer starts "
        f"them through _spawn_worker: {preloading[path]}"
    )
    for started in preloading[path]:
        assert started["kwargs"] == STOCK_KWARGS, (
            f"{airflow}: the override passes {started['kwargs']}, the stock worker gets "
            f"{STOCK_KWARGS}"
        )
        assert started["pid_in_workers"] and not started["other_args"], started


@pytest.mark.parametrize(
    "change",
    [
        "_spawn_worker removed",
        "_spawn_worker takes an argument",
        "_run_worker removed",
        "_run_worker takes a new argument",
        "start() spawns without _spawn_worker",
        "sync() spawns without _spawn_worker",
    ],
)
def test_the_executor_refuses_a_local_executor_it_does_not_fit(
    contract: dict[str, Any], change: str
) -> None:
    _plugin_loaded(contract)
    raised = contract["guards"][change]
    assert raised is not None, (
        f"with {change}, PreloadingLocalExecutor raised nothing: it would fall back silently"
    )
    assert raised["type"] == "PreloadingExecutorIncompatible", raised
    assert _airflow(contract) in raised["message"], raised["message"]


def test_the_executor_raises_nothing_on_this_airflow(contract: dict[str, Any]) -> None:
    _plugin_loaded(contract)
    for control in ("nothing changed, start() (fork)", "nothing changed, sync() (spawn)"):
        assert contract["guards"][control] is None, (control, contract["guards"][control])


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def test_started_executor_runs_preloaded_workers_and_ends_them(tmp_path: Path) -> None:
    result = run_probe("live", tmp_path)
    workers = result["workers"]
    assert result["mp_start_method"] == "fork", result["mp_start_method"]
    assert len(workers) == 1, f"parallelism 1 started {workers}"
    (pid,) = workers
    report = result["reports"].get(str(pid))
    assert report and "died" not in report, (
        f"worker {pid} wrote no preload report (PRELOAD_REPORT_DIR): {report}; "
        f"log: {tmp_path / 'live.log'}"
    )
    assert report["pid"] == pid
    assert report["requested"] == result["default_preload"].split(",")
    assert report["failed"] == {}, f"the default preload failed in the worker: {report['failed']}"
    assert report["in_sys_modules"] == report["requested"]
    assert "tensorflow" in report["in_sys_modules"]
    assert report["warmed"] == result["default_warmup"].split(","), report
    # What the preload made is frozen out of the collector's walks (hundreds of thousands of
    # objects: TensorFlow, MLflow, GX), so a full collection in a forked task skips them.
    assert report["gc_frozen"] > 100_000, report["gc_frozen"]
    # Seen from outside the worker: TensorFlow's libraries are loaded in that process, which went
    # on into Airflow's worker loop, while the executor's own process never imported TensorFlow.
    mapped = set(result["libtensorflow_mapped"][str(pid)])
    assert mapped >= LIBTENSORFLOW, f"worker {pid} maps {sorted(mapped)}, not {LIBTENSORFLOW}"
    assert result["process_titles"][str(pid)] == "airflow worker -- LocalExecutor: <idle>"
    assert not result["tensorflow_in_parent_before"]
    assert not result["tensorflow_in_parent_after_start"]
    # end() + terminate(): no worker left, in the probe or after it exited.
    assert result["left_running"] == [] and result["active_children"] == [], result
    assert _start_time(pid) != result["start_times"][str(pid)], f"worker {pid} still runs"


def test_the_warm_up_fills_the_map_mlflow_checks_requirements_with(monkeypatch) -> None:
    """`ml.registry.client.warm_caches` (the default PRELOAD_WARMUP) fills the module map that
    MLflow otherwise builds, from every installed distribution's metadata, on the first model a
    task logs or loads; after it, MLflow's requirement check reads no metadata to build it."""
    import importlib_metadata
    from mlflow.utils import requirements_utils

    from ml.registry.client import warm_caches

    warm_caches()
    assert requirements_utils._MODULES_TO_PACKAGES, "MLflow no longer keeps the map there"
    assert "mlflow" in requirements_utils._MODULES_TO_PACKAGES

    def read_again() -> None:
        raise AssertionError("MLflow read every distribution's metadata again")

    monkeypatch.setattr(importlib_metadata, "packages_distributions", read_again)
    assert requirements_utils._check_requirement_satisfied("mlflow") is None


def test_the_warm_up_runs_each_dag_file_of_the_dags_folder_once(tmp_path: Path) -> None:
    """`run_dag_files` (in the default PRELOAD_WARMUP) runs every `*.py` of the DAGs folder in
    the worker, so the tasks forked from it find the DAG file's imports loaded; the project's
    DAG file runs there without error. A missing folder is no error."""
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "one.py").write_text("open(__file__ + '.ran', 'a').write('x')\n")
    (dags / "notes.txt").write_text("not a DAG file")
    code = (
        "import json, sys; sys.path.insert(0, 'plugins'); import preloading_executor as p; "
        "print(json.dumps(p.run_dag_files()))"
    )
    ran = {}
    for folder in (dags, REPO / "dags", tmp_path / "missing"):
        env = without_pipeline_env(os.environ)
        env.update(
            AIRFLOW_HOME=str(tmp_path / "airflow"),
            AIRFLOW__CORE__DAGS_FOLDER=str(folder),
            AIRFLOW__CORE__LOAD_EXAMPLES="false",
            GIT_PYTHON_REFRESH="quiet",
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
            timeout=240, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        ran[folder] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert ran[dags] == [str(dags / "one.py")]
    assert (dags / "one.py.ran").read_text() == "x"  # once
    assert ran[REPO / "dags"] == [str(REPO / "dags" / "price_forecast.py")]
    assert ran[tmp_path / "missing"] == []
