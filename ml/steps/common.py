"""What every step shares: the instrument of a ticker, errors as text, the all-failed rule."""

from __future__ import annotations

import logging
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


# What the steps import inside their functions besides the package's own modules: found by
# listing the modules a train, validate and forecast call adds to `sys.modules` in a process
# forked from one that had imported `ml.steps.*`, TensorFlow, MLflow and GX (Parquet's dataset
# reader, the plot's PNG backend, GitPython for MLflow's run tags, MLflow's tracing processor
# and request headers). Each is an import every task process would make again.
LAZY_IMPORTS = (
    "pyarrow.parquet",
    "pyarrow.dataset",
    "pandas.core.arrays.arrow.extension_types",
    "pandas.core.methods.to_dict",
    "matplotlib.backends.backend_agg",
    *(f"PIL.{f}ImagePlugin" for f in ("Bmp", "Gif", "Jpeg", "Png", "Ppm")),  # PIL's preinit()
    "git",
    "netrc",
    "mlflow.models.display_utils",
    "mlflow.tracing.export.utils",
    "mlflow.tracing.processor.base_mlflow",
    "mlflow.tracing.processor.otel",
    "mlflow.tracking.request_header.registry",
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
