"""A LocalExecutor whose worker processes import the heavy libraries once, before any task.

Airflow's LocalExecutor forks each task from one of its long-lived worker processes. Stock workers
hold only Airflow, so every task process imports TensorFlow, MLflow and Great Expectations again:
seconds per task, more than these small models take to train. Here each worker imports them once
at start; the forked task processes inherit the modules (copy-on-write) and start at once.

Nothing else changes: tasks still run in their own process, under Airflow's supervisor. Only
modules are imported in the worker; no TensorFlow session or thread pool is created before the
fork. Use it with `AIRFLOW__CORE__EXECUTOR=preloading_executor.PreloadingLocalExecutor` (this
folder is Airflow's plugins folder, which Airflow puts on sys.path); `PRELOAD_MODULES` lists the
modules (comma-separated).
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import time

from airflow.executors import local_executor
from airflow.executors.local_executor import LocalExecutor

DEFAULT_PRELOAD = (
    "pandas,pyarrow,tensorflow,keras,mlflow,mlflow.pyfunc,great_expectations,yfinance,ml.pipeline"
)


def _preload(modules: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    started = time.monotonic()
    for name in filter(None, (m.strip() for m in modules.split(","))):
        try:
            importlib.import_module(name)
        except Exception as exc:  # a missing optional module must not take the executor down
            print(f"preloading_executor: could not import {name}: {exc}", flush=True)
    print(
        f"preloading_executor: worker {os.getpid()} preloaded [{modules}] "
        f"in {time.monotonic() - started:.1f}s",
        flush=True,
    )


def _run_preloaded_worker(**kwargs) -> None:
    _preload(os.environ.get("PRELOAD_MODULES", DEFAULT_PRELOAD))
    local_executor._run_worker(**kwargs)


class PreloadingLocalExecutor(LocalExecutor):
    """LocalExecutor with heavy imports done once per worker process."""

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
        self.workers[process.pid] = process
