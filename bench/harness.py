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
import re
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchlib import ROOT

from ml.config import without_pipeline_env
from ml.servers import MlflowServer, free_port, start_mlflow_server, wait_for_http

DAG_ID = "price_forecast"
# The stack's own settings, cleared with the pipeline's (ml.config.PIPELINE_ENV) before loading it.
_STACK_ENV = {"STACK_STATE_DIR", "AIRFLOW_PORT", "MLFLOW_PORT"}
_TASK_TITLE = re.compile(r"airflow worker -- ([0-9a-fA-F-]{32,36})\b")
_WORKER_TITLE = "airflow worker -- LocalExecutor"  # the executor's long-lived worker processes


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


def parse_ts(value: Any) -> datetime | None:
    """A timestamp from the metadata DB (SQLite text) or the REST API, as an aware UTC datetime."""
    if value in (None, ""):
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    text = str(value).replace("Z", "+00:00").replace(" ", "T", 1)
    stamp = datetime.fromisoformat(text)
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def _status_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    with contextlib.suppress(OSError):
        private = 0
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                private += int(line.split()[1])
        out["Private"] = private
    return out


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


class MemorySampler(threading.Thread):
    """Samples every process of the stack every `interval` seconds.

    Per process: the peak resident set (VmHWM from /proc/<pid>/status, the kernel's own high-water
    mark, so it is exact as long as the process is seen once before it exits) and the peak private
    memory (Private_Clean + Private_Dirty from smaps_rollup, i.e. USS, sampled). A task process is
    recognised by the title Airflow's task runner gives it, `airflow worker -- <task instance id>`.
    Also the peak of the summed RSS of all stack processes.
    """

    def __init__(self, roots: list[int], interval: float = 1.0) -> None:
        super().__init__(daemon=True, name="memory-sampler")
        self.roots = roots
        self.interval = interval
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.by_pid: dict[int, dict[str, Any]] = {}
        self.peak_total_kb = 0
        self.seen: set[int] = set()

    def _processes(self) -> list[int]:
        import psutil

        pids: list[int] = []
        for root in self.roots:
            try:
                proc = psutil.Process(root)
                pids.append(root)
                pids.extend(p.pid for p in proc.children(recursive=True))
            except psutil.Error:
                continue
        return pids

    def sample(self) -> None:
        total = 0
        for pid in self._processes():
            kb = _status_kb(pid)
            if not kb:
                continue
            title = _cmdline(pid)
            total += kb.get("VmRSS", 0)
            with self.lock:
                self.seen.add(pid)
                rec = self.by_pid.setdefault(
                    pid, {"hwm_kb": 0, "private_kb": 0, "ti_id": None, "title": title}
                )
                rec["hwm_kb"] = max(rec["hwm_kb"], kb.get("VmHWM", 0))
                rec["private_kb"] = max(rec["private_kb"], kb.get("Private", 0))
                match = _TASK_TITLE.search(title)
                if match:
                    rec["ti_id"] = match.group(1).replace("-", "").lower()
                    rec["title"] = title
                elif title.startswith(_WORKER_TITLE) and not _cmdline(_ppid(pid)).startswith(
                    _WORKER_TITLE
                ):
                    # (a task process keeps its parent worker's title until the task runner
                    # renames it: a worker is one whose parent is not a worker)
                    rec["worker"] = True
        with self.lock:
            self.peak_total_kb = max(self.peak_total_kb, total)

    def run(self) -> None:
        while not self.stop_event.is_set():
            with contextlib.suppress(Exception):
                self.sample()
            self.stop_event.wait(self.interval)

    def by_task_instance(self) -> dict[str, dict[str, int]]:
        """{task instance id (hex, no dashes): peak hwm/private kB over its processes}."""
        out: dict[str, dict[str, int]] = {}
        with self.lock:
            for rec in self.by_pid.values():
                if rec["ti_id"]:
                    cur = out.setdefault(rec["ti_id"], {"hwm_kb": 0, "private_kb": 0})
                    cur["hwm_kb"] = max(cur["hwm_kb"], rec["hwm_kb"])
                    cur["private_kb"] = max(cur["private_kb"], rec["private_kb"])
        return out

    def workers(self) -> list[dict[str, int]]:
        """Peak memory of the executor's worker processes (the parents the tasks fork from)."""
        with self.lock:
            return [
                {"pid": pid, "hwm_kb": r["hwm_kb"], "private_kb": r["private_kb"]}
                for pid, r in self.by_pid.items()
                if r.get("worker") and not r["ti_id"]
            ]

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the live processes of the stack."""
        import psutil

        total = 0.0
        for pid in self._processes():
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
        return total

    def reset_peak_total(self) -> None:
        with self.lock:
            self.peak_total_kb = 0


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

    # --- metadata DB (read-only) ------------------------------------------------------------------

    def _query(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        db = self.airflow_home / "airflow.db"
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
        try:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute(sql, args).fetchall()]
        finally:
            conn.close()

    def dag_run(self, run_id: str) -> dict[str, Any]:
        rows = self._query(
            "SELECT run_id, state, queued_at, start_date, end_date FROM dag_run "
            "WHERE dag_id = ? AND run_id = ?",
            (DAG_ID, run_id),
        )
        return rows[0] if rows else {}

    def task_instances(self, run_id: str) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT id, task_id, map_index, rendered_map_index, state, try_number, start_date, "
            "end_date, duration, queued_dttm, scheduled_dttm, pid FROM task_instance "
            "WHERE dag_id = ? AND run_id = ?",
            (DAG_ID, run_id),
        )
        for row in rows:
            row["id"] = str(row["id"]).replace("-", "").lower()
        return rows

    def xcom(
        self, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1
    ) -> Any:
        """One XCom value of a run (None if absent); Airflow stores it as JSON text."""
        rows = self._query(
            "SELECT value FROM xcom WHERE dag_id = ? AND run_id = ? AND task_id = ? AND key = ? "
            "AND map_index = ?",
            (DAG_ID, run_id, task_id, key, map_index),
        )
        value = rows[0]["value"] if rows else None
        while isinstance(value, str | bytes):  # JSON column holding the serialized value
            try:
                value = json.loads(value)
            except ValueError:
                break
        return value

    # --- MLflow (REST, and the artifact folder this stack owns) -----------------------------------

    def mlflow_runs(self, experiment: str = "price-forecast") -> list[dict[str, Any]]:
        def post(path: str, body: dict) -> dict:
            req = urllib.request.Request(
                f"{self.mlflow_uri}/api/2.0/mlflow/{path}",
                data=json.dumps(body).encode(),
                method="POST",
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.loads(resp.read().decode() or "{}")

        try:
            url = f"{self.mlflow_uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}"
            with urllib.request.urlopen(url, timeout=60) as resp:
                exp_id = json.loads(resp.read().decode())["experiment"]["experiment_id"]
        except (urllib.error.URLError, KeyError, json.JSONDecodeError):
            return []
        runs: list[dict[str, Any]] = []
        token = None
        while True:
            body: dict[str, Any] = {"experiment_ids": [exp_id], "max_results": 1000}
            if token:
                body["page_token"] = token
            page = post("runs/search", body)
            for run in page.get("runs", []):
                info = run["info"]
                tags = {t["key"]: t["value"] for t in run.get("data", {}).get("tags", [])}
                summary = self.artifacts_dir / exp_id / info["run_id"] / "artifacts"
                fit = None
                with contextlib.suppress(OSError, ValueError, KeyError):
                    payload = json.loads((summary / "training_summary.json").read_text())
                    fit = sum(float(c["seconds"]) for c in payload["candidates"])
                runs.append(
                    {
                        "run_id": info["run_id"],
                        "ticker": tags.get("ticker"),
                        "logical_date": tags.get("logical_date"),
                        "start": datetime.fromtimestamp(int(info["start_time"]) / 1000, UTC),
                        "end": datetime.fromtimestamp(int(info["end_time"]) / 1000, UTC)
                        if info.get("end_time")
                        else None,
                        "fit_seconds": fit,
                    }
                )
            token = page.get("next_page_token")
            if not token:
                return runs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def latest_tick(now: datetime | None = None) -> datetime:
    """The DAG's latest 22:30 UTC schedule tick (as scripts/stack.py computes it)."""
    now = now or datetime.now(UTC)
    tick = now.replace(hour=22, minute=30, second=0, microsecond=0)
    return tick if tick <= now else tick - timedelta(days=1)
