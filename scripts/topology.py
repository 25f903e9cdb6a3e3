"""One native production topology (docker-compose.yaml's, without Docker): its throwaway
PostgreSQL databases and Redis keys (scripts/services.py), an MLflow server on PostgreSQL behind
basic auth, and Airflow with the CeleryExecutor (api-server, scheduler, dag-processor, triggerer,
two Celery workers), all started with scripts/launcher.py; the run of price_forecast on it, what
the metadata database and the registry say about it, and the cleanup of everything.

scripts/production_native.py runs it once and reports; see its docstring.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ml.config import without_pipeline_env  # noqa: E402
from ml.servers import BasicAuth, free_port  # noqa: E402
from scripts.launcher import DAG_ID, AirflowStack, airflow_env  # noqa: E402
from scripts.services import Resources, pg_exec, pg_url  # noqa: E402

WORKERS = ("worker1", "worker2")
MANIFEST = "topology.json"
DEFAULT_TICKERS: tuple[tuple[str, str, str], ...] = (
    ("GOOGL", "stock", "Alphabet"),
    ("SPY", "etf", "SPDR S&P 500 ETF"),
    ("EURUSD=X", "forex", "Euro / US Dollar"),
    ("SOL-USD", "crypto", "Solana"),
)
# Small, fast models: the point is the topology, not the forecasts.
MODEL_ENV = {
    "MODEL_UNITS": "16",
    "MODEL_MAX_EPOCHS": "3",
    "MODEL_PATIENCE": "2",
    "HISTORY_START": "2022-01-03",
}
Log = Callable[[str], None]


def _print(message: str) -> None:
    print(message, flush=True)


@contextlib.contextmanager
def _environ(**changes: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


class Topology:
    """One native production topology: its state dir, databases, Redis keys and processes."""

    def __init__(
        self,
        tickers: Iterable[tuple[str, str, str]] = DEFAULT_TICKERS,
        *,
        state_dir: Path | None = None,
        worker_concurrency: int = 2,
        with_triggerer: bool = True,
        scheduled_runs: bool = False,
        token: str | None = None,
        log: Log = _print,
    ) -> None:
        if token is not None and not re.fullmatch(r"[a-z0-9]{1,16}", token):
            raise ValueError(f"token {token!r}: use 1-16 lower-case letters or digits")
        self.token = token or secrets.token_hex(4)
        self.tickers = list(tickers)
        self.log = log
        self.worker_concurrency = worker_concurrency
        self.with_triggerer = with_triggerer
        self.scheduled_runs = scheduled_runs
        self.state = Path(state_dir or tempfile.mkdtemp(prefix=f"pf-topology-{self.token}-"))
        self.resources = Resources(self.token)
        self.airflow_db = self.resources.database("airflow")
        self.mlflow_db = self.resources.database("mlflow")
        self.mlflow_auth_db = self.resources.database("mlflow_auth")  # MLflow's basic-auth users
        self.ledger_db = self.resources.database("ledger")  # the forecast ledger
        self.mlflow_uri = ""
        self.admin_password = secrets.token_urlsafe(12)
        # The MLflow admin, created by the server on its first start; the workers log in as it.
        self.mlflow_auth = BasicAuth(
            "admin",
            secrets.token_urlsafe(18),
            pg_url(self.mlflow_auth_db, "postgresql+psycopg2"),
            template=ROOT / "docker" / "mlflow-basic-auth.ini",
        )
        # The Airflow and MLflow processes, each in its own process group, marked with the token.
        self.stack = AirflowStack(self.state, token=self.token, on_spawn=self._save_manifest)

    @property
    def env(self) -> dict[str, str]:
        return self.stack.env

    @property
    def api_port(self) -> int:
        return self.stack.api_port

    @property
    def redis_db(self) -> int | None:
        return self.resources.redis_db

    @property
    def redis_prefix(self) -> str:
        return self.resources.redis_prefix

    def worker_name(self, worker: str) -> str:
        return f"{worker}@{socket.gethostname()}"

    # --- start-up --------------------------------------------------------------------------------

    def _create_resources(self) -> None:
        names = (self.airflow_db, self.mlflow_db, self.mlflow_auth_db, self.ledger_db)
        for name in names:
            self.resources.create_database(name)
            self._save_manifest()
        self.log(f"created PostgreSQL databases {', '.join(names)}")
        self.resources.pick_redis_db()
        self._save_manifest()
        self.log(f"Redis broker: db {self.redis_db}, key prefix {self.redis_prefix!r}")

    def _airflow_env(self) -> dict[str, str]:
        from cryptography.fernet import Fernet

        universe = self.state / "universe.csv"
        rows = ["ticker,asset_class,name", *(f"{t},{c},{n}" for t, c, n in self.tickers)]
        universe.write_text("\n".join(rows) + "\n")
        airflow_home = self.state / "airflow"
        airflow_home.mkdir(parents=True, exist_ok=True)
        passwords = airflow_home / "simple_auth_manager_passwords.json"
        passwords.write_text(json.dumps({"admin": self.admin_password}))
        return airflow_env(
            airflow_home,
            api_port=free_port(),
            mlflow_uri=self.mlflow_uri,
            data_dir=self.state / "data",
            token=self.token,
            executor="CeleryExecutor",
            metadata_db=pg_url(self.airflow_db, "postgresql+psycopg2"),
            # the caller's Airflow and pipeline settings must not leak into this topology
            base=without_pipeline_env(os.environ),
            AIRFLOW__CORE__FERNET_KEY=Fernet.generate_key().decode(),
            AIRFLOW__CORE__AUTH_MANAGER="airflow.api_fastapi.auth.managers.simple."
            "simple_auth_manager.SimpleAuthManager",
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="admin:admin",
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(passwords),
            AIRFLOW__CELERY__BROKER_URL=self.resources.broker_url,
            AIRFLOW__CELERY__RESULT_BACKEND=pg_url(self.airflow_db, "db+postgresql"),
            # Every Redis key kombu writes carries this prefix; cleanup deletes exactly those.
            AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX=self.redis_prefix,
            # Airflow's default, set explicitly (it warns in every component otherwise): a
            # Celery task unacknowledged this long is redelivered.
            AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT="86400",
            # Manual runs only unless asked: no cron-tick run may join ours after unpause
            # (max_active_runs=1 would queue it; teardown would cut it short).
            AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE=str(self.scheduled_runs).lower(),
            # The pipeline's settings (ml/config.py).
            PRICE_SOURCE="synthetic",
            UNIVERSE_FILE=str(universe),
            LEDGER_DB_URL=pg_url(self.ledger_db, "postgresql+psycopg2"),
            **MODEL_ENV,
        )

    def start(self, deadline: float) -> None:
        for sub in ("logs", "data"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        self._create_resources()

        self.log("starting MLflow tracking server (PostgreSQL backend store, basic auth)")
        # psycopg2, as docker-compose.yaml: with SQLAlchemy 2.1 a bare postgresql:// means
        # psycopg 3, whose pipeline mode logs "pipeline aborted" errors under MLflow.
        server = self.stack.start_mlflow(
            pg_url(self.mlflow_db, "postgresql+psycopg2"),
            auth=self.mlflow_auth,
            timeout=min(180.0, _remaining(deadline)),
        )
        self.mlflow_uri = server.uri
        self.log(f"MLflow at {self.mlflow_uri}")

        self.stack.env = self._airflow_env()
        self.log(f"airflow db migrate ({self.airflow_db})")
        self.stack.migrate(timeout=min(600.0, _remaining(deadline)))
        self.stack.import_pools()
        components = ["api-server", "scheduler", "dag-processor"]
        self.stack.start(*components, *(["triggerer"] if self.with_triggerer else []))
        for worker in WORKERS:
            env = {
                "PF_WORKER_NAME": self.worker_name(worker),
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "scripts.launcher.worker_hostname",
                # Tasks run here only: the only processes that log in to MLflow.
                **self.mlflow_auth.client_env(),
            }
            self.stack.spawn(
                worker,
                ["celery", "worker", "--celery-hostname", f"{worker}@%h",
                 "--concurrency", str(self.worker_concurrency), "--skip-serve-logs"],
                env=env,
            )  # fmt: skip
        self.log(
            "started api-server, scheduler, dag-processor"
            + (", triggerer" if self.with_triggerer else "")
            + f", {len(WORKERS)} Celery workers; logs in {self.stack.logs}"
        )
        self.stack.wait_healthy(timeout=min(300.0, _remaining(deadline)))
        self.log(f"api-server up at {self.stack.api_url}")
        self._wait_for_workers(deadline)
        self.stack.wait_for_dag(timeout=_remaining(deadline))
        self.log(f"{DAG_ID} parsed")

    def _wait_for_workers(self, deadline: float) -> None:
        pending = set(WORKERS)
        while pending:
            self.stack.check_alive()
            for worker in list(pending):
                text = (self.stack.logs / f"{worker}.log").read_text(errors="replace")
                if f"{worker}@" in text and " ready." in text:
                    pending.discard(worker)
            if pending:
                if _remaining(deadline) <= 0:
                    raise TimeoutError(f"Celery worker(s) {sorted(pending)} never became ready")
                time.sleep(2)
        self.log(f"Celery workers ready: {', '.join(self.worker_name(w) for w in WORKERS)}")

    def query(self, sql: str) -> list[tuple]:
        """Run `sql` on the Airflow metadata database."""
        return pg_exec(sql, self.airflow_db)

    # --- the run ---------------------------------------------------------------------------------

    def run_dag(self, logical_date: str, deadline: float) -> dict[str, Any]:
        run_id = f"native__{logical_date[:10]}__{self.token}"
        self.stack.trigger(run_id, logical_date)
        self.stack.unpause()
        started = time.monotonic()
        self.log(f"triggered {run_id} and unpaused {DAG_ID}")
        state, last = None, ""
        while True:
            rows = self.query(f"SELECT state FROM dag_run WHERE run_id = '{run_id}'")
            state = rows[0][0] if rows else None
            counts = Counter(
                s or "none"
                for (s,) in self.query(f"SELECT state FROM task_instance WHERE run_id = '{run_id}'")
            )
            progress = f"{state}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            if progress != last:
                self.log(f"  [{time.monotonic() - started:5.0f}s] {progress}")
                last = progress
            if state in ("success", "failed"):
                break
            self.stack.check_alive()
            if _remaining(deadline) <= 0:
                state = f"timeout ({state})"
                self.log(f"{run_id} did not finish in time")
                break
            time.sleep(5)
        return {"run_id": run_id, "state": state, "run_seconds": time.monotonic() - started}

    def task_instances(self, run_id: str) -> list[dict[str, Any]]:
        """Where each task instance ran: the hostname it recorded, and the Celery worker whose log
        shows its Celery task id (external_executor_id) being received."""
        received: dict[str, str] = {}
        for worker in WORKERS:
            text = (self.stack.logs / f"{worker}.log").read_text(errors="replace")
            for task_id in re.findall(r"\[([0-9a-f-]{36})\] received", text):
                received[task_id] = self.worker_name(worker)
        rows = self.query(
            "SELECT task_id, map_index, rendered_map_index, hostname, state, try_number, "
            "external_executor_id, queued_by_job_id, queue FROM task_instance "
            f"WHERE dag_id = '{DAG_ID}' AND run_id = '{run_id}' ORDER BY task_id, map_index"
        )
        keys = ("task_id", "map_index", "ticker", "hostname", "state", "try_number",
                "external_executor_id", "queued_by_job_id", "queue")  # fmt: skip
        out = []
        for row in rows:
            ti = dict(zip(keys, row, strict=True))
            ti["celery_worker"] = received.get(ti["external_executor_id"] or "")
            out.append(ti)
        return out

    def registry(self) -> dict[str, dict[str, Any]]:
        """Registered models in the (PostgreSQL-backed) registry: aliases and each version's gate."""
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.mlflow_uri, registry_uri=self.mlflow_uri)
        models: dict[str, dict[str, Any]] = {}
        with _environ(**self.mlflow_auth.client_env()):  # read at every request
            for model in client.search_registered_models():
                versions = client.search_model_versions(f"name = '{model.name}'")
                models[model.name] = {
                    "aliases": dict(model.aliases or {}),
                    "versions": {
                        v.version: {"gate_status": v.tags.get("gate_status"), "run_id": v.run_id}
                        for v in versions
                    },
                }
        return models

    # --- cleanup ---------------------------------------------------------------------------------

    def _save_manifest(self) -> None:
        """What cleanup needs, for `--stop STATE_DIR` after a `--keep` run."""
        self.stack.save(
            self.state / MANIFEST,
            databases=self.resources.databases,
            redis_db=self.resources.redis_db,
            redis_prefix=self.resources.redis_prefix,
        )

    @classmethod
    def from_manifest(cls, state_dir: Path, log: Log = _print) -> Topology:
        stack, manifest = AirflowStack.load(state_dir / MANIFEST, state_dir)
        topo = cls(state_dir=state_dir, token=stack.token, log=log)
        topo.stack = stack
        topo.resources.databases = list(manifest["databases"])
        topo.resources.redis_db = manifest["redis_db"]
        topo.resources.redis_prefix = manifest["redis_prefix"]
        return topo

    def cleanup(self, remove_state: bool = True) -> dict[str, Any]:
        """Stop everything, drop our databases, delete our Redis keys, remove the state dir.
        Each step runs even if an earlier one failed; errors are reported, not raised."""
        report: dict[str, Any] = {"errors": []}
        try:
            report["leftover_pids"] = self.stack.stop()
        except Exception as exc:
            report["errors"].append(f"stopping processes: {exc!r}")
        self.resources.remove(report)
        if remove_state:
            shutil.rmtree(self.state, ignore_errors=True)
            report["state_dir_removed"] = not self.state.exists()
        return report
