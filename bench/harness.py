"""A private embedded stack for one benchmark scenario: MLflow server + Airflow standalone.

The environment is the one `scripts/stack.py` gives `make demo` (its `stack_env()`, loaded with
STACK_STATE_DIR pointing at a temp folder and free ports), plus:
- free ports for the worker and triggerer log servers (a running demo stack holds 8793/8794);
- `simple_auth_manager_all_admins`, so the bench drives the REST API without a login; it changes
  who may call the API, nothing about scheduling or execution;
- the scenario's pipeline settings (universe file, history start, ...).

Every process the stack starts is stopped in `stop()`: the process groups of the standalone and
MLflow servers, every descendant seen (task processes run in their own process groups), and any
process left whose environment carries this stack's private AIRFLOW_HOME.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from benchlib import ROOT
from memory import MemorySampler
from records import DAG_ID

from ml.config import without_pipeline_env
from ml.servers import MlflowServer, free_port, start_mlflow_server, wait_for_http

# The stack's own settings, cleared with the pipeline's (ml.config.PIPELINE_ENV) before loading it.
_STACK_ENV = {"STACK_STATE_DIR", "AIRFLOW_PORT", "MLFLOW_PORT"}


def _load_stack_module(state: Path, airflow_port: int, mlflow_port: int) -> Any:
    """scripts/stack.py, evaluated with this stack's STATE and ports (a fresh module object)."""
    saved = dict(os.environ)
    try:
        keep = without_pipeline_env(os.environ)
        for key in list(os.environ):
            if key not in keep or key in _STACK_ENV:
                del os.environ[key]
        os.environ.update(
            STACK_STATE_DIR=str(state),
            AIRFLOW_PORT=str(airflow_port),
            MLFLOW_PORT=str(mlflow_port),
        )
        name = f"_bench_stack_{abs(hash(str(state)))}"
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "stack.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.BENCH_ENV = module.stack_env()  # reads the ports and os.environ now
        return module
    finally:
        os.environ.clear()
        os.environ.update(saved)


@dataclass
class Stack:
    """One private stack under `state` (a temp folder)."""

    state: Path
    settings_env: dict[str, str] = field(default_factory=dict)
    log: Any = print
    airflow_port: int = 0
    mlflow_port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    standalone: subprocess.Popen | None = None
    mlflow: MlflowServer | None = None
    sampler: MemorySampler | None = None
    startup_seconds: float = 0.0
    _stack_module: Any = None

    def __post_init__(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        ports: set[int] = set()
        while len(ports) < 4:
            ports.add(free_port())
        self.airflow_port, self.mlflow_port, worker_logs, trigger_logs = sorted(ports)
        module = _load_stack_module(self.state, self.airflow_port, self.mlflow_port)
        self._stack_module = module
        env = dict(module.BENCH_ENV)
        env.update(
            AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(worker_logs),
            AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(trigger_logs),
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="true",
            PRICE_SOURCE="synthetic",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.settings_env)
        self.env = env

    # --- paths ------------------------------------------------------------------------------------

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
    def api(self) -> str:
        return f"http://127.0.0.1:{self.airflow_port}/api/v2"

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self, timeout: float = 900) -> None:
        started = time.perf_counter()
        logs = self.state / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log(
            f"  stack {self.state.name}: MLflow :{self.mlflow_port}, Airflow :{self.airflow_port}"
        )
        with open(logs / "airflow-migrate.log", "wb") as fh:
            subprocess.run(
                [str(self._stack_module.BIN / "airflow"), "db", "migrate"],
                env=self.env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=timeout,
            )
        self.mlflow = start_mlflow_server(
            f"sqlite:///{self.state / 'mlflow' / 'mlflow.db'}",
            self.artifacts_dir,
            logs / "mlflow.log",
            port=self.mlflow_port,
            timeout=timeout,
        )
        log = open(logs / "airflow-standalone.log", "ab")  # noqa: SIM115 - lives with the process
        self.standalone = subprocess.Popen(
            [str(self._stack_module.BIN / "airflow"), "standalone"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.state,
        )
        log.close()
        self.sampler = MemorySampler([self.standalone.pid, self.mlflow.process.pid])
        self.sampler.start()
        wait_for_http(f"{self.api}/version", timeout, self.standalone)
        for name, (slots, description) in self._stack_module.POOLS.items():
            body = {"name": name, "slots": slots, "description": description}
            try:
                self.call("POST", "/pools", body)
            except urllib.error.HTTPError as exc:
                if exc.code != 409:
                    raise
                self.call("PATCH", f"/pools/{name}", body)
        self._wait_for_dag(timeout)
        self.startup_seconds = time.perf_counter() - started

    def _wait_for_dag(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.standalone is not None and self.standalone.poll() is not None:
                raise RuntimeError(f"airflow standalone exited; see {self.state / 'logs'}")
            try:
                self.call("GET", f"/dags/{DAG_ID}")
                return
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    raise
            time.sleep(2)
        errors = self.call("GET", "/importErrors")
        raise RuntimeError(f"{DAG_ID} was not parsed within {timeout:.0f}s: {errors}")

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

    def stop(self) -> None:
        """Stop everything this stack started (see the module docstring)."""
        import psutil

        if self.sampler is not None:
            self.sampler.stop_event.set()
        # Only live processes found now (never pids remembered from earlier: they may be reused).
        procs = [p for p in (self.standalone, self.mlflow and self.mlflow.process) if p]
        roots = [p.pid for p in procs if p.poll() is None]
        pids: set[int] = set(roots)
        for root in roots:
            with contextlib.suppress(psutil.Error):
                pids.update(c.pid for c in psutil.Process(root).children(recursive=True))
        pids.update(self._processes_of_this_home())
        pids.discard(os.getpid())
        for root in roots:
            with contextlib.suppress(OSError):
                os.killpg(root, signal.SIGTERM)  # start_new_session: the group id is the pid
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            for proc in (self.standalone, self.mlflow and self.mlflow.process):
                if proc:
                    with contextlib.suppress(Exception):
                        proc.poll()  # reap our direct children
            time.sleep(0.5)
        leftover = {p for p in pids if _alive(p)} | self._processes_of_this_home()
        for pid in leftover:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for proc in (self.standalone, self.mlflow and self.mlflow.process):
            if proc:
                with contextlib.suppress(Exception):
                    proc.wait(timeout=10)

    def _processes_of_this_home(self) -> set[int]:
        """Processes whose environment has this stack's AIRFLOW_HOME or DATA_DIR (orphans), and
        the MLflow server whose command line names its state folder (also when `start` was
        interrupted before it could record the server)."""
        import psutil

        marks = {f"AIRFLOW_HOME={self.env['AIRFLOW_HOME']}", f"DATA_DIR={self.env['DATA_DIR']}"}
        state = str(self.state) + os.sep
        found: set[int] = set()
        me = os.getpid()
        for proc in psutil.process_iter(["pid"]):
            if proc.pid == me:
                continue
            try:
                raw = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
                cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            in_state = state in cmdline and "mlflow" in cmdline  # this stack's MLflow server
            if in_state or any(item.decode(errors="replace") in marks for item in raw):
                found.add(proc.pid)
        return found

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
        self.call(
            "POST",
            f"/dags/{DAG_ID}/dagRuns",
            {"dag_run_id": run_id, "logical_date": logical_date.isoformat(), "conf": conf},
        )

    def run_state(self, run_id: str) -> str | None:
        try:
            return self.call("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}").get("state")
        except (urllib.error.URLError, OSError, json.JSONDecodeError):
            return None

    def wait(self, run_id: str, timeout: float, poll: float = 2.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.standalone is not None and self.standalone.poll() is not None:
                raise RuntimeError(f"airflow standalone exited; see {self.state / 'logs'}")
            state = self.run_state(run_id)
            if state in ("success", "failed"):
                return state
            time.sleep(poll)
        raise TimeoutError(f"{run_id} did not finish within {timeout:.0f}s")

    def foreign_runs(self, mine: set[str]) -> list[str]:
        """Runs of the DAG that the bench did not trigger (e.g. a schedule tick passed)."""
        runs = self.call("GET", f"/dags/{DAG_ID}/dagRuns?limit=100").get("dag_runs", [])
        return [r["dag_run_id"] for r in runs if r["dag_run_id"] not in mine]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
