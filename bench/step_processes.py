"""Validate (or ingest) over two processes against one, side by side
(`ml.steps.common.in_processes`).

    python bench/step_processes.py [--step validate|ingest] [--repeat 3] [--tickers N]
        [--as-of 2024-06-28]

In one parent process that has imported what the preloading executor's workers import (like a
task's parent), on a fresh store per trial, in a child forked from the parent as a task is, once
with the work kept in the child (`serial`) and once spread over its worker processes
(`workers`), alternating, `--repeat` times each:

- `validate`: the universe's synthetic bars are staged (`ingest_all`, not timed), then
  `validate_all` (every suite, publish; no registry) is timed;
- `ingest`: `ingest_all` from the synthetic source (a local, CPU-bound source: it generates each
  series) into an empty store (the first day: the whole history) is timed.

Prints each trial's seconds, the medians and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _timed_in_child(fn) -> float:
    """Seconds `fn()` took in a child forked from this process."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        started = time.perf_counter()
        fn()
        os.write(write, f"{time.perf_counter() - started:.6f}".encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        answer = pipe.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not answer:
        raise RuntimeError(f"the timed child failed (wait status {status})")
    return float(answer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", choices=("validate", "ingest"), default="validate")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--tickers", type=int, default=0, help="first N of the universe (0: all)")
    parser.add_argument("--as-of", default="2024-06-28")
    args = parser.parse_args()

    import great_expectations  # noqa: F401  (what the executor's workers preload)
    import pandas  # noqa: F401

    from ml.config import get_settings
    from ml.steps import common
    from ml.steps.data import ingest_all, validate_all
    from ml.universe import load_universe

    common.import_step_modules()
    as_of = date.fromisoformat(args.as_of)
    base = get_settings({})
    tickers = [i.ticker for i in load_universe(base.universe_file)]
    tickers = tickers[: args.tickers] if args.tickers else tickers
    default_min = common.FORK_MIN_ITEMS
    seconds: dict[str, list[float]] = {"serial": [], "workers": []}
    with tempfile.TemporaryDirectory(prefix="bench-step-processes-") as tmp:
        for trial in range(args.repeat):
            for mode in ("serial", "workers"):
                settings = replace(base, data_dir=Path(tmp) / f"{mode}-{trial}")
                settings.data_dir.mkdir()
                if args.step == "validate":
                    ingest_all(tickers, as_of, settings)
                common.FORK_MIN_ITEMS = 10**9 if mode == "serial" else default_min

                def validate(s=settings) -> None:
                    out = validate_all(tickers, as_of, s, check_registry=False)
                    assert not out["failed"] and len(out["tickers"]) == len(tickers), out

                def ingest(s=settings) -> None:
                    out = ingest_all(tickers, as_of, s)
                    assert not out["failed"] and len(out["staged"]) == len(tickers), out

                step = validate if args.step == "validate" else ingest
                seconds[mode].append(_timed_in_child(step))
                print(f"trial {trial + 1} {mode:8s} {seconds[mode][-1]:.2f} s", flush=True)
    serial, workers = (statistics.median(seconds[m]) for m in ("serial", "workers"))
    print(
        f"{args.step}_all, {len(tickers)} tickers, {os.cpu_count()} cores, workers "
        f"{common.PROCESS_WORKERS}: median serial {serial:.2f} s, over processes {workers:.2f} s, "
        f"ratio {workers / serial:.2f}"
    )


if __name__ == "__main__":
    main()
