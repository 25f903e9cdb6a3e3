"""Test hook: records in a file when a process enters the Keras fit, ends each epoch, leaves.

Loaded only by the Airflow stack of tests/faults/test_airflow_kill.py, through the executor's
`PRELOAD_MODULES` (plugins/preloading_executor.py imports the listed modules in every LocalExecutor
worker, and the task processes forked from a worker inherit them). When `FIT_PROBE_DIR` is set,
importing it wraps the project's fit loop, `ml.model.training.fit_candidates` (its own traced
train step, epoch after epoch) and `_score_epoch` (called at the end of every epoch): every fit
appends `start <time>` to `$FIT_PROBE_DIR/<pid>.fit` before it, `epoch <n> <time>` after each
epoch's scoring and `end <time>` after the fit (also when it raises). The fit itself is the
original one. A process whose file ends in `epoch` lines is in the middle of a fit: that is where
the test SIGKILLs a train task. Without `FIT_PROBE_DIR` it does nothing.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

PROBE_DIR_ENV = "FIT_PROBE_DIR"


def _record(folder: str, event: str) -> None:
    path = Path(folder) / f"{os.getpid()}.fit"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{event} {time.time():.3f}\n".encode())
    finally:
        os.close(fd)


def fit_events(folder: Path, pid: int) -> list[str]:
    """The events recorded by process `pid`, in order: "start", "epoch", ..., "end"."""
    path = folder / f"{pid}.fit"
    if not path.exists():
        return []
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def fit_started(folder: Path, pid: int) -> float:
    """When process `pid` last entered a fit (epoch seconds)."""
    lines = (folder / f"{pid}.fit").read_text().splitlines()
    return max(float(line.split()[-1]) for line in lines if line.startswith("start"))


def install() -> bool:
    folder = os.environ.get(PROBE_DIR_ENV)
    if not folder:
        return False
    from ml.model import training

    if getattr(training.fit_candidates, "fit_probe", False):
        return True
    fit_candidates, score_epoch = training.fit_candidates, training._score_epoch

    @functools.wraps(score_epoch)
    def scored(compiled, branches, train_losses, x_val, y_val, epoch, patience):
        done = score_epoch(compiled, branches, train_losses, x_val, y_val, epoch, patience)
        _record(folder, f"epoch {epoch + 1}")
        return done

    @functools.wraps(fit_candidates)
    def fit(*args, **kwargs):
        _record(folder, "start")
        try:
            return fit_candidates(*args, **kwargs)
        finally:
            _record(folder, "end")

    fit.fit_probe = True  # type: ignore[attr-defined]
    training.fit_candidates, training._score_epoch = fit, scored
    print(f"fit_probe: ml.model.training's fit records to {folder} (pid {os.getpid()})", flush=True)
    return True


install()
