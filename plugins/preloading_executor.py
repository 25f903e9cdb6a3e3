"""A LocalExecutor whose worker processes import the heavy libraries once, before any task.

Airflow's LocalExecutor forks each task from one of its long-lived worker processes. Stock workers
hold only Airflow, so every task process imports TensorFlow, MLflow and Great Expectations again:
seconds per task, more than these small models take to train. Here each worker imports them once
at start; the forked task processes inherit the modules (copy-on-write) and start at once.

Nothing else changes: tasks still run in their own process, under Airflow's supervisor. Only
modules are imported and plain caches filled in the worker; no TensorFlow session or thread pool
is created before the fork. Use it with
`AIRFLOW__CORE__EXECUTOR=preloading_executor.PreloadingLocalExecutor` (this folder is Airflow's
plugins folder, which Airflow puts on sys.path); `PRELOAD_MODULES` lists the
modules (comma-separated) and `PRELOAD_WARMUP` the functions (`module:function`) each worker then
calls once to fill caches that every task would otherwise fill again (each must be safe before a
fork: no threads); by default the steps' lazy imports, MLflow's caches and a first run of the DAG
files (`run_dag_files`). What the preload made is then frozen out of the garbage collector's
walks (`gc.freeze`), so a full collection in a task does not walk the inherited libraries. When
`PRELOAD_REPORT_DIR` names a folder, each worker writes `<pid>.json` there once its imports are
done (the modules asked for, those now in its `sys.modules`, the warm-ups run, those that failed
and why, the objects frozen): how tests/test_preloading_executor.py sees it.

It overrides a private method of Airflow's LocalExecutor, `_spawn_worker` (through which `start()`
and `sync()` create every worker), and calls the private `local_executor._run_worker` with the
stock keyword arguments. Both are checked when this module is imported, and every worker the
executor holds after `start()` and `sync()` must have come through the override: if an Airflow
upgrade changes either, the executor raises `PreloadingExecutorIncompatible` naming the Airflow
version, instead of quietly running workers without the preload (or crashing them).
"""

from __future__ import annotations

import importlib
import inspect
import json
import multiprocessing
import os
import sys
import time

import airflow
from airflow.executors import local_executor
from airflow.executors.local_executor import LocalExecutor

DEFAULT_PRELOAD = (
    "pandas,pyarrow,tensorflow,keras,mlflow,mlflow.pyfunc,great_expectations,yfinance,"
    "ml.steps.data,ml.steps.model,ml.steps.forecast"
)
# Called once after the imports, as `module:function`, comma-separated: the modules the steps
# import inside their functions, and caches every task would otherwise fill again in its own
# process. Each must be safe before a fork (no threads).
DEFAULT_WARMUP = (
    "ml.steps.common:import_step_modules,ml.registry.client:warm_caches,"
    "preloading_executor:run_dag_files"
)
REPORT_DIR_ENV = "PRELOAD_REPORT_DIR"
# The parameters of local_executor._run_worker, all passed by name by _spawn_worker (Airflow 3.3).
RUN_WORKER_PARAMETERS = ("logger_name", "input", "output", "unread_messages", "team_conf")


class PreloadingExecutorIncompatible(RuntimeError):
    """This Airflow's LocalExecutor no longer works the way the override relies on."""

    def __init__(self, problem: str) -> None:
        super().__init__(
            f"preloading_executor.PreloadingLocalExecutor does not fit Airflow "
            f"{airflow.__version__}: {problem}. It would start workers without the preload, or "
            "broken ones: update plugins/preloading_executor.py (tests/test_preloading_executor.py "
            "pins what it relies on) or set AIRFLOW__CORE__EXECUTOR=LocalExecutor."
        )


def check_compatible() -> None:
    """Raise PreloadingExecutorIncompatible unless LocalExecutor still has the private parts the
    override relies on, unchanged."""
    spawn = getattr(LocalExecutor, "_spawn_worker", None)
    if not callable(spawn):
        raise PreloadingExecutorIncompatible("LocalExecutor._spawn_worker is gone")
    if list(inspect.signature(spawn).parameters) != ["self"]:
        raise PreloadingExecutorIncompatible(
            f"LocalExecutor._spawn_worker is now {spawn.__name__}{inspect.signature(spawn)}, "
            "was (self)"
        )
    run = getattr(local_executor, "_run_worker", None)
    if not callable(run):
        raise PreloadingExecutorIncompatible("airflow.executors.local_executor._run_worker is gone")
    if tuple(inspect.signature(run).parameters) != RUN_WORKER_PARAMETERS:
        raise PreloadingExecutorIncompatible(
            f"local_executor._run_worker is now _run_worker{inspect.signature(run)}, "
            f"was _run_worker({', '.join(RUN_WORKER_PARAMETERS)})"
        )


check_compatible()


def _comma_list(text: str) -> list[str]:
    return [item for item in (part.strip() for part in text.split(",")) if item]


def _freeze_heap() -> int:
    """Collect, then move every object the preload made to the collector's permanent generation
    (`gc.freeze`); returns how many there are.

    The preload leaves about 640,000 objects (TensorFlow, MLflow, GX, pandas) in the worker (an
    embedded-stack worker reports about 820,000 frozen, with the scheduler's own that Airflow
    froze before forking it), and every task process forked from it inherits them. Without this, a full collection in a task
    (the collector runs one once enough new objects have survived: a train task's graph trace
    or a batch step's frames are enough, now and then) walks all of them, a large share of a
    short task (BENCHMARKS.md, "History"), and it writes to every page it
    walks, which copies the pages the fork shared. Frozen objects are never walked; what a task
    allocates itself is still collected. Airflow's LocalExecutor does the same for the
    scheduler's objects before it forks its workers (`_spawn_workers_with_gc_freeze`); the
    preload happens after that fork, so its objects need their own freeze.
    """
    import gc

    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _preload(modules: str, warmup: str = "") -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    started = time.monotonic()
    names = _comma_list(modules)
    failed: dict[str, str] = {}
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a missing optional module must not take the executor down
            failed[name] = f"{type(exc).__name__}: {exc}"
            print(f"preloading_executor: could not import {name}: {exc}", flush=True)
    warmed: list[str] = []
    for call in _comma_list(warmup):
        module, _, function = call.partition(":")
        try:
            getattr(importlib.import_module(module), function)()
            warmed.append(call)
        except Exception as exc:  # a warm-up that fails costs time in the tasks, nothing else
            failed[call] = f"{type(exc).__name__}: {exc}"
            print(f"preloading_executor: warm-up {call} failed: {exc}", flush=True)
    frozen = _freeze_heap()
    seconds = time.monotonic() - started
    print(
        f"preloading_executor: worker {os.getpid()} preloaded [{modules}], warmed "
        f"[{', '.join(warmed)}] in {seconds:.1f}s; {frozen} objects frozen",
        flush=True,
    )
    if folder := os.environ.get(REPORT_DIR_ENV):
        report = {
            "pid": os.getpid(),
            "requested": names,
            "in_sys_modules": [n for n in names if n in sys.modules],
            "warmed": warmed,
            "failed": failed,
            "gc_frozen": frozen,
            "seconds": round(seconds, 3),
        }
        path = os.path.join(folder, f"{os.getpid()}.json")
        with open(path + ".tmp", "w") as fh:
            json.dump(report, fh)
        os.replace(path + ".tmp", path)


def run_dag_files() -> list[str]:
    """Run each DAG file of the DAGs folder once, as every task process does first (it parses
    its DAG file before it runs the task). The modules the files import (Airflow's decorators,
    operators, timetables) and the caches their DAG definitions fill are then in the worker,
    and each task forked from it parses its DAG file in a fraction of the time. A DAG file only
    defines DAGs: nothing started, no threads. Returns the files run."""
    import runpy
    from pathlib import Path

    from airflow.configuration import conf

    folder = Path(conf.get("core", "dags_folder"))
    ran: list[str] = []
    for path in sorted(folder.glob("*.py")) if folder.is_dir() else ():
        runpy.run_path(str(path), run_name=f"preloaded_{path.stem}")
        ran.append(str(path))
    return ran


def _run_preloaded_worker(**kwargs) -> None:
    _preload(
        os.environ.get("PRELOAD_MODULES", DEFAULT_PRELOAD),
        os.environ.get("PRELOAD_WARMUP", DEFAULT_WARMUP),
    )
    local_executor._run_worker(**kwargs)


class PreloadingLocalExecutor(LocalExecutor):
    """LocalExecutor with heavy imports done once per worker process."""

    _preloading_pids: set[int]

    def start(self) -> None:
        self._preloading_pids = set()
        super().start()
        if self.is_mp_using_fork and not self._preloading_pids:
            raise PreloadingExecutorIncompatible(
                "LocalExecutor.start() no longer starts its workers through _spawn_worker"
            )
        self._check_workers_preloaded()

    def sync(self) -> None:
        super().sync()
        self._check_workers_preloaded()

    def _check_workers_preloaded(self) -> None:
        stray = sorted(set(self.workers) - self._preloading_pids)
        if stray:
            raise PreloadingExecutorIncompatible(
                f"worker process(es) {stray} were started without _spawn_worker"
            )
        self._preloading_pids &= set(self.workers)  # forget the workers Airflow reaped

    def _spawn_worker(self) -> None:
        process = multiprocessing.Process(
            target=_run_preloaded_worker,
            kwargs={
                "logger_name": self.log.name,
                "input": self.activity_queue,
                "output": self.result_queue,
                "unread_messages": self._unread_messages,
                "team_conf": self.conf,
            },
        )
        process.start()
        self._preloading_pids.add(process.pid)
        self.workers[process.pid] = process
