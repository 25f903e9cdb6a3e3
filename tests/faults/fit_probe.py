"""Test hook: records in a file when a process enters `keras.Model.fit`, ends each epoch, leaves.

Loaded only by the Airflow stack of tests/faults/test_airflow_kill.py, through the executor's
`PRELOAD_MODULES` (plugins/preloading_executor.py imports the listed modules in every LocalExecutor
worker, and the task processes forked from a worker inherit them). When `FIT_PROBE_DIR` is set,
importing it wraps `keras.Model.fit`: every call appends `start <time>` to
`$FIT_PROBE_DIR/<pid>.fit` before the fit, `epoch <n> <time>` after each epoch (one more Keras
callback, after the caller's, that only writes this line) and `end <time>` after the fit (also
when it raises). The fit itself is the original one. A process whose file ends in `epoch` lines
is in the middle of a fit: that is where the test SIGKILLs a train task. Without `FIT_PROBE_DIR`
it does nothing.
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
    import keras

    original = keras.Model.fit
    if getattr(original, "fit_probe", False):
        return True

    class EpochRecorder(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs=None) -> None:
            _record(folder, f"epoch {epoch + 1}")

    @functools.wraps(original)
    def fit(self, *args, **kwargs):
        if len(args) < 6:  # `callbacks` is fit's 6th parameter; passed by keyword here
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), EpochRecorder()]
        _record(folder, "start")
        try:
            return original(self, *args, **kwargs)
        finally:
            _record(folder, "end")

    fit.fit_probe = True  # type: ignore[attr-defined]
    keras.Model.fit = fit
    print(f"fit_probe: keras.Model.fit records to {folder} (pid {os.getpid()})", flush=True)
    return True


install()
