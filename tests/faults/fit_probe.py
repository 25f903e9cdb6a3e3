"""Test hook: records in a file when a process enters the Keras fit, ends each epoch, leaves.

Loaded only by the Airflow stack of tests/faults/test_airflow_kill.py, through the executor's
`PRELOAD_MODULES` (plugins/preloading_executor.py imports the listed modules in every LocalExecutor
worker, and the task processes forked from a worker inherit them). When `FIT_PROBE_DIR` is set,
importing it wraps the project's fit loop, `ml.model.training.fit_candidates` (its own traced
train step, epoch after epoch) and `score_epoch` (called at the end of every epoch): every fit
appends `start <time>` to `$FIT_PROBE_DIR/<pid>.fit` before it, `epoch <n> <time>` after each
epoch's scoring and `end <time>` after the fit (also when it raises). The fit itself is the
original one. A process whose file ends in `epoch` lines is in the middle of a fit: that is where
the test SIGKILLs a train task.

It also holds the first try of each ticker named in `FIT_PROBE_HOLD` at that ticker's point
(`AMD:epoch-3,EURUSD=X:run-open`): after the named epoch of the fit, or at the named fault
checkpoint of `ml.registry.tracking` (`run-open`: inside the MLflow run, params logged, model not
yet). There it appends `held <point> <time>` and sleeps up to `HOLD_SECONDS`, so the test's
SIGKILL lands where it should however fast the fit and the run are (on a fast machine a 150-epoch
fit takes under a second and the run about half a second, less than the test's polling could
count on). A ticker is held once (a marker file per ticker): its retry runs through. Without
`FIT_PROBE_DIR` it does nothing.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

PROBE_DIR_ENV = "FIT_PROBE_DIR"
HOLD_ENV = "FIT_PROBE_HOLD"
HOLD_SECONDS = 120.0


def _record(folder: str, event: str) -> None:
    path = Path(folder) / f"{os.getpid()}.fit"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{event} {time.time():.3f}\n".encode())
    finally:
        os.close(fd)


def fit_events(folder: Path, pid: int) -> list[str]:
    """The events recorded by process `pid`, in order: "start", "epoch", ..., "end" (and "held"
    where the probe holds it)."""
    path = folder / f"{pid}.fit"
    if not path.exists():
        return []
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def fit_started(folder: Path, pid: int) -> float:
    """When process `pid` last entered a fit (epoch seconds)."""
    lines = (folder / f"{pid}.fit").read_text().splitlines()
    return max(float(line.split()[-1]) for line in lines if line.startswith("start"))


def _holds() -> dict[str, str]:
    """`FIT_PROBE_HOLD` as {ticker: point}: "AMD:epoch-3,EURUSD=X:run-open"."""
    out = {}
    for item in os.environ.get(HOLD_ENV, "").split(","):
        ticker, _, point = item.strip().rpartition(":")
        if ticker and point:
            out[ticker] = point
    return out


def _hold(folder: str, holds: dict[str, str], ticker: str | None, point: str) -> None:
    """Sleep up to HOLD_SECONDS if `ticker`'s first try is at its hold point in `holds` (once
    per ticker: a marker file; its retry runs through), after recording `held <point>`."""
    if ticker is None or holds.get(ticker) != point:
        return
    try:
        os.close(os.open(Path(folder) / f"held-{ticker}", os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    _record(folder, f"held {point}")
    time.sleep(HOLD_SECONDS)


def install() -> bool:
    folder = os.environ.get(PROBE_DIR_ENV)
    if not folder:
        return False
    import mlflow

    from ml.model import training
    from ml.registry import tracking

    if getattr(training.fit_candidates, "fit_probe", False):
        return True
    fit_and_evaluate, fit_candidates = training.fit_and_evaluate, training.fit_candidates
    score_epoch, checkpoint = training.score_epoch, tracking.checkpoint
    current: dict[str, str] = {}  # the ticker this process is training
    holds = _holds()

    @functools.wraps(fit_and_evaluate)
    def evaluated(ticker, *args, **kwargs):
        current["ticker"] = ticker
        return fit_and_evaluate(ticker, *args, **kwargs)

    @functools.wraps(score_epoch)
    def scored(compiled, branches, train_losses, x_val, y_val, epoch, patience):
        done = score_epoch(compiled, branches, train_losses, x_val, y_val, epoch, patience)
        _record(folder, f"epoch {epoch + 1}")
        _hold(folder, holds, current.get("ticker"), f"epoch-{epoch + 1}")
        return done

    @functools.wraps(fit_candidates)
    def fit(*args, **kwargs):
        _record(folder, "start")
        try:
            return fit_candidates(*args, **kwargs)
        finally:
            _record(folder, "end")

    def checked(name: str) -> None:
        checkpoint(name)
        run = mlflow.active_run()
        _hold(folder, holds, run.data.tags.get("ticker") if run is not None else None, name)

    fit.fit_probe = True  # type: ignore[attr-defined]
    training.fit_and_evaluate, training.fit_candidates = evaluated, fit
    training.score_epoch, tracking.checkpoint = scored, checked
    print(f"fit_probe: ml.model.training's fit records to {folder} (pid {os.getpid()})", flush=True)
    return True


install()
