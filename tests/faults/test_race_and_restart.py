"""Two processes on the same ticker and day, and an MLflow server restarted in the middle of a day.

Race. Fault: two processes (a zombie task beside its retry, a manual run beside the schedule, the
CLI beside the DAG) run the same ticker and date, each with its own `DATA_DIR`, on one MLflow
server: no file lock can serialize them. Injection: two `python -m ml run` child processes
started together. What must hold: exactly one model version, trained by one process and reused
by the other; the gate decided once; `champion` on that version.

Restart. Fault: the MLflow server goes away mid-run and comes back (a deploy, a crash). Injection:
the server process is stopped (SIGTERM, then SIGKILL if it lingers) as soon as the day takes the
ticker's lock in the registry (the fit follows, then the logging), kept down for 15 s and
started again on the same port, database and artifacts. What must hold: the day, still running,
waits (the MLflow client's own retries of refused connections) and ends successfully with one
version, the champion set and no run left RUNNING.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ml.registry.lock import lock_name
from ml.servers import sqlite_mlflow_server, start_mlflow_server
from ml.universe import load_universe
from tests.faults.daykit import DAY, day_env, explain, finish, snapshot, start_day

pytestmark = [pytest.mark.slow]


def _report(env: dict[str, str]) -> dict:
    return json.loads((Path(env["DATA_DIR"]) / "reports" / f"{DAY}.json").read_text())


def test_two_processes_on_one_ticker_register_one_version_and_decide_once(
    mlflow_server, tmp_path: Path
) -> None:
    ticker = "RACE"
    envs = [day_env(tmp_path / name, mlflow_server.uri, [ticker]) for name in ("one", "two")]
    procs = [start_day(env) for env in envs]
    done = [finish(p) for p in procs]
    for proc in done:
        assert proc.returncode == 0, f"a racing process failed:\n{explain(proc)}"

    state = snapshot(envs[0], [ticker])
    assert len(state.versions) == 1, f"two processes registered {state.versions}"
    (version,) = state.versions
    rows = [_report(env)["tickers"][0] for env in envs]
    trainings = sorted(row["training"].split()[0] for row in rows)
    assert trainings == ["reused", "trained"], f"both or neither trained: {rows}"
    decided_here = [r for r in rows if not r["promotion_reason"].startswith("decided earlier")]
    assert len(decided_here) == 1, f"the gate ran {len(decided_here)} times: {rows}"
    champion = {aliases["champion"] for aliases in state.aliases.values()}
    expected = {version["version"] if version["gate_status"] == "promoted" else None}
    assert champion == expected, f"champion {champion}, version {version}"
    assert state.run_status == {"FINISHED": 1}, state.run_status


def test_a_day_outlives_an_mlflow_restart(tmp_path: Path) -> None:
    ticker = "RESTART"
    root = tmp_path / "mlflow"
    with sqlite_mlflow_server(root) as server:
        port = int(server.uri.rsplit(":", 1)[1])
        env = day_env(tmp_path / "day", server.uri, [ticker])
        model = load_universe(Path(env["UNIVERSE_FILE"])).get(ticker).model_name
        client = MlflowClient(server.uri, server.uri)
        proc = start_day(env)
        deadline = time.monotonic() + 600
        while not client.search_registered_models(f"name = '{lock_name(model)}'"):
            assert proc.poll() is None, f"the day ended before training:\n{explain(finish(proc))}"
            assert time.monotonic() < deadline, "the day never reached training"
            time.sleep(0.2)
        server.stop()
        stopped = time.monotonic()
        time.sleep(15)
        assert proc.poll() is None, (
            f"the day gave up while MLflow was down:\n{explain(finish(proc))}"
        )
        restarted = start_mlflow_server(
            f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", root / "server.log", port=port
        )
        try:
            print(f"MLflow was down {time.monotonic() - stopped:.1f} s")
            done = finish(proc)
            assert done.returncode == 0, f"the day failed after the restart:\n{explain(done)}"
            state = snapshot(env, [ticker])
        finally:
            restarted.stop()
    assert len(state.versions) == 1, f"versions after the restart: {state.versions}"
    (version,) = state.versions
    champion = next(iter(state.aliases.values()))["champion"]
    assert champion == (version["version"] if version["gate_status"] == "promoted" else None)
    assert "RUNNING" not in state.run_status, state.run_status
    assert state.temp_files == [] and state.staging == []
