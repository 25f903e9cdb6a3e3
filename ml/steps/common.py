"""What every step shares: the instrument of a ticker, errors as text, the all-failed rule."""

from __future__ import annotations

import logging
import os
import pickle
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from ml.config import Settings
from ml.universe import Instrument, load_universe

if TYPE_CHECKING:
    pass


log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# Registry reads a batch step makes at once (the tracking server answers each in its own worker;
# the embedded one runs 2). Each is a few tens of ms of waiting on HTTP, so 31 of them one after
# the other were most of a day without new bars.
REGISTRY_CONCURRENCY = 4
# Processes a batch step spreads its CPU-bound per-ticker work over (GX suites in validate, Keras
# loads and predictions in forecast): the other core sits idle while these one-task steps run
# (`in_processes`). Below `FORK_MIN_ITEMS` tickers the work stays in the step's own process.
PROCESS_WORKERS = min(2, os.cpu_count() or 1)
FORK_MIN_ITEMS = 4


# What the steps import inside their functions besides the package's own modules: found by
# listing the modules a train, validate and forecast call adds to `sys.modules` in a process
# forked from one that had imported `ml.steps.*`, TensorFlow, MLflow and GX (Parquet's dataset
# reader, GitPython for MLflow's run tags, MLflow's tracing processor and request headers;
# scikit-learn's regression, which fits the `har` candidate). Each is an import every task
# process would make again.
LAZY_IMPORTS = (
    "pyarrow.parquet",
    "pyarrow.dataset",
    "pandas.core.arrays.arrow.extension_types",
    "pandas.core.methods.to_dict",
    "git",
    "netrc",
    "mlflow.models.display_utils",
    "mlflow.tracing.export.utils",
    "mlflow.tracing.processor.base_mlflow",
    "mlflow.tracing.processor.otel",
    "mlflow.tracking.request_header.registry",
    "sklearn.linear_model",
)
STEP_MODULES = ("ml.steps.data", "ml.steps.model", "ml.steps.forecast", "ml.steps.report")


def import_step_modules() -> list[str]:
    """Import every module the steps import inside their functions: the package's own (the
    import closure of `STEP_MODULES`, `ml.codebase`) and `LAZY_IMPORTS`. Returns their names.

    For a process that forks tasks (the preloading executor's workers, `PRELOAD_WARMUP`): the
    steps import lazily so that parsing the DAG file stays cheap, and a forked task would
    otherwise import each of these again. Imports only: no threads, safe before a fork.
    """
    import importlib

    from ml import codebase

    names = sorted({codebase.module_name(p) for m in STEP_MODULES for p in codebase.closure(m)})
    names += LAZY_IMPORTS
    for name in names:
        importlib.import_module(name)
    return names


class StepFailed(RuntimeError):
    """Every ticker a batch step tried failed (the task should be retried)."""


def instrument_for(ticker: str, settings: Settings) -> Instrument:
    return load_universe(settings.universe_file).get(ticker)


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def raise_if_all_failed(step: str, tried: int, failed: Mapping[str, str], strict: bool) -> None:
    if strict and tried and len(failed) == tried:
        sample = "; ".join(f"{t}: {e}" for t, e in list(failed.items())[:3])
        raise StepFailed(f"{step}: all {tried} ticker(s) failed ({sample})")


def concurrently(
    fn: Callable[[T], R], items: Iterable[T], workers: int = REGISTRY_CONCURRENCY
) -> list[tuple[T, R | None, BaseException | None]]:
    """`fn` over `items` in up to `workers` threads (for I/O: registry reads, file reads);
    (item, result, None) or (item, None, the exception) per item, in the items' order."""
    from concurrent.futures import ThreadPoolExecutor

    items = list(items)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(items)))) as pool:
        futures = [pool.submit(fn, item) for item in items]
    out: list[tuple[T, R | None, BaseException | None]] = []
    for item, future in zip(items, futures, strict=True):
        try:
            out.append((item, future.result(), None))
        except Exception as exc:
            out.append((item, None, exc))
    return out


class WorkerDied(RuntimeError):
    """A worker process of `in_processes` ended without handing back its results (killed, out
    of memory): the step fails as a whole, and Airflow's retry does it again (every step is
    idempotent)."""


def tensorflow_started() -> bool:
    """Whether this process has started TensorFlow's runtime (thread pools that a fork does not
    carry over: a forked child would hang in its first operation)."""
    if "tensorflow" not in sys.modules:
        return False
    from tensorflow.python.eager import context

    # A private flag: if a TensorFlow release renames it, take the runtime as started (the
    # work then stays in this process, which is always safe).
    return bool(getattr(context.context(), "_initialized", True))


def in_processes(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int = PROCESS_WORKERS,
) -> list[tuple[T, R | None, BaseException | None]]:
    """`fn` over `items` spread over up to `workers` processes forked from this one (for
    CPU-bound Python); (item, result, None) or (item, None, the exception) per item, in the
    items' order, as `concurrently` returns them.

    The children inherit this process's modules, caches and state (nothing is pickled on the way
    in) and hand back their results and log records through a pipe; each takes every
    `workers`-th item. They are plain `os.fork` children, not `multiprocessing` ones: a Celery
    worker's task runs in a daemonic process, which `multiprocessing` forbids to have children.
    The work stays in this process with fewer than `FORK_MIN_ITEMS` items, one worker, no
    `fork`, or when TensorFlow's runtime already runs here. A child that dies
    without answering raises WorkerDied once the others finished: no result of the step is
    trusted then.
    """
    items = list(items)
    workers = min(workers, len(items))
    if (
        workers <= 1
        or len(items) < FORK_MIN_ITEMS
        or not hasattr(os, "fork")
        or tensorflow_started()
    ):
        return [capture(fn, item) for item in items]
    sys.stdout.flush()  # a child would otherwise write this process's buffered output again
    sys.stderr.flush()
    children = [_fork_worker(fn, items[k::workers]) for k in range(workers)]
    by_index: dict[int, tuple[T, R | None, BaseException | None]] = {}
    died: list[str] = []
    for k, (pid, pipe) in enumerate(children):
        with os.fdopen(pipe, "rb") as answer:
            data = answer.read()
        exit_code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if not data:
            died.append(f"worker {k} (pid {pid}, exit code {exit_code}; items {items[k::workers]})")
            continue
        results, records = pickle.loads(data)
        for name, level, message in records:
            logging.getLogger(name).log(level, "%s", message)
        for j, result in enumerate(results):
            by_index[k + j * workers] = result
    if died:
        raise WorkerDied(f"worker process(es) died without answering: {'; '.join(died)}")
    return [by_index[i] for i in range(len(items))]


def capture(fn: Callable[[T], R], item: T) -> tuple[T, R | None, BaseException | None]:
    """(item, fn(item), None), or (item, None, the exception) if it raised."""
    try:
        return item, fn(item), None
    except Exception as exc:
        return item, None, exc


class _Collect(logging.Handler):
    """A child's log records, formatted, for the parent to log (the parent's log handlers may
    write to a channel only one process at a time may use, such as Airflow's task log socket)."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.levelno, record.getMessage()))


def _picklable(entry: tuple[T, Any, BaseException | None]) -> tuple[T, Any, Any]:
    """`entry` as it is, or with a RuntimeError naming what could not be pickled."""
    item, result, exc = entry
    try:
        pickle.dumps((result, exc))
    except Exception as unpicklable:
        return item, None, RuntimeError(error_text(exc or unpicklable))
    return entry


def _fork_worker(fn: Callable[[T], R], share: list[T]) -> tuple[int, int]:
    """Fork a child that runs `fn` over `share` and writes its pickled (results, log records) to
    a pipe; returns (its pid, the pipe's read end). The child never returns: it leaves with
    os._exit (no atexit handler or `finally` of this process runs in it); with nothing written,
    the parent knows it failed."""
    read, write = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write)
        return pid, read
    code = 1
    try:
        os.close(read)
        collect = _Collect()
        logging.getLogger().handlers = [collect]
        payload = [capture(fn, item) for item in share]
        try:
            data = pickle.dumps((payload, collect.records))
        except Exception:  # some result or exception cannot cross over: that item's error
            data = pickle.dumps(([_picklable(entry) for entry in payload], collect.records))
        with os.fdopen(write, "wb") as pipe:
            pipe.write(data)
        code = 0
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def settings_with_overrides(
    settings: Settings, *, kinds: list[str] | None = None, max_epochs: int | None = None
) -> Settings:
    changes: dict[str, Any] = {}
    if kinds:
        from ml.config import _parse_kinds

        changes["kinds"] = _parse_kinds(",".join(kinds))
    if max_epochs:
        changes["max_epochs"] = int(max_epochs)
    return replace(settings, model=replace(settings.model, **changes)) if changes else settings
