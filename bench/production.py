"""The production topology as a benchmark stack: `ProductionStack` is a `harness.Stack` whose
processes are scripts/topology.py's (the native docker-compose.yaml topology: PostgreSQL metadata,
MLflow on PostgreSQL behind basic auth, the CeleryExecutor on a Redis broker, api-server,
scheduler, dag-processor, triggerer and two Celery workers), started as
tests/test_production_topology.py starts it, with fresh databases and Redis keys per stack.

The bench drives it through the same REST calls as the embedded stack (`harness.Stack`), so the
api-server lets every request in as admin (`simple_auth_manager_all_admins`, as the embedded
bench stack does); it reads the run's rows from the PostgreSQL metadata database
(`records.query` with a database name) and the MLflow runs with the pipeline's login.
`stop()` is the topology's cleanup: processes, databases and Redis keys (the state dir, with the
logs, stays in the bench's work folder).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib  # noqa: F401 - puts the repository root on sys.path (ml, scripts)
from harness import Stack
from memory import MemorySampler

from scripts.topology import WORKERS, Topology

WORKER_CONCURRENCY = 2  # per Celery worker: 2 workers x 2 = the launcher's parallelism of 4


class BenchTopology(Topology):
    """scripts/topology.py's topology with the bench's pipeline settings and an API that lets the
    bench's unauthenticated REST calls in (they change who may call the API, nothing about
    scheduling or execution)."""

    def __init__(self, *args: Any, settings_env: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings_env = settings_env

    def _airflow_env(self) -> dict[str, str]:
        env = super()._airflow_env()
        env.update(
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="true",
            PYTHONUNBUFFERED="1",
            **self.settings_env,
        )
        return env


@dataclass
class ProductionStack(Stack):
    """One production topology under `state` (fresh PostgreSQL databases and Redis keys)."""

    topology: BenchTopology | None = None

    def __post_init__(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self.topology = BenchTopology(
            state_dir=self.state / "topology",
            worker_concurrency=WORKER_CONCURRENCY,
            settings_env=dict(self.settings_env),
            log=lambda msg: self.log(f"    {msg}"),
        )
        self.launcher = self.topology.stack

    @property
    def metadata(self) -> str:
        """The PostgreSQL metadata database's name (records.query reads it)."""
        return self.topology.airflow_db

    @property
    def artifacts_dir(self) -> Path:
        return self.topology.state / "mlflow" / "artifacts"

    @property
    def mlflow_login(self) -> tuple[str, str]:
        return (self.topology.mlflow_auth.username, self.topology.mlflow_auth.password)

    @property
    def executor(self) -> str:
        return f"CeleryExecutor ({len(WORKERS)} workers x {WORKER_CONCURRENCY})"

    def start(self, timeout: float = 900) -> None:
        started = time.perf_counter()
        self.log(f"  production topology {self.topology.token} in {self.topology.state}")
        self.topology.start(time.monotonic() + timeout)
        self.airflow_port = self.topology.api_port
        self.sampler = MemorySampler([p.pid for p in self.launcher.processes.values()])
        self.sampler.start()
        self.startup_seconds = time.perf_counter() - started

    def scheduler_pid(self) -> int | None:
        proc = self.launcher.processes.get("scheduler")
        return proc.pid if proc is not None else None

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.stop_event.set()
        report = self.topology.cleanup(remove_state=False)
        if report.get("errors") or report.get("leftover_pids") or report.get("databases_left"):
            self.log(f"  cleanup of {self.topology.token}: {report}")
