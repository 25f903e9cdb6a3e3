"""A real Airflow 3 stack as subprocesses, for the tests that go through the scheduler.

`new_stack` prepares a temp AIRFLOW_HOME (a copy of the migrated template DB), a universe file, a
DATA_DIR and the environment; `Stack.boot` starts `airflow api-server` (LocalExecutor tasks report
to its execution API), `airflow dag-processor` and `airflow scheduler` (the project's
`plugins/preloading_executor.py` LocalExecutor on the SQLite metadata DB), imports the pools,
waits until the DAG is parsed and unpauses it. `Stack.stop` stops every process it started and
their descendants; call it in a `finally`.

Used by the backfill test (tests/dags/test_backfill.py) and the fault tests (tests/faults/).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ml.servers import free_port, wait_for_http
from tests.dags.conftest import AIRFLOW, REPO, airflow_env, new_airflow_home, pipeline_env, tail

DAG_ID = "price_forecast"
POOLS = {
    "price_source": {"slots": 4, "description": "price source calls"},
    "training": {"slots": 2, "description": "model training"},
}


@dataclass
class Stack:
    home: Path
    env: dict[str, str]
    logs: Path
    port: int = 0
    data_dir: Path | None = None
    universe_file: Path | None = None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def metadata_db(self) -> Path:
        return self.home / "airflow.db"

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

    def cli_json(self, *args: str) -> list[dict]:
        """The JSON list printed by `airflow <args> -o json` ([] if the command failed)."""
        proc = self.cli(*args, "-o", "json", check=False)
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

    def list_runs(self) -> list[dict]:
        return self.cli_json("dags", "list-runs", DAG_ID)

    def dag_paused(self) -> str | None:
        """ "True"/"False" once the dag-processor has put the DAG in the DB, else None."""
        dags = {d["dag_id"]: d for d in self.cli_json("dags", "list")}
        return str(dags[DAG_ID]["is_paused"]) if DAG_ID in dags else None

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

    def boot(self) -> None:
        """Start api-server, dag-processor and scheduler, import the pools, wait until the DAG
        is parsed and unpause it."""
        self.start("api-server", "api-server", "--host", "127.0.0.1", "--port", str(self.port))
        self.start("dag-processor", "dag-processor")
        self.start("scheduler", "scheduler")
        pools = self.logs.parent / "pools.json"
        pools.write_text(json.dumps(POOLS))
        self.cli("pools", "import", str(pools))
        wait_for_http(
            f"http://127.0.0.1:{self.port}/api/v2/monitor/health",
            timeout=180,
            process=self.processes["api-server"],
        )
        # The DAG must be parsed (by the dag-processor) before it can be unpaused; note that
        # `airflow dags unpause` exits 0 ("No paused DAGs were found") for an unknown DAG.
        deadline = time.monotonic() + 180
        while self.dag_paused() is None:
            self.check_alive()
            assert time.monotonic() < deadline, f"DAG never parsed\n{self.diagnostics()}"
            time.sleep(3)
        self.cli("dags", "unpause", DAG_ID)
        assert self.dag_paused() == "False"

    def wait_for_runs(self, count: int, timeout: float, what: str) -> list[dict]:
        """Poll `dags list-runs` until `count` runs exist and all have finished."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            runs = self.list_runs()
            if len(runs) >= count and all(r["state"] in ("success", "failed") for r in runs):
                return runs
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not done after {timeout:.0f} s\n{self.diagnostics()}")
            time.sleep(10)

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
        runs = self.cli("dags", "list-runs", DAG_ID, "-o", "json", check=False)
        parts.append(f"--- dags list-runs ---\n{runs.stdout[-3000:]}")
        return "\n".join(parts)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def write_universe(path: Path, tickers: list[tuple[str, str]]) -> Path:
    """A universe file of (ticker, asset class) pairs."""
    path.write_text("ticker,asset_class,name\n" + "".join(f"{t},{c},{t}\n" for t, c in tickers))
    return path


def new_stack(
    template_db: Path,
    work: Path,
    *,
    mlflow_uri: str,
    tickers: list[tuple[str, str]],
    experiment: str,
    **overrides: str,
) -> Stack:
    """A stack on `work` (AIRFLOW_HOME, logs, universe, DATA_DIR), not started yet.

    `overrides` are added to the environment of every process (pipeline settings, test hooks).
    """
    home = new_airflow_home(template_db, work / "airflow")
    logs = work / "logs"
    logs.mkdir()
    universe = write_universe(work / "universe.csv", tickers)
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
        # Only the runs the test creates: no scheduled run for "today" once the DAG is unpaused.
        AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="False",
        AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
        AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port()),
        AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(free_port()),
        **pipeline_env(
            data_dir,
            mlflow_uri,
            UNIVERSE_FILE=str(universe),
            MLFLOW_EXPERIMENT_NAME=experiment,
            **overrides,
        ),
    )
    return Stack(home, env, logs, port=port, data_dir=data_dir, universe_file=universe)
