"""A 3-day backfill through the REAL Airflow 3 scheduler (point in time: README.md, "Backfills").

The test starts its own stack as subprocesses on a temp AIRFLOW_HOME: `airflow dag-processor`,
`airflow scheduler` (LocalExecutor on the SQLite metadata DB) and `airflow api-server` (LocalExecutor
tasks report to its execution API), plus a private MLflow server. It creates the pools, unpauses
the DAG, runs `airflow backfill create` for 2024-06-25..2024-06-27 on a two-ticker universe and
waits until the three runs finish.

Then, for each day D: the run succeeded, its report is `reports/<D>.json`, and every model trained
for D saw exactly the published bars dated <= D (MLflow param `history_end` and the version's
`data_fingerprint` against the store as of D), although the store holds later bars by then; the
forecast of D comes from a champion trained on data up to D at the latest.

Every process the test started is stopped in a `finally`, on success or failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import pytest

from ml.servers import MlflowServer, free_port, sqlite_mlflow_server, wait_for_http
from ml.universe import load_universe
from tests.dags.conftest import AIRFLOW, REPO, airflow_env, new_airflow_home, pipeline_env, tail

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

DAYS = [date(2024, 6, 25), date(2024, 6, 26), date(2024, 6, 27)]
TICKERS = [("AMD", "stock"), ("EURUSD=X", "forex")]
# The DAG's schedule is cron 30 22 * * * (UTC): the run for day D has logical date D 22:30, and
# --to-date is an inclusive timestamp, so it must reach past 22:30 of the last day.
FROM_DATE, TO_DATE = "2024-06-25", "2024-06-27T23:59:59"
RUN_CONF = {"model_kinds": ["gru"]}  # one candidate per ticker: the scheduler is what is tested
DEADLINE_SECONDS = float(os.environ.get("BACKFILL_TEST_TIMEOUT", "900"))


@dataclass
class Stack:
    home: Path
    env: dict[str, str]
    logs: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def cli(
        self, *args: str, timeout: float = 180, check: bool = True
    ) -> subprocess.CompletedProcess:
        for attempt in range(5):
            proc = subprocess.run(
                [AIRFLOW, *args],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            # SQLite allows one writer: a CLI write can time out while the scheduler holds the
            # lock (the command rolled back, so it is safe to run again), as scripts/stack.py does.
            if proc.returncode == 0 or "database is locked" not in proc.stdout + proc.stderr:
                break
            time.sleep(3 * (attempt + 1))
        if check and proc.returncode != 0:
            raise AssertionError(
                f"airflow {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                f"{proc.stderr[-3000:]}"
            )
        return proc

    def start(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [AIRFLOW, *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, stopped as a whole
            )
        self.processes[name] = proc
        return proc

    def check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise AssertionError(
                    f"airflow {name} exited with {proc.returncode}:\n{tail(self.logs / f'{name}.log')}"
                )

    def stop(self) -> None:
        """Terminate every started process, its process group and its descendants (task
        processes run in process groups of their own), then kill what is left."""
        import psutil

        victims: list[psutil.Process] = []
        for proc in self.processes.values():
            try:
                parent = psutil.Process(proc.pid)
                victims += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for proc in self.processes.values():
            _signal_group(proc.pid, signal.SIGTERM)
        for victim in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.terminate()
        _, alive = psutil.wait_procs(victims, timeout=30)
        for proc in self.processes.values():
            _signal_group(proc.pid, signal.SIGKILL)
        for victim in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.kill()
        psutil.wait_procs(alive, timeout=10)
        for proc in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    def diagnostics(self) -> str:
        parts = [
            f"--- {name} ---\n{tail(self.logs / f'{name}.log', 3000)}" for name in self.processes
        ]
        runs = self.cli("dags", "list-runs", "price_forecast", "-o", "json", check=False)
        parts.append(f"--- dags list-runs ---\n{runs.stdout[-3000:]}")
        return "\n".join(parts)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _cli_json(stack: Stack, *args: str) -> list[dict]:
    """The JSON list printed by `airflow <args> -o json` ([] if the command failed)."""
    proc = stack.cli(*args, "-o", "json", check=False)
    if proc.returncode != 0:
        return []  # e.g. SQLite busy while the scheduler writes; poll again
    # stdout may start with log lines ("... [warning ] ..."): the JSON is the line that parses.
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("["):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return []


def _list_runs(stack: Stack) -> list[dict]:
    return _cli_json(stack, "dags", "list-runs", "price_forecast")


def _dag_paused(stack: Stack) -> str | None:
    """ "True"/"False" once the dag-processor has put the DAG in the DB, else None."""
    dags = {d["dag_id"]: d for d in _cli_json(stack, "dags", "list")}
    return str(dags["price_forecast"]["is_paused"]) if "price_forecast" in dags else None


@pytest.fixture(scope="module")
def backfill_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with sqlite_mlflow_server(tmp_path_factory.mktemp("backfill_mlflow")) as server:
        yield server


@pytest.fixture(scope="module")
def backfill(
    airflow_db_template: Path, backfill_mlflow: MlflowServer, tmp_path_factory
) -> Iterator[dict]:
    """Start the stack, run the backfill, wait for the three runs; yields what the tests need."""
    work = tmp_path_factory.mktemp("backfill")
    home = new_airflow_home(airflow_db_template, work / "airflow")
    logs = work / "logs"
    logs.mkdir()
    universe = work / "universe.csv"
    universe.write_text("ticker,asset_class,name\n" + "".join(f"{t},{c},{t}\n" for t, c in TICKERS))
    data_dir = work / "data"
    port = free_port()
    env = airflow_env(
        home,
        # The embedded stack's executor: LocalExecutor workers that preload TF/MLflow/GX.
        AIRFLOW__CORE__EXECUTOR="preloading_executor.PreloadingLocalExecutor",
        AIRFLOW__CORE__PLUGINS_FOLDER=str(REPO / "plugins"),
        AIRFLOW__CORE__PARALLELISM="3",
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{port}/execution/",
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_urlsafe(32),
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True",
        # Only the backfill's runs: no scheduled run for "today" once the DAG is unpaused.
        AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="False",
        AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
        AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port()),
        AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(free_port()),
        **pipeline_env(
            data_dir,
            backfill_mlflow.uri,
            UNIVERSE_FILE=str(universe),
            MLFLOW_EXPERIMENT_NAME="backfill",
        ),
    )
    stack = Stack(home, env, logs)
    started = time.monotonic()
    try:
        stack.start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(port))
        stack.start("dag-processor", "dag-processor")
        stack.start("scheduler", "scheduler")
        pools = work / "pools.json"
        pools.write_text(
            json.dumps(
                {
                    "price_source": {"slots": 4, "description": "price source calls"},
                    "training": {"slots": 2, "description": "model training"},
                }
            )
        )
        stack.cli("pools", "import", str(pools))
        wait_for_http(
            f"http://127.0.0.1:{port}/api/v2/monitor/health",
            timeout=180,
            process=stack.processes["api-server"],
        )
        # The DAG must be parsed (by the dag-processor) before it can be unpaused; note that
        # `airflow dags unpause` exits 0 ("No paused DAGs were found") for an unknown DAG.
        deadline = time.monotonic() + 180
        while _dag_paused(stack) is None:
            stack.check_alive()
            assert time.monotonic() < deadline, f"DAG never parsed\n{stack.diagnostics()}"
            time.sleep(3)
        stack.cli("dags", "unpause", "price_forecast")
        assert _dag_paused(stack) == "False"
        stack.cli(
            "backfill",
            "create",
            "--dag-id",
            "price_forecast",
            "--from-date",
            FROM_DATE,
            "--to-date",
            TO_DATE,
            "--max-active-runs",
            "1",
            "--dag-run-conf",
            json.dumps(RUN_CONF),
        )
        deadline = time.monotonic() + DEADLINE_SECONDS
        runs: list[dict] = []
        while True:
            stack.check_alive()
            runs = _list_runs(stack)
            if len(runs) >= len(DAYS) and all(r["state"] in ("success", "failed") for r in runs):
                break
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"backfill not done after {DEADLINE_SECONDS:.0f} s\n{stack.diagnostics()}"
                )
            time.sleep(10)
        elapsed = time.monotonic() - started
        print(f"backfill of {len(DAYS)} days x {len(TICKERS)} tickers: {elapsed:.0f} s")
        yield {
            "runs": runs,
            "data_dir": data_dir,
            "universe": load_universe(universe),
            "stack": stack,
            "mlflow": backfill_mlflow,
        }
    finally:
        stack.stop()


def _client(server: MlflowServer):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)


def test_backfill_creates_one_successful_run_per_day(backfill: dict) -> None:
    runs = backfill["runs"]
    by_day = {r["logical_date"][:10]: r for r in runs}
    assert sorted(by_day) == [d.isoformat() for d in DAYS], runs
    for day, run in by_day.items():
        assert run["logical_date"].startswith(f"{day}T22:30:00"), run
        assert run["run_id"].startswith("backfill__"), run
        assert run["state"] == "success", f"{run}\n{backfill['stack'].diagnostics()}"


def test_each_day_has_its_own_report(backfill: dict) -> None:
    by_day = {r["logical_date"][:10]: r for r in backfill["runs"]}
    for day in DAYS:
        path = backfill["data_dir"] / "reports" / f"{day.isoformat()}.json"
        assert path.is_file(), path
        report = json.loads(path.read_text())
        assert report["logical_date"] == day.isoformat()
        assert report["run_id"] == by_day[day.isoformat()]["run_id"]
        assert [r["ticker"] for r in report["tickers"]] == [t for t, _ in TICKERS]
        assert report["failed"] == []


def test_each_day_trained_only_on_bars_up_to_that_day(backfill: dict) -> None:
    """Point in time: the store ends on the last day, yet the model of day D saw bars <= D."""
    from ml.store import PriceStore, data_fingerprint

    client = _client(backfill["mlflow"])
    experiment = client.get_experiment_by_name("backfill")
    assert experiment is not None
    store = PriceStore(backfill["data_dir"])
    for instrument in backfill["universe"]:
        assert store.last_date(instrument) == DAYS[-1], instrument.ticker
        for day in DAYS:
            runs = client.search_runs(
                [experiment.experiment_id],
                filter_string=(
                    f"tags.logical_date = '{day.isoformat()}' "
                    f"and tags.ticker = '{instrument.ticker}'"
                ),
            )
            assert len(runs) == 1, (instrument.ticker, day, len(runs))
            params = runs[0].data.params
            assert params["history_end"] == day.isoformat(), (instrument.ticker, day, params)
            assert params["kinds"] == "gru"  # the backfill's --dag-run-conf reached the tasks
            history = store.load(instrument, until=day)
            assert int(params["n_bars"]) == len(history)
            versions = client.search_model_versions(f"name = '{instrument.model_name}'")
            for_day = [v for v in versions if v.tags.get("logical_date") == day.isoformat()]
            assert len(for_day) == 1, (instrument.ticker, day)
            assert for_day[0].tags["data_fingerprint"] == data_fingerprint(history)
            assert for_day[0].run_id == runs[0].info.run_id


def test_each_forecast_uses_a_model_trained_up_to_its_day(backfill: dict) -> None:
    """Runs go in date order (--max-active-runs 1): the champion used on D was trained <= D."""
    import pandas as pd

    client = _client(backfill["mlflow"])
    table = pd.read_csv(
        backfill["data_dir"] / "forecasts" / "forecasts.csv", dtype={"model_version": "string"}
    )
    assert not table.duplicated(["ticker", "logical_date"]).any()
    for row in table.itertuples():
        assert row.logical_date in {d.isoformat() for d in DAYS}, row
        assert row.last_bar_date == row.logical_date, row  # all three days are weekdays
        instrument = backfill["universe"].get(row.ticker)
        version = client.get_model_version(instrument.model_name, row.model_version)
        assert version.tags["logical_date"] <= row.logical_date, (row, version.tags)
