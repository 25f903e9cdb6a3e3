"""Named points where the fault suite (tests/faults/) kills the process for real.

`checkpoint(name)` does nothing unless the environment variable `ML_FAULT_KILL_AT` names this
point: then the process sends itself SIGKILL, which no handler, `finally` or `atexit` can see, as
the OOM killer or a lost node would. The points sit at the boundaries where a crash could leave
the store, the registry or the forecasts half done; the tests check that the retry (or the next
run) ends exactly where an undisturbed run ends. In production the variable is unset and a
checkpoint costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

KILL_AT_ENV = "ML_FAULT_KILL_AT"

# Every point, in the order a day reaches them (the fault suite kills at each).
POINTS = (
    "staged",  # a ticker's batch is in staging (ingest)
    "publish:report",  # mid-publish: the batch's report is written, the history not yet
    "published",  # the history and report are written, staging not yet removed
    "run-open",  # inside the MLflow run of a training (params logged, model not yet)
    "registered",  # the model version exists, the `challenger` alias does not point at it yet
    "challenger",  # the alias moved, the train step has not returned
    "write:forecasts.csv",  # the forecasts export's temp file is written, not yet renamed
)


def checkpoint(name: str) -> None:
    """SIGKILL this process if `ML_FAULT_KILL_AT` is `name`."""
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
