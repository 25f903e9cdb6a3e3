"""The production topology of docker-compose.yaml, started natively on this machine (no Docker).

    python scripts/production_native.py                 run price_forecast once, print a summary, clean up
    python scripts/production_native.py --keep          leave everything running for inspection
    python scripts/production_native.py --stop DIR      tear down what a --keep run left in DIR
    python scripts/production_native.py --tickers GOOGL:stock SPY:etf --timeout 1200

It needs PostgreSQL (trust auth for user `postgres`) and Redis on 127.0.0.1 and starts:

- four throwaway PostgreSQL databases, `pf_airflow_<id>` (Airflow metadata and Celery results),
  `pf_mlflow_<id>` (MLflow backend store), `pf_mlflow_auth_<id>` (MLflow's users) and
  `pf_ledger_<id>` (the forecast ledger);
- an MLflow tracking server on the MLflow database, serving artifacts from the state dir, behind
  basic auth as in docker-compose.yaml (docker/mlflow-basic-auth.ini, a random admin password):
  only the Celery workers get the login (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD);
- Airflow with CeleryExecutor and a Redis broker (an empty Redis database number plus a unique key
  prefix): `db migrate`, pools, api-server, scheduler, dag-processor, triggerer and two Celery
  workers, `worker1@<host>` and `worker2@<host>`, each in its own process group;
- then triggers `price_forecast` for a fixed logical date, waits for the run and reports where each
  task instance ran and what the MLflow registry holds.

Each worker records its own name as the task-instance hostname (`[core] hostname_callable` set to
`production_native.worker_hostname`, which reads PF_WORKER_NAME), so the metadata database shows
which worker ran what. Without --keep everything is removed at the end: process groups, the
databases, the Redis keys, the state dir.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
BIN = Path(sys.executable).parent
DAG_ID = "price_forecast"
PG_HOST = os.environ.get("PF_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("PF_PG_PORT", "5432"))
PG_USER = os.environ.get("PF_PG_USER", "postgres")
REDIS_HOST = os.environ.get("PF_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("PF_REDIS_PORT", "6379"))
DB_PREFIXES = ("pf_airflow_", "pf_mlflow_", "pf_mlflow_auth_", "pf_ledger_")
WORKERS = ("worker1", "worker2")
LOGICAL_DATE = "2024-06-28T22:30:00+00:00"
# Every process this script starts carries this variable (with the topology's id): cleanup uses it
# to find task processes that left their process group.
MARKER_ENV = "PF_TOPOLOGY_ID"
MANIFEST = "topology.json"
DEFAULT_TICKERS: tuple[tuple[str, str, str], ...] = (
    ("GOOGL", "stock", "Alphabet"),
    ("SPY", "etf", "SPDR S&P 500 ETF"),
    ("EURUSD=X", "forex", "Euro / US Dollar"),
    ("SOL-USD", "crypto", "Solana"),
)
POOLS = {
    "price_source": (4, "Concurrent requests to the price source across all workers"),
    "training": (2, "Concurrent model trainings across all workers: 2 per worker host"),
}
# Small, fast models: the point is the topology, not the forecasts.
MODEL_ENV = {
    "MODEL_UNITS": "16",
    "MODEL_MAX_EPOCHS": "3",
    "MODEL_PATIENCE": "2",
    "HISTORY_START": "2022-01-03",
}
Log = Callable[[str], None]

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def worker_hostname() -> str:
    """`[core] hostname_callable` of the workers: the name recorded in task_instance.hostname."""
    return os.environ.get("PF_WORKER_NAME") or socket.getfqdn()


def _print(message: str) -> None:
    print(message, flush=True)


def _pg_dsn(dbname: str = "postgres") -> str:
    return f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname={dbname} connect_timeout=5"


def _pg_url(dbname: str, scheme: str = "postgresql") -> str:
    return f"{scheme}://{PG_USER}@{PG_HOST}:{PG_PORT}/{dbname}"


def services_available() -> str | None:
    """None if PostgreSQL and Redis answer on 127.0.0.1 (and the clients are installed), else why not."""
    try:
        import psycopg2
        import redis
    except ImportError as exc:
        return f"client library missing: {exc}"
    try:
        conn = psycopg2.connect(_pg_dsn())
        conn.close()
    except psycopg2.Error as exc:
        detail = " ".join(str(exc).split())
        return f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT} as {PG_USER}: {detail}"
    try:
        redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_timeout=5).ping()
    except redis.RedisError as exc:
        return f"Redis not reachable at {REDIS_HOST}:{REDIS_PORT}: {exc}"
    return None


def _pg_exec(sql: str, dbname: str = "postgres") -> list[tuple]:
    import psycopg2

    conn = psycopg2.connect(_pg_dsn(dbname))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def existing_databases(prefixes: Iterable[str] = DB_PREFIXES) -> list[str]:
    """Databases whose name starts with one of `prefixes` (leftovers of this script)."""
    names = [r[0] for r in _pg_exec("SELECT datname FROM pg_database")]
    return sorted(n for n in names if n.startswith(tuple(prefixes)))


def processes_with_marker(token: str) -> list[int]:
    """PIDs of processes whose environment carries MARKER_ENV=token (readable /proc only)."""
    needle = f"{MARKER_ENV}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


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


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


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
        self.logs = self.state / "logs"
        self.airflow_db = f"pf_airflow_{self.token}"
        self.mlflow_db = f"pf_mlflow_{self.token}"
        self.mlflow_auth_db = f"pf_mlflow_auth_{self.token}"  # MLflow's basic-auth users
        self.ledger_db = f"pf_ledger_{self.token}"  # the forecast ledger (ml.forecasts.ledger)
        self.redis_db: int | None = None
        self.redis_prefix = f"pf_{self.token}:"
        self.api_port = 0
        self.mlflow_uri = ""
        self.admin_password = secrets.token_urlsafe(12)
        from ml.servers import BasicAuth

        # The MLflow admin, created by the server on its first start; the workers log in as it.
        self.mlflow_auth = BasicAuth(
            "admin",
            secrets.token_urlsafe(18),
            _pg_url(self.mlflow_auth_db, "postgresql+psycopg2"),
            template=ROOT / "docker" / "mlflow-basic-auth.ini",
        )
        self.processes: dict[str, subprocess.Popen] = {}
        self.pids: dict[str, int] = {}
        self.created_databases: list[str] = []
        self.env: dict[str, str] = {}

    # --- resources -------------------------------------------------------------------------------

    def _create_databases(self) -> None:
        names = (self.airflow_db, self.mlflow_db, self.mlflow_auth_db, self.ledger_db)
        for name in names:
            _pg_exec(f'CREATE DATABASE "{name}"')
            self.created_databases.append(name)
            self._save_manifest()
        self.log(f"created PostgreSQL databases {', '.join(names)}")

    def _pick_redis_db(self) -> None:
        """An empty Redis database number (others' data stays out of reach), plus our key prefix."""
        import redis

        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_timeout=5)
        try:
            count = int(client.config_get("databases").get("databases", 16))
        except redis.RedisError:
            count = 16
        candidates = list(range(1, count))
        secrets.SystemRandom().shuffle(candidates)
        for number in candidates:
            if (
                redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=number, socket_timeout=5).dbsize()
                == 0
            ):
                self.redis_db = number
                break
        else:
            self.redis_db = candidates[0]  # all busy: the key prefix still keeps our keys apart
        self.log(f"Redis broker: db {self.redis_db}, key prefix {self.redis_prefix!r}")

    def _write_universe(self) -> Path:
        path = self.state / "universe.csv"
        rows = ["ticker,asset_class,name", *(f"{t},{c},{n}" for t, c, n in self.tickers)]
        path.write_text("\n".join(rows) + "\n")
        return path

    def _airflow_env(self, universe: Path) -> dict[str, str]:
        from cryptography.fernet import Fernet

        airflow_home = self.state / "airflow"
        airflow_home.mkdir(parents=True, exist_ok=True)
        passwords = airflow_home / "simple_auth_manager_passwords.json"
        passwords.write_text(json.dumps({"admin": self.admin_password}))
        self.api_port = _free_port()
        api = f"http://127.0.0.1:{self.api_port}"
        broker = f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.redis_db}"
        env = {
            k: v
            for k, v in os.environ.items()
            # the caller's Airflow and pipeline settings must not leak into this topology
            if not k.startswith(("AIRFLOW_", "MLFLOW_", "MODEL_", "GATE_", "PRICE_", "YAHOO_"))
            and k not in ("DATA_DIR", "UNIVERSE_FILE", "HISTORY_START", "TRAILING_DAYS")
        }
        env.update(
            {
                MARKER_ENV: self.token,
                "AIRFLOW_HOME": str(airflow_home),
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "false",
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "true",
                "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
                "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple."
                "simple_auth_manager.SimpleAuthManager",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
                "LEDGER_DB_URL": _pg_url(self.ledger_db, "postgresql+psycopg2"),
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": _pg_url(
                    self.airflow_db, "postgresql+psycopg2"
                ),
                "AIRFLOW__CELERY__BROKER_URL": broker,
                "AIRFLOW__CELERY__RESULT_BACKEND": _pg_url(self.airflow_db, "db+postgresql"),
                # Every Redis key kombu writes carries this prefix; cleanup deletes exactly those.
                "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": self.redis_prefix,
                # Airflow's default, set explicitly (it warns in every component otherwise): a
                # Celery task unacknowledged this long is redelivered.
                "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "86400",
                "AIRFLOW__API__PORT": str(self.api_port),
                "AIRFLOW__API__BASE_URL": api,
                "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
                # HS512 wants a key of 64 bytes or more (PyJWT warns on every token otherwise).
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
                # Manual runs only unless asked: no cron-tick run may join ours after unpause
                # (max_active_runs=1 would queue it; teardown would cut it short).
                "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": str(self.scheduled_runs).lower(),
                # The pipeline's settings (ml/config.py).
                "PRICE_SOURCE": "synthetic",
                "DATA_DIR": str(self.state / "data"),
                "UNIVERSE_FILE": str(universe),
                "MLFLOW_TRACKING_URI": self.mlflow_uri,
                "MLFLOW_DISABLE_TELEMETRY": "true",
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                "TF_CPP_MIN_LOG_LEVEL": "2",
                "GIT_PYTHON_REFRESH": "quiet",
                # ml.registry.client.code_version runs `git status` in every task process: never let it
                # take index.lock in the working tree others are using.
                "GIT_OPTIONAL_LOCKS": "0",
                **MODEL_ENV,
                "PYTHONPATH": os.pathsep.join(
                    [str(ROOT), str(SCRIPTS), *filter(None, [os.environ.get("PYTHONPATH")])]
                ),
                # Airflow spawns `airflow` by name (task supervisors, serve-logs, gunicorn...).
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            }
        )
        return env

    # --- processes -------------------------------------------------------------------------------

    def _airflow(self, *args: str, timeout: float = 300, env: dict | None = None) -> str:
        """Run an Airflow CLI command to completion; raise with its output if it fails."""
        name = "-".join(a for a in args[:2] if not a.startswith("-"))
        log_path = self.logs / f"cli-{name}.log"
        try:
            done = subprocess.run(
                [str(BIN / "airflow"), *args],
                env=env or self.env,
                cwd=self.state,
                capture_output=True,
                text=True,
                timeout=timeout,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"`airflow {' '.join(args)}` took over {timeout:.0f}s") from exc
        with open(log_path, "a") as handle:
            handle.write(f"$ airflow {' '.join(args)}\n{done.stdout}\n{done.stderr}\n")
        if done.returncode != 0:
            raise RuntimeError(
                f"`airflow {' '.join(args)}` exited {done.returncode}:\n{done.stderr[-3000:]}"
            )
        return done.stdout

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        with open(self.logs / f"{name}.log", "ab") as log:
            self.processes[name] = subprocess.Popen(
                args,
                env=env or self.env,
                cwd=self.state,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: cleanup signals the whole group
            )
        self._save_manifest()

    def _check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with code {proc.returncode}; last lines of its log:\n"
                    + _tail(self.logs / f"{name}.log")
                )

    def worker_name(self, worker: str) -> str:
        return f"{worker}@{socket.gethostname()}"

    def start(self, deadline: float) -> None:
        from ml.servers import start_mlflow_server, wait_for_http

        for sub in ("logs", "data"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        universe = self._write_universe()
        self._create_databases()
        self._pick_redis_db()

        self.log("starting MLflow tracking server (PostgreSQL backend store, basic auth)")
        with _environ(**{MARKER_ENV: self.token, "MLFLOW_DISABLE_TELEMETRY": "true"}):
            # psycopg2, as docker-compose.yaml: with SQLAlchemy 2.1 a bare postgresql:// means
            # psycopg 3, whose pipeline mode logs "pipeline aborted" errors under MLflow.
            server = start_mlflow_server(
                _pg_url(self.mlflow_db, "postgresql+psycopg2"),
                self.state / "mlflow" / "artifacts",
                self.logs / "mlflow.log",
                timeout=min(180.0, _remaining(deadline)),
                auth=self.mlflow_auth,
            )
        self.processes["mlflow"] = server.process
        self._save_manifest()
        self.mlflow_uri = server.uri
        self.log(f"MLflow at {self.mlflow_uri}")

        self.env = self._airflow_env(universe)
        self.log(f"airflow db migrate ({self.airflow_db})")
        self._airflow("db", "migrate", timeout=min(600.0, _remaining(deadline)))
        pools_file = self.state / "pools.json"
        pools_file.write_text(
            json.dumps({k: {"slots": s, "description": d} for k, (s, d) in POOLS.items()})
        )
        self._airflow("pools", "import", str(pools_file), timeout=min(300.0, _remaining(deadline)))

        airflow = str(BIN / "airflow")
        self._spawn(
            "api-server",
            [airflow, "api-server", "--host", "127.0.0.1", "--port", str(self.api_port),
             "--workers", "1"],
        )  # fmt: skip
        self._spawn("scheduler", [airflow, "scheduler"])
        self._spawn("dag-processor", [airflow, "dag-processor"])
        if self.with_triggerer:
            # Logs are on this machine's disk: no log server (it would clash with other Airflows).
            self._spawn("triggerer", [airflow, "triggerer", "--skip-serve-logs"])
        for worker in WORKERS:
            env = {
                **self.env,
                "PF_WORKER_NAME": self.worker_name(worker),
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "production_native.worker_hostname",
                # Tasks run here only: the only processes that log in to MLflow.
                **self.mlflow_auth.client_env(),
            }
            self._spawn(
                worker,
                [airflow, "celery", "worker", "--celery-hostname", f"{worker}@%h",
                 "--concurrency", str(self.worker_concurrency), "--skip-serve-logs"],
                env=env,
            )  # fmt: skip
        self.log(
            "started api-server, scheduler, dag-processor"
            + (", triggerer" if self.with_triggerer else "")
            + f", {len(WORKERS)} Celery workers; logs in {self.logs}"
        )

        wait_for_http(
            f"http://127.0.0.1:{self.api_port}/api/v2/version",
            timeout=min(300.0, _remaining(deadline)),
            process=self.processes["api-server"],
        )
        self.log(f"api-server up at http://127.0.0.1:{self.api_port}")
        self._wait_for_workers(deadline)
        self._wait_for_dag(deadline)

    def _wait_for_workers(self, deadline: float) -> None:
        pending = set(WORKERS)
        while pending:
            self._check_alive()
            for worker in list(pending):
                text = (self.logs / f"{worker}.log").read_text(errors="replace")
                if f"{worker}@" in text and " ready." in text:
                    pending.discard(worker)
            if pending:
                if _remaining(deadline) <= 0:
                    raise TimeoutError(f"Celery worker(s) {sorted(pending)} never became ready")
                time.sleep(2)
        self.log(f"Celery workers ready: {', '.join(self.worker_name(w) for w in WORKERS)}")

    def _wait_for_dag(self, deadline: float) -> None:
        sql = (
            "SELECT 1 FROM dag d JOIN serialized_dag s ON s.dag_id = d.dag_id "
            f"WHERE d.dag_id = '{DAG_ID}'"
        )
        while not self.query(sql):
            self._check_alive()
            if _remaining(deadline) <= 0:
                errors = self._airflow("dags", "list-import-errors", timeout=120)
                raise TimeoutError(f"{DAG_ID} was not parsed in time. Import errors:\n{errors}")
            time.sleep(3)
        self.log(f"{DAG_ID} parsed")

    def query(self, sql: str) -> list[tuple]:
        """Run `sql` on the Airflow metadata database."""
        return _pg_exec(sql, self.airflow_db)

    # --- the run ---------------------------------------------------------------------------------

    def run_dag(self, logical_date: str, deadline: float) -> dict[str, Any]:
        run_id = f"native__{logical_date[:10]}__{self.token}"
        self._airflow("dags", "trigger", DAG_ID, "--run-id", run_id, "--logical-date", logical_date)
        self._airflow("dags", "unpause", DAG_ID)
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
            self._check_alive()
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
            text = (self.logs / f"{worker}.log").read_text(errors="replace")
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
        manifest = {
            "token": self.token,
            "pids": {name: proc.pid for name, proc in self.processes.items()},
            "databases": self.created_databases,
            "redis_db": self.redis_db,
            "redis_prefix": self.redis_prefix,
        }
        (self.state / MANIFEST).write_text(json.dumps(manifest, indent=2))

    @classmethod
    def from_manifest(cls, state_dir: Path, log: Log = _print) -> Topology:
        manifest = json.loads((state_dir / MANIFEST).read_text())
        topo = cls(state_dir=state_dir, log=log)
        topo.token = manifest["token"]
        topo.pids = {k: int(v) for k, v in manifest["pids"].items()}
        topo.created_databases = list(manifest["databases"])
        topo.redis_db = manifest["redis_db"]
        topo.redis_prefix = manifest["redis_prefix"]
        return topo

    def _leaders(self) -> dict[str, int]:
        """Process-group leaders still ours: our un-reaped children, or (from a manifest) PIDs
        whose environment still carries our marker (a recycled PID is left alone)."""
        for proc in self.processes.values():
            proc.poll()  # reap, so that an exited leader does not look alive
        mine = set(processes_with_marker(self.token))
        out = {}
        for name, pid in self.pids.items():
            proc = self.processes.get(name)
            if (proc is not None and _group_alive(pid)) or (proc is None and pid in mine):
                out[name] = pid
        return out

    def stop_processes(self, grace: float = 30.0) -> list[int]:
        """SIGTERM every process group (workers first), SIGKILL what is left after `grace` seconds;
        then kill any process still carrying our marker. Returns the PIDs still alive after all."""
        self.pids.update({name: proc.pid for name, proc in self.processes.items()})
        order = [*WORKERS, "scheduler", "triggerer", "dag-processor", "api-server", "mlflow"]
        leaders = self._leaders()
        for name in sorted(leaders, key=lambda n: order.index(n) if n in order else len(order)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(leaders[name], signal.SIGTERM)
        end = time.monotonic() + grace
        while time.monotonic() < end and any(_group_alive(p) for p in self._leaders().values()):
            time.sleep(0.5)
        for pid in self._leaders().values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        for proc in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        # Stragglers outside the groups (a task runner that called setsid, say): ours by the marker.
        for pid in processes_with_marker(self.token):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        end = time.monotonic() + 10
        while time.monotonic() < end and processes_with_marker(self.token):
            time.sleep(0.5)
        return processes_with_marker(self.token)

    def cleanup(self, remove_state: bool = True) -> dict[str, Any]:
        """Stop everything, drop our databases, delete our Redis keys, remove the state dir.
        Each step runs even if an earlier one failed; errors are reported, not raised."""
        report: dict[str, Any] = {"errors": []}
        try:
            report["leftover_pids"] = self.stop_processes()
        except Exception as exc:
            report["errors"].append(f"stopping processes: {exc!r}")
        for name in self.created_databases:
            try:
                _pg_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception as exc:
                report["errors"].append(f"dropping {name}: {exc!r}")
        try:
            left = set(existing_databases()) & set(self.created_databases)
            report["databases_left"] = sorted(left)
        except Exception as exc:
            report["errors"].append(f"listing databases: {exc!r}")
        if self.redis_db is not None:
            try:
                import redis

                client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=self.redis_db)
                keys = list(client.scan_iter(match=f"{self.redis_prefix}*", count=500))
                if keys:
                    client.delete(*keys)
                report["redis_keys_deleted"] = len(keys)
                report["redis_keys_left"] = sum(
                    1 for _ in client.scan_iter(match=f"{self.redis_prefix}*")
                )
            except Exception as exc:
                report["errors"].append(f"deleting Redis keys: {exc!r}")
        if remove_state:
            shutil.rmtree(self.state, ignore_errors=True)
            report["state_dir_removed"] = not self.state.exists()
        return report


def _free_port() -> int:
    from ml.servers import free_port

    return free_port()


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_topology(
    tickers: Iterable[tuple[str, str, str]] = DEFAULT_TICKERS,
    *,
    logical_date: str = LOGICAL_DATE,
    timeout: float = 900.0,
    keep: bool = False,
    state_dir: Path | None = None,
    worker_concurrency: int = 2,
    with_triggerer: bool = True,
    scheduled_runs: bool = False,
    token: str | None = None,
    log: Log = _print,
    while_up: Callable[[Topology], Any] | None = None,
) -> dict[str, Any]:
    """Start the topology, run price_forecast once for `logical_date`, collect where every task ran
    and what the registry holds, then (unless `keep`) tear everything down.
    `while_up(topology)`, if given, runs after the run, before teardown; its result is `while_up`.

    `timeout` bounds start-up plus the run; cleanup adds up to about a minute. The result dict has
    `state`, `wall_seconds`, `task_instances`, `tasks_per_worker`, `registry` (from the server),
    `registry_in_postgres` (model names read from the MLflow database), `ledger_in_postgres`
    (tickers in the ledger's forecasts and monitor tables), `report` (the run's JSON
    summary), `cleanup` (None with keep) and the topology's names (token, databases, Redis db and
    key prefix, URLs, state dir). `token` (default random) names the databases and marks every
    process started, so a caller can check afterwards that nothing is left."""
    if state_dir is not None and state_dir.exists() and any(state_dir.iterdir()):
        # cleanup removes the state dir: never one that holds anything else
        raise ValueError(f"state dir {state_dir} exists and is not empty")
    started = time.monotonic()
    deadline = started + timeout
    topo = Topology(
        tickers,
        state_dir=state_dir,
        worker_concurrency=worker_concurrency,
        with_triggerer=with_triggerer,
        scheduled_runs=scheduled_runs,
        token=token,
        log=log,
    )
    result: dict[str, Any] = {
        "token": topo.token,
        "state_dir": str(topo.state),
        "databases": [topo.airflow_db, topo.mlflow_db, topo.mlflow_auth_db],
        "tickers": [t for t, _, _ in topo.tickers],
        "cleanup": None,
    }
    try:
        topo.start(deadline)
        result.update(
            redis_db=topo.redis_db,
            redis_prefix=topo.redis_prefix,
            airflow_url=f"http://127.0.0.1:{topo.api_port}",
            mlflow_url=topo.mlflow_uri,
            admin_password=topo.admin_password,
            mlflow_login=[topo.mlflow_auth.username, topo.mlflow_auth.password],
            workers=[topo.worker_name(w) for w in WORKERS],
        )
        result.update(topo.run_dag(logical_date, deadline))
        result["wall_seconds"] = time.monotonic() - started
        tis = topo.task_instances(result["run_id"])
        result["task_instances"] = tis
        result["tasks_per_worker"] = dict(Counter(ti["hostname"] for ti in tis if ti["hostname"]))
        result["registry"] = topo.registry()
        # The same registry read straight from the MLflow database: it is PostgreSQL-backed.
        result["registry_in_postgres"] = sorted(
            r[0] for r in _pg_exec("SELECT name FROM registered_models", topo.mlflow_db)
        )
        # The forecast ledger lives in its own PostgreSQL database too.
        result["ledger_in_postgres"] = {
            table: sorted({r[0] for r in _pg_exec(f"SELECT ticker FROM {table}", topo.ledger_db)})
            for table in ("forecasts", "monitor")
        }
        report = Path(topo.env["DATA_DIR"]) / "reports" / f"{logical_date[:10]}.json"
        result["report"] = json.loads(report.read_text()) if report.exists() else None
        if while_up is not None:
            result["while_up"] = while_up(topo)
        if result["state"] != "success":
            result["failed_task_logs"] = _failed_task_logs(topo, tis)
    finally:
        if keep:
            log(f"--keep: left running; state in {topo.state}")
        else:
            log("cleaning up")
            result["cleanup"] = topo.cleanup()
            result["cleanup_seconds"] = time.monotonic() - started - result.get("wall_seconds", 0)
    return result


def _failed_task_logs(topo: Topology, tis: list[dict[str, Any]], lines: int = 30) -> dict[str, str]:
    """The tail of each failed task instance's log file, for the report of a failed run."""
    out = {}
    base = Path(topo.env["AIRFLOW_HOME"]) / "logs"
    for ti in tis:
        if ti["state"] not in ("failed", "up_for_retry"):
            continue
        where = f"task_id={ti['task_id']}"
        if ti["map_index"] >= 0:
            where += f"/map_index={ti['map_index']}"
        files = sorted(base.rglob(f"{where}/attempt=*.log"))
        key = f"{ti['task_id']}[{ti['ticker'] or ti['map_index']}]"
        out[key] = "\n".join(_tail(f, lines) for f in files[-1:]) or "(no log file found)"
    return out


def format_summary(result: dict[str, Any]) -> str:
    lines = [
        f"run {result.get('run_id')}: {result.get('state')} "
        f"(wall time {result.get('wall_seconds', 0):.0f}s, run {result.get('run_seconds', 0):.0f}s)"
    ]
    per_worker: dict[str, list[str]] = {}
    for ti in result.get("task_instances", []):
        label = ti["task_id"].split(".")[-1] + (f"[{ti['ticker']}]" if ti["map_index"] >= 0 else "")
        per_worker.setdefault(ti["hostname"] or "(never ran)", []).append(label)
    lines.append("tasks per worker:")
    for host, labels in sorted(per_worker.items()):
        lines.append(f"  {host}: {len(labels)}  {', '.join(labels)}")
    lines.append("registry (champion alias / gate_status of each version):")
    for name, info in sorted(result.get("registry", {}).items()):
        gates = ", ".join(f"v{v}={i['gate_status']}" for v, i in sorted(info["versions"].items()))
        lines.append(f"  {name}: champion={info['aliases'].get('champion')}  {gates}")
    cleanup = result.get("cleanup")
    if cleanup is not None:
        lines.append(f"cleanup: {json.dumps(cleanup)}")
    for key, text in (result.get("failed_task_logs") or {}).items():
        lines.append(f"--- {key} ---\n{text}")
    return "\n".join(lines)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _ticker_arg(raw: str) -> tuple[str, str, str]:
    ticker, _, asset_class = raw.partition(":")
    if not asset_class:
        raise argparse.ArgumentTypeError(f"{raw!r}: use TICKER:ASSET_CLASS, e.g. SPY:etf")
    return ticker, asset_class, ticker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tickers", nargs="+", type=_ticker_arg, default=list(DEFAULT_TICKERS),
        metavar="TICKER:CLASS", help="universe to run (default: GOOGL:stock SPY:etf EURUSD=X:forex SOL-USD:crypto)",
    )  # fmt: skip
    parser.add_argument("--logical-date", default=LOGICAL_DATE)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds for start-up + run")
    parser.add_argument("--keep", action="store_true", help="leave it all running (no cleanup)")
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--concurrency", type=int, default=2, help="per Celery worker")
    parser.add_argument("--no-triggerer", action="store_true")
    parser.add_argument(
        "--scheduled-runs", action="store_true", help="let the scheduler create cron runs too"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument(
        "--stop", type=Path, default=None, metavar="STATE_DIR",
        help="tear down a topology left running by --keep (processes, databases, Redis keys, dir)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.stop:
        report = Topology.from_manifest(args.stop).cleanup()
        print(json.dumps(report))
        return 0 if not report["errors"] and not report.get("leftover_pids") else 1
    reason = services_available()
    if reason:
        print(f"cannot start: {reason}", file=sys.stderr)
        return 2
    # `kill <pid>` of this script still cleans up (run_topology's `finally`).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    result = run_topology(
        args.tickers,
        logical_date=args.logical_date,
        timeout=args.timeout,
        keep=args.keep,
        state_dir=args.state_dir,
        worker_concurrency=args.concurrency,
        with_triggerer=not args.no_triggerer,
        scheduled_runs=args.scheduled_runs,
    )
    print()
    print(format_summary(result))
    if args.keep:
        print(f"Airflow UI : {result['airflow_url']}  (login: admin / {result['admin_password']})")
        print(f"MLflow UI  : {result['mlflow_url']}  (login: {' / '.join(result['mlflow_login'])})")
        print(f"logs       : {result['state_dir']}/logs")
        print(f"stop with  : {sys.executable} {__file__} --stop {result['state_dir']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0 if result.get("state") == "success" else 1


if __name__ == "__main__":
    raise SystemExit(main())
