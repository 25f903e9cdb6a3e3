"""The measuring parts of `bench/run.py`: each returns the figures that go to results.json.

imports        fresh-process import times (`python -c "import X"` timed inside)
training       (1) the notebook's loop and (2) ours, each in a fresh process on the same histories
daily          (3) the whole daily run on a private stack, then (6) the incremental days
growth         (5) the whole run per universe size, one fresh stack each (bench/growth.py)
profile        one ticker's steps, each in a fresh process: `-X importtime`, then cProfile
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from benchlib import BENCH, HISTORY_START, ROOT, write_histories
from harness import Stack
from records import DAG_ID
from scenarios import analyze, logical_dates, next_weekday, run_dag

PY = sys.executable
IMPORTS = [
    ("tensorflow", "import tensorflow"),
    ("keras", "import keras"),
    ("great_expectations", "import great_expectations"),
    ("mlflow", "import mlflow"),
    ("mlflow.pyfunc + models", "import mlflow.pyfunc, mlflow.models"),
    ("pandas + pyarrow", "import pandas, pyarrow"),
    ("sklearn.preprocessing", "import sklearn.preprocessing"),
    ("airflow.sdk", "import airflow.sdk"),
    (
        "DAG file (airflow.sdk + dags/price_forecast.py)",
        f"import runpy; runpy.run_path({str(ROOT / 'dags' / 'price_forecast.py')!r})",
    ),
    (
        "a train task's libraries (mlflow, tensorflow, ml.*)",
        "import mlflow, mlflow.pyfunc, tensorflow, keras, ml.registry.tracking, ml.model.training, "
        "ml.model.evaluation, ml.model.forecaster",
    ),
]
VERSIONS = ("tensorflow-cpu", "tensorflow", "keras", "apache-airflow", "mlflow")
VERSIONS += ("great_expectations", "numpy", "pandas", "scikit-learn")
PROFILE_STEPS = ("ingest", "publish", "train", "promote", "forecast")


def log(msg: str) -> None:
    print(msg, flush=True)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_start": [round(v, 2) for v in os.getloadavg()],
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(("MemTotal:", "MemAvailable:")):
                key, value = line.split(":", 1)
                info[key] = f"{int(value.split()[0]) / 1024 / 1024:.1f} GiB"
    with contextlib.suppress(OSError):
        cpu = [
            x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name")
        ]
        if cpu:
            info["cpu"] = cpu[0].split(":", 1)[1].strip()
    return info


def versions() -> dict[str, str]:
    out = {}
    for dist in VERSIONS:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def run_timed(cmd: list[str], log_path: Path, timeout: float, env: dict | None = None,
              stderr_path: Path | None = None) -> float:  # fmt: skip
    """Run `cmd` in its own process group, output to `log_path` (stderr to `stderr_path` if
    given); wall seconds. Raises on failure; the process group is killed if anything goes wrong
    (timeout, Ctrl-C, SIGTERM)."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", **(env or {})}
    with contextlib.ExitStack() as files:
        out = files.enter_context(open(log_path, "ab"))
        err = files.enter_context(open(stderr_path, "wb")) if stderr_path else subprocess.STDOUT
        started = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=err, env=full_env, cwd=ROOT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        seconds = time.perf_counter() - started
    if code != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        if stderr_path:
            tail += stderr_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{shlex.join(cmd)} exited {code}:\n{tail}")
    return seconds


def parse_importtime(text: str, top: int = 6) -> dict[str, Any]:
    """Imports made between the BENCH-STEP-START/END lines of a `-X importtime` stderr: the total
    (sum of the outermost imports' cumulative times) and the outermost modules that cost most."""
    lines = text.splitlines()
    try:
        segment = lines[lines.index("BENCH-STEP-START") + 1 : lines.index("BENCH-STEP-END")]
    except ValueError:
        return {"seconds": None, "top": []}
    outer: list[tuple[str, float]] = []
    for line in segment:
        parts = line.split("|")
        if not line.startswith("import time:") or len(parts) != 3 or parts[2][1:2] == " ":
            continue  # not an import line, or one nested inside another import
        with contextlib.suppress(ValueError):  # the header line
            outer.append((parts[2].strip(), int(parts[1].strip()) / 1e6))
    ranked = sorted(outer, key=lambda kv: kv[1], reverse=True)[:top]
    return {
        "seconds": round(sum(s for _, s in outer), 3),
        "top": [{"module": m, "seconds": round(s, 3)} for m, s in ranked],
    }


# --- imports -----------------------------------------------------------------------------------


def part_imports(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    for name, code in IMPORTS:
        script = (
            "import os, time; os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2'); "
            f"t = time.perf_counter(); {code}; print('SECONDS', time.perf_counter() - t)"
        )
        samples, err = [], None
        for _ in range(args.import_repeat):
            proc = subprocess.run(
                [PY, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env,
                timeout=600, check=False,
            )  # fmt: skip
            line = next((x for x in proc.stdout.splitlines() if x.startswith("SECONDS")), None)
            if line is None:
                samples, err = [], proc.stderr[-300:]
                break
            samples.append(float(line.split()[1]))
        low, high = (round(min(samples), 2), round(max(samples), 2)) if samples else (None, None)
        rows.append({"what": name, "min": low, "max": high, "error": err})
        log(f"  import {name}: {low} .. {high} s")
    return rows


# --- (1) and (2) -------------------------------------------------------------------------------


def training_parts(args: argparse.Namespace, work: Path, parts: set[str]) -> dict[str, Any]:
    """(1) and (2): the same histories, each side in fresh processes, run side by side."""
    manifest = write_histories(work / "histories", args.chosen, HISTORY_START, args.as_of)
    bars = [e["bars"] for e in json.loads(manifest.read_text())["tickers"]]
    log(
        f"  histories: {len(bars)} tickers, {min(bars)}..{max(bars)} bars ({HISTORY_START}..{args.as_of})"
    )
    epochs = ["--epochs", str(args.epochs)]
    sides: list[tuple[str, list[str]]] = []
    if "notebook" in parts:
        sides.append(("notebook", ["notebook_baseline.py", *epochs, "--batch-size", "32"]))
    if "ours" in parts:
        for batch in args.ours_batches:
            cmd = ["ours_training.py", *epochs, "--batch-size", str(batch), "--kinds", "lstm"]
            sides.append((f"ours@{batch}", cmd))
    out: dict[str, Any] = {"bars": {"min": min(bars), "max": max(bars)}, "sides": {}}
    for rep in range(args.repeat):
        for name, (script, *flags) in sides:
            stem = name.replace("@", "_")
            result_path = work / f"{stem}_{rep}.json"
            cmd = [PY, str(BENCH / script), str(manifest), str(result_path), *flags]
            log(f"  [{rep + 1}/{args.repeat}] {name}: {shlex.join(cmd[1:2] + cmd[4:])}")
            seconds = run_timed(cmd, work / f"{stem}.log", args.run_timeout)
            payload = json.loads(result_path.read_text())
            side = out["sides"].setdefault(name, {"walls": [], "process_walls": [], "runs": []})
            # The U2 scoring is the bench's, not the training's: excluded from the wall time.
            side["walls"].append(round(seconds - payload["score_seconds"], 2))
            side["process_walls"].append(round(seconds, 2))
            side["runs"].append(payload)
            log(
                f"      wall {seconds:.1f}s, of which imports {payload['import_seconds']:.1f}s, "
                f"the bench's U2 scoring {payload['score_seconds']:.1f}s (excluded)"
            )
    for side in out["sides"].values():
        runs = side.pop("runs")
        side["wall"] = round(statistics.median(side["walls"]), 2)
        side["result"] = runs[0]
        fits = (sum(t["fit_seconds"] for t in r["tickers"]) for r in runs)
        side["fit_seconds"] = round(statistics.median(fits), 2)
        side["import_seconds"] = round(statistics.median(r["import_seconds"] for r in runs), 2)
    return out


# --- (3), (6) and (5): private stacks ----------------------------------------------------------


class StackRegistry:
    """Every stack started, so that all of them are stopped whatever happens."""

    def __init__(self) -> None:
        self.stacks: list[Stack] = []

    def new(self, state: Path, settings_env: dict[str, str]) -> Stack:
        stack = Stack(state, settings_env, log=log)
        self.stacks.append(stack)
        return stack

    def stop(self, stack: Stack) -> None:
        log(f"  stopping stack {stack.state.name}")
        try:
            stack.stop()
        finally:
            if stack in self.stacks:
                self.stacks.remove(stack)

    def stop_all(self) -> None:
        for stack in list(self.stacks):
            with contextlib.suppress(Exception):
                self.stop(stack)


def warm_up(stack: Stack, logical: Any, mine: set[str], timeout: float) -> None:
    """A run that fails at once in resolve_tickers (unknown ticker): it takes the latest schedule
    tick (so unpausing creates no scheduled run) and brings the scheduler and the executor's
    workers up, like a stack that is already running in production. Then wait until the stack is
    quiet (the executor's workers may still be importing what they preload)."""
    run_id = f"bench__warmup__{int(time.time())}"
    mine.add(run_id)
    stack.trigger(run_id, logical, {"tickers": ["ZZBENCHWARMUP"]})
    stack.set_paused(False)
    # promote and forecast (trigger rule all_done) then fail on the missing request and are
    # retried with backoff for minutes: once resolve_tickers has failed the run is failed here.
    path = f"/dags/{DAG_ID}/dagRuns/{run_id}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and stack.run_state(run_id) not in ("success", "failed"):
        with contextlib.suppress(Exception):
            if stack.call("GET", f"{path}/taskInstances/resolve_tickers")["state"] == "failed":
                stack.call("PATCH", path, {"state": "failed"})
        time.sleep(1)
    state = stack.wait(run_id, timeout)
    waited = stack.wait_quiet()
    log(
        f"  warm-up run {run_id}: {state} (expected: failed at resolve_tickers); "
        f"stack quiet after {waited:.0f}s more (executor {stack.executor})"
    )


def incremental_days(as_of: date, no_new_data_runs: int = 1) -> list[tuple[str, date]]:
    """The Saturday after `as_of` (if it is one), the next weekday, and that day again
    (`no_new_data_runs` times: one run of a few seconds moves by a good part of a second with
    the scheduler's timing, so the report takes the median)."""
    saturday = as_of + timedelta(days=1)
    days = [("weekend", saturday)] if saturday.weekday() == 5 else []
    nxt = next_weekday(as_of)
    return [*days, ("next-weekday", nxt), *[("no-new-data", nxt)] * max(1, no_new_data_runs)]


def part_daily(args: argparse.Namespace, work: Path, registry: StackRegistry, parts: set[str],
               out: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """(3) and (6) on one private stack with the default universe and the seed model config.
    Fills `out` as it goes, so the runs that finished are reported even if a later one fails."""
    stack = registry.new(work / "stack-daily", dict(args.stack_env))
    try:
        stack.start(args.start_timeout)
        out["startup_seconds"] = round(stack.startup_seconds, 1)
        log(f"  stack up in {stack.startup_seconds:.0f}s")
        mine: set[str] = set()
        days = incremental_days(args.as_of, args.no_new_data_runs)
        dates = logical_dates(2 + len(days))
        warm_up(stack, dates[0], mine, args.run_timeout)
        conf: dict[str, Any] = {}
        if args.tickers_list:
            conf["tickers"] = args.tickers_list
        if args.daily_max_epochs:
            conf["max_epochs"] = args.daily_max_epochs
        out["conf"] = conf

        def day(label: str, as_of: date, logical: Any) -> dict[str, Any]:
            raw = run_dag(stack, label, as_of, logical, conf, args.run_timeout, mine, log)
            return analyze(raw)

        out["daily"] = day("daily", args.as_of, dates[1])
        log(f"  daily run: {out['daily']['state']} in {out['daily']['wall_seconds']}s")
        if "incremental" in parts:
            out["incremental"] = []
            for i, (label, as_of) in enumerate(days):
                out["incremental"].append(day(label, as_of, dates[2 + i]))
                result = out["incremental"][-1]
                log(f"  {label} ({as_of}): {result['state']} in {result['wall_seconds']}s")
    finally:
        registry.stop(stack)
    return out


# --- profile -----------------------------------------------------------------------------------


def profile_env(args: argparse.Namespace, root: Path, uri: str) -> dict[str, str]:
    """A task's environment on a private store and server, without the caller's model settings."""
    env = {
        "DATA_DIR": str(root / "data"),
        "MLFLOW_TRACKING_URI": uri,
        "PRICE_SOURCE": "synthetic",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONPATH": str(ROOT),
    }
    for key in os.environ:
        if key.startswith(("MODEL_", "GATE_")) or key in ("UNIVERSE_FILE", "HISTORY_START"):
            env[key] = ""
    if args.daily_max_epochs:
        env["MODEL_MAX_EPOCHS"] = str(args.daily_max_epochs)
    return env


def profile_pass(args: argparse.Namespace, root: Path, mode: str, steps: dict[str, Any]) -> None:
    """Every step once in a fresh process: `timing` under -X importtime, else under cProfile."""
    from ml.servers import start_mlflow_server

    root.mkdir(parents=True, exist_ok=True)
    server = start_mlflow_server(
        f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", root / "mlflow.log",
        timeout=args.start_timeout,
    )  # fmt: skip
    env = profile_env(args, root, server.uri)
    try:
        trained: dict[str, Any] = {}
        for step in PROFILE_STEPS:
            result_path, stderr_path = root / f"{step}.json", root / f"{step}.stderr"
            cmd = [PY, "-X", "importtime"] if mode == "timing" else [PY]
            cmd += [str(BENCH / "profile_steps.py"), step, args.profile_ticker]
            cmd += [args.as_of.isoformat(), str(result_path)]
            cmd += ["--cprofile"] if mode == "cprofile" else []
            if step == "promote":
                (root / "trained.json").write_text(json.dumps(trained))
                cmd += ["--trained", str(root / "trained.json")]
            wall = run_timed(cmd, root / "steps.log", args.run_timeout, env, stderr_path)
            payload = json.loads(result_path.read_text())
            trained = payload["result"] if step == "train" else trained
            rec = steps.setdefault(step, {})
            if mode == "cprofile":
                rec["cprofile_step_seconds"] = payload["step_seconds"]
                rec.update({k: payload[k] for k in ("top_cumulative", "watched", "top_own")})
                continue
            imports = parse_importtime(stderr_path.read_text(errors="replace"))
            rec.update(
                process_wall=round(wall, 2),
                step_seconds=payload["step_seconds"],
                import_seconds=imports["seconds"],
                top_imports=imports["top"],
            )
            log(
                f"  {step}: process {wall:.1f}s, step {payload['step_seconds']:.1f}s, of which "
                f"imports {imports['seconds']}s ({', '.join(i['module'] for i in imports['top'][:3])})"
            )
    finally:
        server.stop()


def part_profile(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One ticker's steps, each in a fresh process like a task: a timing pass under
    `-X importtime` (which imports, how long), then a cProfile pass (which calls) on a second,
    independent store and MLflow server (so it does the same work, not a reuse)."""
    out: dict[str, Any] = {"ticker": args.profile_ticker, "steps": {}}
    for mode in ("timing", "cprofile"):
        profile_pass(args, work / f"profile-{mode}", mode, out["steps"])
    return out
