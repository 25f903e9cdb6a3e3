"""`make demo` again and again on one state (issue 27, item 8): scripts/stack.py itself, as the
Makefile runs it, with its real MLflow server and Airflow standalone on free ports.

1. the first demo starts the stack and triggers the latest schedule tick's run;
2. a second demo, the stack still up, reuses it: the day has its run already, and Airflow allows
   one run per logical date (a second one was an IntegrityError and a traceback), so it triggers
   a run without a logical date that processes the same day (param `as_of`), and says so;
3. after `stop`, a third demo starts the stack again on the same state and does the same.

The cost is kept low: one ticker, the DAG tests' tiny models (GRU only), the metadata DB copied
from the session's migrated template. Whatever happens, `stop` stops the stack in a `finally`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from ml.servers import free_port
from scripts.launcher import processes_with_marker
from scripts.stack import latest_tick
from tests.dags.conftest import REPO, clean_env, new_airflow_home, pipeline_env
from tests.dags.stack import write_universe

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

DEADLINE_SECONDS = float(os.environ.get("DEMO_TEST_TIMEOUT", "900"))


def demo_env(state: Path) -> dict[str, str]:
    """The environment `make demo` gives scripts/stack.py, on `state`, free ports and a small
    pipeline (the developer's STACK_* settings left out)."""
    universe = write_universe(state.parent / "universe.csv", [("AMD", "stock")])
    env = clean_env()
    for name in ("STACK_KEEP", "STACK_EXECUTOR"):
        env.pop(name, None)
    env.update(
        pipeline_env(state / "data", "unused", UNIVERSE_FILE=str(universe), MODEL_KINDS="gru")
    )
    env.pop("MLFLOW_TRACKING_URI")  # the stack's own MLflow server
    env.update(
        STACK_STATE_DIR=str(state), AIRFLOW_PORT=str(free_port()), MLFLOW_PORT=str(free_port())
    )
    return env


def stack_py(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "stack.py"), *args],
        env=env, capture_output=True, text=True, timeout=DEADLINE_SECONDS, check=False,
    )  # fmt: skip


def dag_runs(state: Path) -> list[tuple[str, str | None, str]]:
    """(run_id, logical_date, state) of every run in the metadata DB, oldest first."""
    con = sqlite3.connect(f"file:{state / 'airflow' / 'airflow.db'}?mode=ro", uri=True, timeout=60)
    try:
        return con.execute("SELECT run_id, logical_date, state FROM dag_run ORDER BY id").fetchall()
    finally:
        con.close()


def test_make_demo_twice_then_stop_and_once_more(airflow_db_template: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    new_airflow_home(airflow_db_template, state / "airflow")  # `db migrate` finds nothing to do
    env = demo_env(state)
    tick = latest_tick()
    day = tick.date().isoformat()
    outputs: list[str] = []
    token = None
    try:
        for i in range(3):
            if i == 2:
                stopped = stack_py(env, "stop")
                assert stopped.returncode == 0, stopped.stdout + stopped.stderr
            proc = stack_py(env, "demo")
            token = json.loads((state / "pids.json").read_text())["token"]
            outputs.append(proc.stdout + proc.stderr)
            assert proc.returncode == 0, f"demo {i + 1}:\n{outputs[-1]}"
            assert "Traceback" not in outputs[-1]
    finally:
        stopped = stack_py(env, "stop")
    if latest_tick() != tick:
        pytest.skip("the 22:30 UTC schedule tick passed during the test: two days' runs")

    runs = dag_runs(state)
    assert [s for _, _, s in runs] == ["success"] * 3, runs
    first, *again = [run_id for run_id, _, _ in runs]
    assert runs[0][1] is not None and runs[0][1].startswith(f"{day} 22:30"), runs
    assert [logical for _, logical, _ in runs[1:]] == [None, None], runs

    assert f"triggering price_forecast for {day} (synthetic prices) as {first}\n" in outputs[0]
    assert "reusing the running stack" in outputs[1]
    assert "starting Airflow standalone" in outputs[2]
    for output, run_id in zip(outputs[1:], again, strict=True):
        assert (
            f"{day} already has its run ({first}, success) and Airflow allows one run per logical"
            f" date: triggering a new run of {day} without one (param as_of), which reuses the"
            f" bars and models stored so far, as {run_id}\n"
        ) in output
        assert f"run {run_id}: success in " in output
    # The day's report is the last run's: the same day again, its bars and model reused.
    report = json.loads((state / "data" / "reports" / f"{day}.json").read_text())
    assert report["run_id"] == again[-1] and report["logical_date"] == day
    assert [(r["ticker"], r["state"]) for r in report["tickers"]] == [("AMD", "skipped")]

    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert token is not None and processes_with_marker(token) == []
