"""Whole daily runs through the real scheduler, and what they cost.

`run_dag` triggers one `price_forecast` run on a private `Stack` and collects what happened: the
run and task-instance rows of the metadata DB, the `ingest` task's XCom (rows fetched per ticker),
the run report (`DATA_DIR/reports/<D>.json`), the MLflow runs it created and the sampled memory.
`analyze` turns that into figures:

- wall: from the trigger (dag_run.queued_at, set when the run is created) to the end of `report`;
- busy: the time during which at least one task instance was running (union of start..end);
- orchestration gap = wall - busy: time with NO task process running (scheduling, queueing,
  executor pick-up, mapped-task expansion). Queue delays that overlap other tasks' work are
  listed separately (start - queued_dttm per task instance);
- task-seconds per component (sums of task-instance durations, which include each task process's
  start-up and imports), and their wall-clock share: task-seconds / effective parallelism, where
  effective parallelism = all task-seconds / busy. So wall = sum of the shares + the gap exactly.
  Components: the data phase (ingest, validate), training (the train instances minus the MLflow
  run inside them; of which the Keras fits), the MLflow run inside train (start_time to end_time:
  params, metrics, plot, model, registration), promote, forecast, and resolve_tickers + report;
- a train task's fixed cost: the mean train instance's wall time minus its epochs, where the
  epochs are the Keras fit minus its first step and validation pass (which trace the graphs):
  the traces, the MLflow run, the registration, look-ups, data, evaluation and the task's start;
- task instances: every task-instance row of the run (a day without new bars keeps `train`'s one
  unexpanded row, skipped); train instances: the mapped ones (map_index >= 0), none on such a day;
- CPU seconds per component of the stack (`memory.MemorySampler.cpu_by_component`: the executor's
  workers with their task processes, the scheduler, the API server, the DAG processor, the
  triggerer, the MLflow server), from the trigger until the bench saw the run end.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import records
from harness import Stack
from memory import process_cpu_seconds
from records import parse_ts

from ml.pipeline import STAGES

# The DAG's tasks in order, with "validate": the name results recorded before the data phase
# was split into validate_and_publish, find_versions and plan_training.
TASKS = (*STAGES[:2], "validate", *STAGES[2:])
DATA_TASKS = ("ingest", "validate", "validate_and_publish", "find_versions", "plan_training")
STATES = ("done", "skipped", "failed")  # a ticker's state in the run report
COMPONENTS = (
    "data phase (ingest+validate)",
    "training",
    "MLflow run in train",
    "promote",
    "forecast",
    "resolve+report",
)


def next_weekday(day: date) -> date:
    day += timedelta(days=1)
    while day.weekday() >= 5:
        day += timedelta(days=1)
    return day


def latest_tick(now: datetime | None = None) -> datetime:
    """The DAG's latest 22:30 UTC schedule tick (as scripts/stack.py computes it)."""
    now = now or datetime.now(UTC)
    tick = now.replace(hour=22, minute=30, second=0, microsecond=0)
    return tick if tick <= now else tick - timedelta(days=1)


def logical_dates(count: int) -> list[datetime]:
    """Distinct logical dates for the bench's runs: the latest schedule tick first (so the
    scheduler does not create a run of its own on unpause), then one day earlier each."""
    tick = latest_tick(datetime.now(UTC))
    return [tick - timedelta(days=k) for k in range(count)]


def universe_csv(path: Path, n: int, template: list[Any]) -> list[str]:
    """A made-up universe of `n` tickers SYN0001.. with the default universe's asset-class mix.

    Ticker i gets the class of template row (7 * i) mod len(template): every block of
    len(template) tickers has exactly the default mix, and small universes are still mixed.
    """
    import csv

    tickers = [f"SYN{i + 1:04d}" for i in range(n)]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ticker", "asset_class", "name"])
        for i, ticker in enumerate(tickers):
            cls = template[(7 * i) % len(template)].asset_class
            writer.writerow([ticker, cls, f"synthetic {cls} {i + 1}"])
    return tickers


# --- one run -----------------------------------------------------------------------------------


def fail_foreign_runs(stack: Stack, mine: set[str], log: Any) -> None:
    for foreign in stack.foreign_runs(mine):
        log(f"  WARNING: a run the bench did not trigger exists ({foreign}); marking it failed")
        try:
            stack.call("PATCH", f"/dags/price_forecast/dagRuns/{foreign}", {"state": "failed"})
        except Exception as exc:
            log(f"  could not fail {foreign}: {exc}")
        mine.add(foreign)


def run_dag(stack: Stack, label: str, as_of: date, logical_date: datetime, conf: dict[str, Any],
            timeout: float, mine: set[str], log: Any = print) -> dict[str, Any]:  # fmt: skip
    """Trigger one run for `as_of` and wait for it; returns the raw records (see `analyze`)."""
    fail_foreign_runs(stack, mine, log)
    run_id = f"bench__{label}__{as_of.isoformat()}__{int(time.time())}"
    mine.add(run_id)
    cpu_before = {}
    scheduler = stack.scheduler_pid()
    scheduler_before = process_cpu_seconds(scheduler)
    if stack.sampler is not None:
        stack.sampler.reset_peak_total()
        cpu_before = stack.sampler.cpu_by_component()
    full_conf = {**conf, "as_of": as_of.isoformat()}
    log(f"  trigger {run_id} conf={json.dumps(full_conf)}")
    started = time.perf_counter()
    stack.trigger(run_id, logical_date, full_conf)
    state = stack.wait(run_id, timeout)
    observed = time.perf_counter() - started
    cpu_after = stack.sampler.cpu_by_component() if stack.sampler is not None else {}
    scheduler_after = process_cpu_seconds(scheduler)
    log(f"  {run_id}: {state} (observed by polling after {observed:.0f}s)")
    raw = {"label": label, "run_id": run_id, "as_of": as_of.isoformat(), "conf": full_conf}
    # CPU seconds of each component from the trigger until the bench saw the run end (polling
    # every 2 s: up to 2 s of the stack idling after the run, and the polls themselves).
    cpu = {k: round(v - cpu_before.get(k, 0.0), 2) for k, v in cpu_after.items()}
    return {
        **raw,
        "state": state,
        "observed_seconds": observed,
        "cpu_seconds": cpu,
        # The scheduler process's own CPU (utime + stime + reaped children, /proc/<pid>/stat)
        # over the same span; None if its pid was not found or it changed.
        "scheduler_cpu_seconds": (
            round(scheduler_after - scheduler_before, 2)
            if scheduler_before is not None and scheduler_after is not None
            else None
        ),
        **collect(stack, run_id, as_of),
    }


def collect(stack: Stack, run_id: str, as_of: date) -> dict[str, Any]:
    """What the run left: its metadata rows, the ingest XCom, the run report, the MLflow runs
    started between the trigger and the last task's end, and the sampled memory."""
    db = stack.metadata
    report_path = stack.data_dir / "reports" / f"{as_of.isoformat()}.json"
    dag_run = records.dag_run(db, run_id)
    tis = records.task_instances(db, run_id)
    sampler = stack.sampler
    memory = sampler.by_task_instance() if sampler else {}
    queued = parse_ts(dag_run.get("queued_at"))
    end = max((parse_ts(t["end_date"]) for t in tis if t["end_date"]), default=None)
    login = stack.mlflow_login
    runs = records.mlflow_runs(stack.mlflow_uri, stack.artifacts_dir, login=login) if queued else []
    mlflow_runs = [
        run
        for run in runs
        if run["start"] >= queued - timedelta(seconds=1) and (end is None or run["start"] <= end)
    ]
    return {
        "dag_run": dag_run,
        "task_instances": tis,
        "report": json.loads(report_path.read_text()) if report_path.exists() else None,
        "ingested": records.xcom(db, run_id, "ingest"),
        "memory": {t["id"]: memory.get(t["id"]) for t in tis},
        "peak_total_rss_mb": round((sampler.peak_total_kb if sampler else 0) / 1024, 1),
        "workers": sampler.workers() if sampler else [],
        "executor": stack.executor,
        "mlflow_runs": mlflow_runs,
    }


# --- its figures -------------------------------------------------------------------------------


def _union_seconds(intervals: list[tuple[datetime, datetime]]) -> float:
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += (cur_end - cur_start).total_seconds()
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += (cur_end - cur_start).total_seconds()
    return total


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "sum": round(sum(values), 3),
        "mean": round(statistics.fmean(values), 3),
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
    }


def _times(tis: list[dict[str, Any]]) -> None:
    """Parsed timestamps and the duration of each task instance (`_start`, `_end`, ...)."""
    for t in tis:
        t["_start"], t["_end"] = parse_ts(t["start_date"]), parse_ts(t["end_date"])
        t["_queued"], t["_scheduled"] = parse_ts(t["queued_dttm"]), parse_ts(t["scheduled_dttm"])
        ran = t["_start"] and t["_end"]
        t["_dur"] = (
            float(t["duration"])
            if t["duration"] is not None
            else ((t["_end"] - t["_start"]).total_seconds() if ran else 0.0)
        )


def _task_figures(tis: list[dict], group: list[dict], memory: dict) -> dict[str, Any]:
    """One task's figures over its instances (`tis`: all rows, `group`: those that ran)."""
    mem = [m for m in (memory.get(t["id"]) for t in group) if m]
    states = Counter(t["state"] for t in tis)

    def peak(key: str, f: Any = max) -> float | None:
        return round(f(m[key] for m in mem) / 1024, 1) if mem else None

    return {
        "duration": _stats([t["_dur"] for t in group]),
        "queue_delay": _stats(
            [(t["_start"] - t["_queued"]).total_seconds() for t in group if t["_queued"]]
        ),
        "schedule_delay": _stats(
            [
                (t["_queued"] - t["_scheduled"]).total_seconds()
                for t in group
                if t["_queued"] and t["_scheduled"]
            ]
        ),
        "retried": sum(1 for t in group if (t["try_number"] or 1) > 1),
        "states": dict(sorted(states.items(), key=lambda kv: str(kv[0]))),
        "peak_rss_mb": peak("hwm_kb"),
        "median_peak_rss_mb": peak("hwm_kb", statistics.median),
        "peak_private_mb": peak("private_kb"),
        "memory_sampled": f"{len(mem)}/{len(group)}",
    }


def _components(
    per_task: dict[str, Any], mlflow_runs: list[dict]
) -> tuple[dict, float, float, float]:
    """Task-seconds per component, the MLflow run seconds, the Keras fit seconds and, of them,
    the first step and validation pass of each fit (the traces)."""

    def dur(short: str) -> float:
        return per_task.get(short, {}).get("duration", {}).get("sum", 0.0)

    mlflow_span = sum((r["end"] - r["start"]).total_seconds() for r in mlflow_runs if r["end"])
    fit = sum(r["fit_seconds"] or 0.0 for r in mlflow_runs)
    trace = sum(r.get("trace_seconds") or 0.0 for r in mlflow_runs)
    components = {
        "data phase (ingest+validate)": sum(dur(t) for t in DATA_TASKS),
        "training": dur("train") - mlflow_span,
        "MLflow run in train": mlflow_span,
        "promote": dur("promote"),
        "forecast": dur("forecast"),
        "resolve+report": dur("resolve_tickers") + dur("report"),
    }
    return components, mlflow_span, fit, trace


def _tickers(raw: dict[str, Any]) -> dict[str, Any]:
    """Per ticker, from the run report and the ingest XCom: training outcome and rows fetched."""
    rows = (raw.get("report") or {}).get("tickers") or []
    staged = (raw.get("ingested") or {}).get("staged") or {}
    # "trained v3", "reused v2", "not retrained: v2 covers these bars", "-"
    training = Counter(str(r.get("training", "-")).split(":")[0].split(" v")[0] for r in rows)
    fetched = {}
    for r in rows:
        batch = staged.get(r["ticker"]) or {}
        added = r.get("rows_added")
        fetched[r["ticker"]] = {
            "rows_fetched": batch.get("rows_fetched"),
            "incremental": batch.get("incremental"),
            "rows_added": added if isinstance(added, int) else None,
            "state": r.get("state"),
        }
    return {
        "tickers": len(rows) or len(staged),
        "failed_tickers": (raw.get("report") or {}).get("failed", []),
        "training": dict(training),
        "fetched": fetched,
        "states": {s: sum(1 for r in rows if r.get("state") == s) for s in STATES},
    }


def analyze(raw: dict[str, Any]) -> dict[str, Any]:
    """Figures of one run (see the module docstring for the definitions)."""
    tis = raw["task_instances"]
    _times(tis)
    queued = parse_ts(raw["dag_run"].get("queued_at"))
    ran = [t for t in tis if t["_start"] and t["_end"]]
    report_ti = next((t for t in ran if t["task_id"] == "report"), None)
    end = report_ti["_end"] if report_ti else parse_ts(raw["dag_run"].get("end_date"))
    wall = (end - queued).total_seconds() if end and queued else float("nan")
    busy = _union_seconds([(t["_start"], t["_end"]) for t in ran])
    first_start = min((t["_start"] for t in ran), default=None)
    task_seconds = sum(t["_dur"] for t in ran)
    parallelism = task_seconds / busy if busy else float("nan")
    order = {name: i for i, name in enumerate(TASKS)}
    names = sorted(dict.fromkeys(t["task_id"] for t in tis), key=lambda n: order.get(n, 99))
    per_task = {
        name: _task_figures(
            [t for t in tis if t["task_id"] == name],
            [t for t in ran if t["task_id"] == name],
            raw["memory"],
        )
        for name in names
    }
    components, mlflow_span, fit, trace = _components(per_task, raw["mlflow_runs"])
    train = per_task.get("train", {}).get("duration", {})
    # A train task's fixed cost: its wall time minus its epochs (the fit without the traces),
    # when every train instance of the run has its MLflow run (none reused a version).
    n_train = train.get("n") or 0
    fixed = (
        (train["sum"] - (fit - trace)) / n_train
        if n_train and n_train == len(raw["mlflow_runs"])
        else None
    )
    tickers = _tickers(raw)
    n, workers = tickers["tickers"], raw["workers"]
    latency = (first_start - queued).total_seconds() if first_start and queued else None
    return {
        "label": raw["label"],
        "run_id": raw["run_id"],
        "as_of": raw["as_of"],
        "state": raw["state"],
        "tickers": n,
        "failed_tickers": tickers["failed_tickers"],
        "wall_seconds": round(wall, 2),
        "per_ticker_seconds": round(wall / n, 3) if n else None,
        "start_latency_seconds": round(latency, 2) if latency is not None else None,
        "busy_seconds": round(busy, 2),
        "gap_seconds": round(wall - busy, 2),
        "task_seconds": round(task_seconds, 2),
        "effective_parallelism": round(parallelism, 2),
        "components_task_seconds": {k: round(v, 2) for k, v in components.items()},
        "components_wall_seconds": {
            k: round(v / parallelism, 2) if parallelism == parallelism else None
            for k, v in components.items()
        },
        "fit_seconds": round(fit, 2),
        "trace_seconds": round(trace, 2),
        "train_fixed_seconds": round(fixed, 3) if fixed is not None else None,
        "mlflow_run_seconds": round(mlflow_span, 2),
        "mlflow_runs": len(raw["mlflow_runs"]),
        "per_task": per_task,
        "training": tickers["training"],
        "fetched": tickers["fetched"],
        "peak_total_rss_mb": raw["peak_total_rss_mb"],
        "cpu_seconds": raw.get("cpu_seconds") or {},
        "scheduler_cpu_seconds": raw.get("scheduler_cpu_seconds"),
        "scheduler_cpu_per_ticker": (
            round(raw["scheduler_cpu_seconds"] / n, 4)
            if n and raw.get("scheduler_cpu_seconds") is not None
            else None
        ),
        "executor": raw["executor"],
        "executor_workers": len(workers),
        "worker_peak_rss_mb": round(max((w["hwm_kb"] for w in workers), default=0) / 1024, 1),
        "worker_peak_private_mb": round(
            max((w["private_kb"] for w in workers), default=0) / 1024, 1
        ),
        "task_instances": len(tis),
        "task_instances_ran": len(ran),
        "train_instances": sum(
            1 for t in tis if t["task_id"] == "train" and (t["map_index"] or 0) >= 0
        ),
        "states": tickers["states"],
    }
