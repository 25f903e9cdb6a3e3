"""Runs plugins/preloading_executor.py against the installed Airflow; writes what it saw as JSON.

Run by tests/test_preloading_executor.py in a subprocess with its own AIRFLOW_HOME (Airflow reads
its configuration and sets up logging once per process, and the live check needs a process that
has not imported TensorFlow). Usage: `python preloading_probe.py contract|live OUT.json`.

contract: with `multiprocessing.Process` replaced by a recorder (nothing is started), what the
  stock LocalExecutor and the PreloadingLocalExecutor spawn from `start()` (fork) and from
  `_check_workers()` (spawn start method): each process's target and keyword arguments, the
  arguments written as the executor attribute they are (`self.activity_queue`) where they are
  one. Then the executor's own guards: the module loaded again on a LocalExecutor with parts
  removed or changed must raise PreloadingExecutorIncompatible.
live: the real PreloadingLocalExecutor(parallelism=1), `start()`ed as the scheduler does; waits
  for its worker's preload report (PRELOAD_REPORT_DIR), reads the worker's /proc/<pid>/maps, then
  `end()` and `terminate()`, and which worker processes are left.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import multiprocessing
import os
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "preloading_executor.py"
LIVE_TIMEOUT = float(os.environ.get("PRELOAD_PROBE_TIMEOUT", "120"))


def load_plugin(name: str = "preloading_executor") -> ModuleType:
    """The plugin module from its file, as Airflow's plugins folder on sys.path would give it."""
    spec = importlib.util.spec_from_file_location(name, PLUGIN)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _error(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc)}


# --- contract --------------------------------------------------------------------------------


class RecordingProcess:
    """Stands in for multiprocessing.Process: records what would be started, starts nothing."""

    started: ClassVar[list[RecordingProcess]] = []
    next_pid = 900_000

    def __init__(self, target=None, kwargs=None, **rest: Any) -> None:
        self.target, self.kwargs, self.rest = target, dict(kwargs or {}), rest
        self.pid: int | None = None

    def start(self) -> None:
        RecordingProcess.next_pid += 1
        self.pid = RecordingProcess.next_pid
        RecordingProcess.started.append(self)

    def is_alive(self) -> bool:
        return False

    def join(self, timeout: float | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def _describe(process: RecordingProcess, executor: Any) -> dict[str, Any]:
    def arg(value: Any) -> str:
        if isinstance(value, str) and value == executor.log.name:
            return "self.log.name"
        for attr, own in vars(executor).items():
            if own is value:
                return f"self.{attr}"
        return repr(value)

    target = process.target
    return {
        "target": f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}",
        "kwargs": {k: arg(v) for k, v in sorted(process.kwargs.items())},
        "other_args": sorted(process.rest),
        "pid_in_workers": executor.workers.get(process.pid) is process,
    }


def _spawns(executor_cls: type, parallelism: int = 2) -> dict[str, Any]:
    """What `start()` (fork) and `_check_workers()` (spawn start method) of a fresh executor
    start; any exception as {"error": ...}."""
    out: dict[str, Any] = {}
    executor = executor_cls(parallelism=parallelism)
    try:
        RecordingProcess.started = []
        executor.is_mp_using_fork = True
        executor.start()
        out["start_fork"] = [_describe(p, executor) for p in RecordingProcess.started]
        executor.end()

        RecordingProcess.started = []
        executor.is_mp_using_fork = False
        executor.start()
        out["start_spawn"] = [_describe(p, executor) for p in RecordingProcess.started]
        # One workload waiting (as _process_workloads leaves it): _check_workers adds a worker.
        with executor._unread_messages:
            executor._unread_messages.value = 1
        executor.activity_queue.put(None)
        executor._check_workers()
        out["check_workers_spawn"] = [_describe(p, executor) for p in RecordingProcess.started]
        executor.end()
    except Exception as exc:
        out["error"] = _error(exc)
        out["traceback"] = traceback.format_exc()
    return out


def _guard(break_airflow, exercise=None) -> dict[str, str] | None:
    """Break Airflow's LocalExecutor with `break_airflow(local_executor)` (returns an undo), load
    the plugin afresh and, with `exercise`, run `exercise(executor)` on a new
    PreloadingLocalExecutor (then `end()` it); the exception raised, or None."""
    from airflow.executors import local_executor

    undo = break_airflow(local_executor)
    try:
        module = load_plugin("preloading_executor_guard")
        if exercise:
            executor = module.PreloadingLocalExecutor(parallelism=1)
            try:
                exercise(executor)
            finally:
                executor.end()
        return None
    except Exception as exc:
        return _error(exc)
    finally:
        undo()
        sys.modules.pop("preloading_executor_guard", None)


def _start_fork(executor: Any) -> None:
    executor.is_mp_using_fork = True
    executor.start()


def _start_spawn_and_sync(executor: Any) -> None:
    """Start with the spawn start method (no worker yet), one workload waiting, then sync()."""
    executor.is_mp_using_fork = False
    executor.start()
    with executor._unread_messages:
        executor._unread_messages.value = 1
    executor.activity_queue.put(None)
    executor.sync()


def _replace(owner: Any, name: str, value: Any):
    """Set (or with value None, delete) owner.name; returns the undo."""
    had = name in vars(owner)
    old = vars(owner).get(name)
    if value is None:
        delattr(owner, name)
    else:
        setattr(owner, name, value)

    def undo() -> None:
        if had:
            setattr(owner, name, old)
        elif hasattr(owner, name):
            delattr(owner, name)

    return undo


def contract() -> dict[str, Any]:
    import airflow
    from airflow.executors import local_executor
    from airflow.executors.local_executor import LocalExecutor

    result: dict[str, Any] = {"airflow": airflow.__version__}
    spawn = getattr(LocalExecutor, "_spawn_worker", None)
    run = getattr(local_executor, "_run_worker", None)
    result["spawn_worker_signature"] = str(inspect.signature(spawn)) if spawn else None
    result["run_worker_signature"] = str(inspect.signature(run)) if run else None
    result["run_worker_parameters"] = list(inspect.signature(run).parameters) if run else None
    real_process = multiprocessing.Process
    multiprocessing.Process = RecordingProcess  # both modules look it up at call time
    try:
        result["stock"] = _spawns(LocalExecutor)
        try:
            plugin = load_plugin()
        except Exception as exc:
            result["import_error"] = _error(exc)
            return result
        result["import_error"] = None
        result["plugin_run_worker_parameters"] = list(plugin.RUN_WORKER_PARAMETERS)
        result["preloading"] = _spawns(plugin.PreloadingLocalExecutor)

        def spawn_without_override(executor: Any, spawn_number: int) -> None:
            for _ in range(spawn_number):
                LocalExecutor._spawn_worker(executor)

        def check_workers_without_override(executor: Any) -> None:
            LocalExecutor._spawn_worker(executor)

        def run_worker_with_new_arg(logger_name, input, output, unread_messages, team_conf, new):
            pass

        result["guards"] = {
            "_spawn_worker removed": _guard(
                lambda le: _replace(le.LocalExecutor, "_spawn_worker", None)
            ),
            "_spawn_worker takes an argument": _guard(
                lambda le: _replace(le.LocalExecutor, "_spawn_worker", lambda self, n: None)
            ),
            "_run_worker removed": _guard(lambda le: _replace(le, "_run_worker", None)),
            "_run_worker takes a new argument": _guard(
                lambda le: _replace(le, "_run_worker", run_worker_with_new_arg)
            ),
            "start() spawns without _spawn_worker": _guard(
                lambda le: _replace(
                    le.LocalExecutor, "_spawn_workers_with_gc_freeze", spawn_without_override
                ),
                _start_fork,
            ),
            "sync() spawns without _spawn_worker": _guard(
                lambda le: _replace(
                    le.LocalExecutor, "_check_workers", check_workers_without_override
                ),
                _start_spawn_and_sync,
            ),
            # The control: nothing broken, both paths run and raise nothing.
            "nothing changed, start() (fork)": _guard(lambda le: lambda: None, _start_fork),
            "nothing changed, sync() (spawn)": _guard(
                lambda le: lambda: None, _start_spawn_and_sync
            ),
        }
    finally:
        multiprocessing.Process = real_process
    return result


# --- live ------------------------------------------------------------------------------------


def _proc_start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks): tells a pid from its reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def live(report_dir: Path) -> dict[str, Any]:
    plugin = load_plugin()
    result: dict[str, Any] = {
        "parent_pid": os.getpid(),
        "tensorflow_in_parent_before": "tensorflow" in sys.modules,
        "preload": os.environ.get("PRELOAD_MODULES", plugin.DEFAULT_PRELOAD),
        "default_preload": plugin.DEFAULT_PRELOAD,
        "default_warmup": plugin.DEFAULT_WARMUP,
    }
    executor = plugin.PreloadingLocalExecutor(parallelism=1)
    result["mp_start_method"] = multiprocessing.get_start_method()
    executor.start()
    try:
        workers = {pid: proc for pid, proc in executor.workers.items()}
        result["workers"] = sorted(workers)
        result["start_times"] = {str(pid): _proc_start_time(pid) for pid in workers}
        deadline = time.monotonic() + LIVE_TIMEOUT
        reports: dict[str, Any] = {}
        while time.monotonic() < deadline and len(reports) < len(workers):
            for pid, proc in workers.items():
                path = report_dir / f"{pid}.json"
                if str(pid) not in reports and path.exists():
                    reports[str(pid)] = json.loads(path.read_text())
                if not proc.is_alive():
                    reports.setdefault(str(pid), {"died": proc.exitcode})
            time.sleep(0.2)
        result["reports"] = reports
        result["alive_after_preload"] = {str(p): proc.is_alive() for p, proc in workers.items()}
        maps = {}
        for pid in workers:
            try:
                lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
            except OSError as exc:
                maps[str(pid)] = [f"unreadable: {exc}"]
                continue
            maps[str(pid)] = sorted(
                {Path(ln.split()[-1]).name for ln in lines if "/libtensorflow" in ln}
            )
        result["libtensorflow_mapped"] = maps
        # Airflow's _run_worker names the process "airflow worker -- LocalExecutor: <idle>" when it
        # waits for a workload: the worker went on from the preload into Airflow's own loop.
        titles = {}
        for pid in workers:
            while True:
                try:
                    titles[str(pid)] = (
                        Path(f"/proc/{pid}/cmdline")
                        .read_bytes()
                        .decode()
                        .replace("\0", " ")
                        .strip()
                    )
                except OSError as exc:
                    titles[str(pid)] = f"unreadable: {exc}"
                if "<idle>" in titles[str(pid)] or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        result["process_titles"] = titles
        result["tensorflow_in_parent_after_start"] = "tensorflow" in sys.modules
    finally:
        started = time.monotonic()
        executor.end()
        executor.terminate()
        result["end_seconds"] = round(time.monotonic() - started, 3)
    result["left_running"] = sorted(
        pid for pid in result["workers"] if _proc_start_time(pid) == result["start_times"][str(pid)]
    )
    result["active_children"] = [p.pid for p in multiprocessing.active_children()]
    return result


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "contract":
        result = contract()
    elif mode == "live":
        result = live(Path(os.environ["PRELOAD_REPORT_DIR"]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    out.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
