"""A private embedded stack for one benchmark scenario: MLflow server + Airflow standalone.

The stack is scripts/launcher.py's, with the environment `make demo` gets (`embedded_env`: the
preloading LocalExecutor, or STACK_EXECUTOR, on SQLite, all state under a temp folder), on free
ports, without the caller's pipeline settings, plus:
- `simple_auth_manager_all_admins`, so the bench drives the REST API without a login; it changes
  who may call the API, nothing about scheduling or execution;
- the scenario's pipeline settings (universe file, history start, ...).

Every process the stack starts is stopped in `stop()` (the launcher's): the process groups of the
standalone and MLflow servers, every descendant seen (task processes run in their own process
groups), and any process left whose environment carries this stack's marker.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import benchlib  # noqa: F401 - puts the repository root on sys.path (ml, scripts)
from memory import MemorySampler
from records import DAG_ID

from ml.config import without_pipeline_env
from ml.servers import MlflowServer, free_port
from scripts.launcher import AirflowStack, embedded_env


@dataclass
class Stack:
    """One private stack under `state` (a temp folder)."""

    state: Path
    settings_env: dict[str, str] = field(default_factory=dict)
    log: Any = print
    airflow_port: int = 0
    mlflow_port: int = 0
    launcher: AirflowStack | None = None
    mlflow: MlflowServer | None = None
    sampler: MemorySampler | None = None
    startup_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self.airflow_port = free_port()
        while self.mlflow_port in (0, self.airflow_port):
            self.mlflow_port = free_port()
        self.launcher = AirflowStack(self.state)
        self.launcher.env = embedded_env(
            self.state,
            api_port=self.airflow_port,
            mlflow_uri=f"http://127.0.0.1:{self.mlflow_port}",
            token=self.launcher.token,
            base=without_pipeline_env(os.environ),
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="true",
            PRICE_SOURCE="synthetic",
            PYTHONUNBUFFERED="1",
            **self.settings_env,
        )

    # --- paths ------------------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        return self.launcher.env

    @property
    def airflow_home(self) -> Path:
        return Path(self.env["AIRFLOW_HOME"])

    @property
    def data_dir(self) -> Path:
        return Path(self.env["DATA_DIR"])

    @property
    def mlflow_uri(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    @property
    def artifacts_dir(self) -> Path:
        return self.state / "mlflow" / "artifacts"

    @property
    def metadata(self) -> Path | str:
        """The metadata database `records.query` reads: the SQLite file (a PostgreSQL database's
        name on the production topology)."""
        return self.airflow_home / "airflow.db"

    @property
    def mlflow_login(self) -> tuple[str, str] | None:
        return None  # the embedded MLflow server has no auth

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.airflow_port}/api/v2"

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self, timeout: float = 900) -> None:
        started = time.perf_counter()
        self.log(
            f"  stack {self.state.name}: MLflow :{self.mlflow_port}, Airflow :{self.airflow_port}"
        )
        launcher = self.launcher
        launcher.migrate(timeout=timeout)
        self.mlflow = launcher.start_mlflow(
            f"sqlite:///{self.state / 'mlflow' / 'mlflow.db'}",
            port=self.mlflow_port,
            timeout=timeout,
        )
        launcher.start("standalone")
        self.sampler = MemorySampler(
            [launcher.processes["standalone"].pid, self.mlflow.process.pid]
        )
        self.sampler.start()
        launcher.wait_healthy(timeout)
        launcher.import_pools()
        launcher.wait_for_dag(timeout)
        self.startup_seconds = time.perf_counter() - started

    @property
    def executor(self) -> str:
        return self.env.get("AIRFLOW__CORE__EXECUTOR", "LocalExecutor (Airflow's default)")

    def wait_quiet(self, cores: float = 0.5, window: float = 3.0, timeout: float = 300) -> float:
        """Wait until the stack's processes together use less than `cores` CPUs over `window`
        seconds (e.g. executor workers still importing their preloaded modules); returns the
        seconds waited."""
        started = time.monotonic()
        if self.sampler is None:
            return 0.0
        while time.monotonic() - started < timeout:
            before = self.sampler.cpu_seconds()
            time.sleep(window)
            if (self.sampler.cpu_seconds() - before) / window < cores:
                break
        return time.monotonic() - started

    def scheduler_pid(self) -> int | None:
        """The scheduler's process: the child of `airflow standalone` titled `airflow scheduler`."""
        import psutil

        with contextlib.suppress(psutil.Error, KeyError):
            for child in psutil.Process(self.launcher.processes["standalone"].pid).children(True):
                with contextlib.suppress(psutil.Error):
                    if "airflow scheduler" in " ".join(child.cmdline()):
                        return child.pid
        return None

    def stop(self) -> None:
        """Stop everything this stack started (see the module docstring)."""
        if self.sampler is not None:
            self.sampler.stop_event.set()
        self.launcher.stop()

    # --- REST API ---------------------------------------------------------------------------------

    def call(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.api + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            text = resp.read().decode()
        return json.loads(text) if text else None

    def set_paused(self, paused: bool) -> None:
        self.call("PATCH", f"/dags/{DAG_ID}", {"is_paused": paused})

    def trigger(self, run_id: str, logical_date: datetime, conf: dict[str, Any]) -> None:
        """Create the run, due at once.

        `run_after` is the whole second before now. The scheduler starts a queued run when
        `run_after <= now()` in SQL (airflow/models/dagrun.py); on SQLite that compares text with
        CURRENT_TIMESTAMP, whole seconds without a fraction: a run due at 12:00:00.4 (the API's
        default, the time of the request) waits until 12:00:01 (0.5 s on average, up to 1 s of
        every measured wall), and '12:00:00.000000' sorts after '12:00:00', so even a due time
        cut to the second waits for the next one. PostgreSQL's now() has no such wait.
        """
        due = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
        self.call(
            "POST",
            f"/dags/{DAG_ID}/dagRuns",
            {
                "dag_run_id": run_id,
                "logical_date": logical_date.isoformat(),
                "run_after": due.isoformat(),
                "conf": conf,
            },
        )

    def run_state(self, run_id: str) -> str | None:
        try:
            return self.call("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}").get("state")
        except (urllib.error.URLError, OSError, json.JSONDecodeError):
            return None

    def wait(self, run_id: str, timeout: float, poll: float = 2.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.launcher.check_alive()
            state = self.run_state(run_id)
            if state in ("success", "failed"):
                return state
            time.sleep(poll)
        raise TimeoutError(f"{run_id} did not finish within {timeout:.0f}s")

    def foreign_runs(self, mine: set[str]) -> list[str]:
        """Runs of the DAG that the bench did not trigger (e.g. a schedule tick passed)."""
        runs = self.call("GET", f"/dags/{DAG_ID}/dagRuns?limit=100").get("dag_runs", [])
        return [r["dag_run_id"] for r in runs if r["dag_run_id"] not in mine]
