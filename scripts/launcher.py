"""The one launcher of Airflow + MLflow stacks: `make demo`, the native production topology, the
benchmarks and the scheduler tests all start theirs with it.

- `POOLS`: the pools every stack creates (docker/airflow-init.sh the same for compose).
- `airflow_env()`: the environment of every Airflow process of a stack (executor, metadata DB:
  SQLite in AIRFLOW_HOME or a URL, ports, secrets, dags/, plugins/, MLflow URI, pipeline defaults);
  `embedded_env()`: `make demo`'s layout (one state folder, SQLite, the preloading LocalExecutor).
- `AirflowStack`: the processes of one stack, each in its own process group: `start()` of Airflow
  components, `start_mlflow()` (ml.servers), `cli()` (retried while SQLite is locked), pools, the
  waits (API health, DAG parsed, runs finished), `stop()` of the groups, their descendants and
  anything else carrying the stack's marker, `diagnostics()`.

Airflow is never imported here (only `airflow` subprocesses are started): Airflow reads its
configuration once, at import time, from the environment of the process.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ml.config import AIRFLOW_MAX_MAP_LENGTH  # noqa: E402
from ml.servers import BasicAuth, MlflowServer, free_port, start_mlflow_server, wait_for_http  # noqa: E402

BIN = Path(sys.executable).parent
AIRFLOW = str(BIN / "airflow")
DAG_ID = "price_forecast"
# name: (slots, description). docker/airflow-init.sh creates the same with the same defaults.
POOLS: dict[str, tuple[int, str]] = {
    "price_source": (4, "concurrent requests to the price source (Yahoo rate limits)"),
    "training": (2, "concurrent model trainings (one per core)"),
}
# LocalExecutor whose workers import TensorFlow/MLflow/GX once (plugins/preloading_executor.py).
PRELOADING_EXECUTOR = "preloading_executor.PreloadingLocalExecutor"
# Every process a stack starts carries MARKER_ENV=<the stack's token>: stop() finds by it the
# processes that left their process group (task processes), also from another process.
MARKER_ENV = "PF_STACK_ID"
# Settings a caller's environment may change (make demo passes its own environment on).
TUNABLE = {
    "AIRFLOW__CORE__PARALLELISM": "4",
    "AIRFLOW__CORE__MAX_MAP_LENGTH": str(AIRFLOW_MAX_MAP_LENGTH),  # why: ml/config.py
    # A run is a chain of a few tasks: an idle scheduler loop of 1 s (the default) adds up to a
    # second to every hand-off, and a day without new bars is seven hand-offs. A tenth of a
    # second shortens that day and does not slow the full one; the scheduler uses more CPU when
    # idle, and a slower loop saves little at 500 tickers, where the loop is rarely idle (each
    # loop loads every task instance of the run). The A/B runs: BENCHMARKS.md, "History".
    "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.1",
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
    "PRICE_SOURCE": "synthetic",
}
COMMANDS = {
    "api-server": ["api-server", "--workers", "1"],  # host and port: AIRFLOW__API__HOST/PORT
    "scheduler": ["scheduler"],
    "dag-processor": ["dag-processor"],
    # Logs are on this machine's disk: no log server of its own.
    "triggerer": ["triggerer", "--skip-serve-logs"],
    "standalone": ["standalone"],  # api-server, scheduler, dag-processor, triggerer in one
}
FINISHED = ("success", "failed")


class StackError(RuntimeError):
    """A command of the stack failed, a process of it exited, or a wait ran out."""


def new_token() -> str:
    return secrets.token_hex(4)


def worker_hostname() -> str:
    """`[core] hostname_callable` of Celery workers: PF_WORKER_NAME, the name a task instance
    records as its hostname (so the metadata database shows which worker ran what)."""
    return os.environ.get("PF_WORKER_NAME") or socket.getfqdn()


def airflow_env(
    home: Path,
    *,
    api_port: int,
    mlflow_uri: str,
    data_dir: Path,
    token: str,
    executor: str = PRELOADING_EXECUTOR,
    metadata_db: str | None = None,
    base: Mapping[str, str] | None = None,
    **overrides: str,
) -> dict[str, str]:
    """The environment of the Airflow processes (and tasks) of one stack.

    `base` (default os.environ) is kept, bar what is set here; its values of TUNABLE and DATA_DIR
    win over the defaults. `metadata_db`: a SQLAlchemy URL, or None for SQLite in `home`.
    `overrides` win over everything."""
    base = os.environ if base is None else base
    api = f"http://127.0.0.1:{api_port}"
    env = {**TUNABLE, "DATA_DIR": str(data_dir), **base}
    if metadata_db is None:
        # SQLite has one writer: wait for it (plugins/airflow_sqlite.py) instead of failing.
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS"] = "airflow_sqlite.CONNECT_ARGS"
    else:
        env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = metadata_db
    env.update(
        {
            MARKER_ENV: token,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "false",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "true",
            "AIRFLOW__CORE__EXECUTOR": executor,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__API__BASE_URL": api,
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            # One key for every component; HS512 wants 64 bytes or more (PyJWT warns otherwise).
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
            # Free ports: other stacks on this machine (a running demo) hold the defaults.
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "MLFLOW_TRACKING_URI": mlflow_uri,
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "GIT_PYTHON_REFRESH": "quiet",
            # ml.registry.client.code_version runs `git status` in task processes: never let it
            # take index.lock in a working tree others are using.
            "GIT_OPTIONAL_LOCKS": "0",
            "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [base.get("PYTHONPATH")])]),
            # Airflow spawns `airflow` by name (task supervisors, serve-logs, gunicorn...).
            "PATH": f"{BIN}{os.pathsep}{base.get('PATH', '')}",
        }
    )
    env.update(overrides)
    return env


def embedded_env(
    state: Path,
    *,
    api_port: int,
    mlflow_uri: str,
    token: str,
    executor: str | None = None,
    base: Mapping[str, str] | None = None,
    **overrides: str,
) -> dict[str, str]:
    """`make demo`'s stack under `state`: AIRFLOW_HOME `airflow/` (SQLite), DATA_DIR `data/`, the
    preloading LocalExecutor (or `base`'s STACK_EXECUTOR, or `executor`)."""
    base = os.environ if base is None else base
    executor = executor or base.get("STACK_EXECUTOR") or PRELOADING_EXECUTOR
    return airflow_env(
        state / "airflow",
        api_port=api_port,
        mlflow_uri=mlflow_uri,
        data_dir=state / "data",
        token=token,
        executor=executor,
        base=base,
        **overrides,
    )


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


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return f"(no log at {path})"


def parse_json_list(output: str) -> list[dict[str, Any]]:
    """The JSON list an `airflow ... -o json` command printed (log lines may come before it)."""
    lines = output.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("["):
            for text in (lines[i], "\n".join(lines[i:])):
                with contextlib.suppress(ValueError):
                    return json.loads(text)
    return []


@dataclass
class AirflowStack:
    """The processes of one stack. `state` holds `logs/` (one log per process, `cli.log`) and is
    the processes' working directory. `pids` are processes a previous launcher process recorded
    (see `save`/`load`): stop() stops them too if they still carry the marker."""

    state: Path
    token: str = field(default_factory=new_token)
    env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    on_spawn: Callable[[], None] | None = None  # e.g. write a manifest with the new pid

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def home(self) -> Path:
        return Path(self.env["AIRFLOW_HOME"])

    @property
    def data_dir(self) -> Path:
        return Path(self.env["DATA_DIR"])

    @property
    def api_port(self) -> int:
        return int(self.env["AIRFLOW__API__PORT"])

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    # --- the CLI -------------------------------------------------------------------------------

    def cli(
        self, *args: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess:
        """`airflow <args>` to completion (logged in logs/cli.log). SQLite allows one writer: a
        command that timed out on "database is locked" rolled back and is run again (5 tries)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        for attempt in range(5):
            try:
                proc = subprocess.run(
                    [AIRFLOW, *args], env=self.env, cwd=self.state, capture_output=True,
                    text=True, timeout=timeout, check=False, start_new_session=True,
                )  # fmt: skip
            except subprocess.TimeoutExpired as exc:
                raise StackError(f"`airflow {' '.join(args)}` took over {timeout:.0f}s") from exc
            with open(self.logs / "cli.log", "a") as log:
                log.write(f"$ airflow {' '.join(args)}  # exit {proc.returncode}\n")
                log.write(f"{proc.stdout}\n{proc.stderr}\n")
            if proc.returncode == 0 or "database is locked" not in proc.stdout + proc.stderr:
                break
            time.sleep(3 * (attempt + 1))
        if check and proc.returncode != 0:
            raise StackError(
                f"`airflow {' '.join(args)}` exited {proc.returncode}:\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        return proc

    def cli_json(self, *args: str) -> list[dict[str, Any]]:
        """The list `airflow <args> -o json` prints ([] if it failed: poll again)."""
        proc = self.cli(*args, "-o", "json", check=False)
        return parse_json_list(proc.stdout) if proc.returncode == 0 else []

    def migrate(self, timeout: float = 600) -> None:
        self.cli("db", "migrate", timeout=timeout)

    def import_pools(self, pools: Mapping[str, tuple[int, str]] = POOLS) -> None:
        path = self.state / "pools.json"
        path.write_text(
            json.dumps({k: {"slots": s, "description": d} for k, (s, d) in pools.items()})
        )
        self.cli("pools", "import", str(path))

    def list_runs(self, dag_id: str = DAG_ID) -> list[dict[str, Any]]:
        return self.cli_json("dags", "list-runs", dag_id)

    def dags(self) -> dict[str, dict[str, Any]]:
        """The DAGs in the metadata DB (parsed and serialized), by id."""
        return {d["dag_id"]: d for d in self.cli_json("dags", "list")}

    def unpause(self, dag_id: str = DAG_ID) -> None:
        self.cli("dags", "unpause", dag_id)

    def trigger(
        self, run_id: str, logical_date: str | None, conf: Mapping[str, Any] | None = None,
        dag_id: str = DAG_ID,
    ) -> None:  # fmt: skip
        """Create the run `run_id`. Airflow 3 allows one run per logical date; `logical_date=None`
        creates a run without one, which never clashes (the DAG reads `as_of` or `run_after`)."""
        extra = ["--conf", json.dumps(conf)] if conf else []
        if logical_date is not None:
            extra += ["--logical-date", logical_date]
        self.cli("dags", "trigger", dag_id, "--run-id", run_id, *extra)

    # --- processes -----------------------------------------------------------------------------

    def spawn(
        self, name: str, args: list[str], env: Mapping[str, str] | None = None
    ) -> subprocess.Popen:
        """Start `airflow <args>` as `name` in its own process group, output in logs/<name>.log."""
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [AIRFLOW, *args], env={**self.env, **(env or {})}, cwd=self.state, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.processes[name] = proc
        if self.on_spawn is not None:
            self.on_spawn()
        return proc

    def start(self, *components: str) -> None:
        """Start Airflow components: api-server, scheduler, dag-processor, triggerer, standalone."""
        for name in components:
            self.spawn(name, COMMANDS[name])

    def start_mlflow(
        self, backend_store_uri: str, *, port: int | None = None, auth: BasicAuth | None = None,
        timeout: float = 120.0,
    ) -> MlflowServer:  # fmt: skip
        """An MLflow server on `backend_store_uri`, artifacts in state/mlflow/artifacts, carrying
        the marker; recorded as the process `mlflow`."""
        server = start_mlflow_server(
            backend_store_uri, self.state / "mlflow" / "artifacts", self.logs / "mlflow.log",
            port=port, timeout=timeout, auth=auth,
            env={MARKER_ENV: self.token, "MLFLOW_DISABLE_TELEMETRY": "true"},
        )  # fmt: skip
        self.processes["mlflow"] = server.process
        if self.on_spawn is not None:
            self.on_spawn()
        return server

    def check_alive(self) -> None:
        """Raise if a process this launcher started has exited."""
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise StackError(
                    f"{name} exited with code {proc.returncode}; its log ends:\n"
                    + tail(self.logs / f"{name}.log")
                )

    # --- waits ---------------------------------------------------------------------------------

    def _check(self, deadline: float, what: str) -> None:
        self.check_alive()
        if time.monotonic() > deadline:
            raise StackError(f"{what}\n{self.diagnostics()}")

    def wait_healthy(self, timeout: float = 300) -> None:
        """Until the API answers (the api-server's or standalone's process must not exit)."""
        process = self.processes.get("api-server") or self.processes.get("standalone")
        wait_for_http(f"{self.api_url}/api/v2/version", timeout=timeout, process=process)

    def wait_for_dag(self, timeout: float = 300, dag_id: str = DAG_ID) -> dict[str, Any]:
        """Until the dag-processor has put `dag_id` in the metadata DB; returns its row."""
        deadline = time.monotonic() + timeout
        while (dag := self.dags().get(dag_id)) is None:
            errors = ""
            if time.monotonic() > deadline:
                errors = self.cli("dags", "list-import-errors", check=False).stdout
            self._check(deadline, f"{dag_id} not parsed in {timeout:.0f}s:\n{errors}")
            time.sleep(3)
        return dag

    def wait_for_runs(
        self, timeout: float, *, count: int = 1, run_id: str | None = None,
        run_type: str | None = None, poll: float = 10, dag_id: str = DAG_ID,
        on_poll: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> list[dict[str, Any]]:  # fmt: skip
        """Until at least `count` runs of `dag_id` (only `run_id`, or only of `run_type`) exist
        and all have finished; returns them. `on_poll(runs)` sees each poll's runs."""
        deadline = time.monotonic() + timeout
        while True:
            runs = [
                r for r in self.list_runs(dag_id)
                if (run_id is None or r.get("run_id") == run_id)
                and (run_type is None or r.get("run_type") == run_type)
            ]  # fmt: skip
            if on_poll is not None:
                on_poll(runs)
            if len(runs) >= count and all(r.get("state") in FINISHED for r in runs):
                return runs
            self._check(deadline, f"runs of {dag_id} not finished in {timeout:.0f}s")
            time.sleep(poll)

    # --- stopping ------------------------------------------------------------------------------

    def save(self, path: Path, **extra: Any) -> None:
        """Record the token and the pids (with `extra`), for a stop() from another process."""
        pids = {**self.pids, **{n: p.pid for n, p in self.processes.items()}}
        path.write_text(json.dumps({"token": self.token, "pids": pids, **extra}, indent=2))

    @classmethod
    def load(cls, path: Path, state: Path) -> tuple[AirflowStack, dict[str, Any]]:
        """The stack `save` recorded in `path` (not started by this process), and the record."""
        record = json.loads(path.read_text())
        stack = cls(
            state, token=record["token"], pids={k: int(v) for k, v in record["pids"].items()}
        )
        return stack, record

    def leaders(self) -> dict[str, int]:
        """The process-group leaders still running: our un-reaped children, and recorded pids
        whose environment still carries our marker (a recycled pid is left alone)."""
        for proc in self.processes.values():
            proc.poll()  # reap, so that an exited leader does not look alive
        # (a leader that exited may leave its group running: server workers, task processes)
        out = {n: p.pid for n, p in self.processes.items() if _signal_group(p.pid, 0)}
        marked = set(processes_with_marker(self.token)) if self.pids else set()
        out.update({n: pid for n, pid in self.pids.items() if n not in out and pid in marked})
        return out

    def stop(self, grace: float = 30.0) -> list[int]:
        """SIGTERM every process group (the last started first) and every descendant and marked
        process; SIGKILL what is left after `grace` seconds. Returns the marked pids still alive."""
        leaders = self.leaders()
        victims = _trees([*leaders.values(), *processes_with_marker(self.token)])
        for pid in reversed(leaders.values()):
            _signal_group(pid, signal.SIGTERM)
        for proc in victims.values():
            with contextlib.suppress(Exception):
                proc.terminate()
        end = time.monotonic() + grace
        while time.monotonic() < end and any(_running(p) for p in victims.values()):
            for child in self.processes.values():
                child.poll()  # reap our direct children
            time.sleep(0.5)
        for pid in leaders.values():
            _signal_group(pid, signal.SIGKILL)
        for proc in {**victims, **_trees(processes_with_marker(self.token))}.values():
            with contextlib.suppress(Exception):
                proc.kill()
        for child in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(10)
        end = time.monotonic() + 10
        while time.monotonic() < end and processes_with_marker(self.token):
            time.sleep(0.5)
        return processes_with_marker(self.token)

    def diagnostics(self, chars: int = 3000) -> str:
        parts = [f"--- {n} ---\n{tail(self.logs / f'{n}.log', chars)}" for n in self.processes]
        runs = (
            self.cli("dags", "list-runs", DAG_ID, "-o", "json", check=False) if self.env else None
        )
        if runs is not None:
            parts.append(f"--- dags list-runs ---\n{runs.stdout[-chars:]}{runs.stderr[-chars:]}")
        return "\n".join(parts)


def _signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` (0: none) to a process group; whether the group exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _trees(pids: Iterable[int]) -> dict[int, Any]:
    """{pid: psutil.Process} of `pids` and all their descendants (not this process)."""
    import psutil

    out = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            out.update({p.pid: p for p in [proc, *proc.children(recursive=True)]})
    out.pop(os.getpid(), None)
    return out


def _running(proc: Any) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
