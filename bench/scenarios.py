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
- task instances: every task-instance row of the run (a day without new bars keeps `train`'s one
  unexpanded row, skipped); train instances: the mapped ones (map_index >= 0), none on such a day.
"""

from __future__ import annotations

import json
import statistics
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from harness import Stack, parse_ts

TASKS = ("resolve_tickers", "ingest", "validate", "train", "promote", "forecast", "report")
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


def run_dag(
    stack: Stack,
    label: str,
    as_of: date,
    logical_date: datetime,
    conf: dict[str, Any],
    timeout: float,
    mine: set[str],
    log: Any = print,
) -> dict[str, Any]:
    """Trigger one run for `as_of` and wait for it; returns the raw records (see `analyze`)."""
    for foreign in stack.foreign_runs(mine):
        log(f"  WARNING: a run the bench did not trigger exists ({foreign}); marking it failed")
        try:
            stack.call("PATCH", f"/dags/price_forecast/dagRuns/{foreign}", {"state": "failed"})
        except Exception as exc:
            log(f"  could not fail {foreign}: {exc}")
        mine.add(foreign)
    run_id = f"bench__{label}__{as_of.isoformat()}__{int(time.time())}"
    mine.add(run_id)
    if stack.sampler is not None:
        stack.sampler.reset_peak_total()
    full_conf = {**conf, "as_of": as_of.isoformat()}
    log(f"  trigger {run_id} conf={json.dumps(full_conf)}")
    started = time.perf_counter()
    stack.trigger(run_id, logical_date, full_conf)
    state = stack.wait(run_id, timeout)
    observed = time.perf_counter() - started
    log(f"  {run_id}: {state} (observed by polling after {observed:.0f}s)")
    data = stack.data_dir
    report_path = data / "reports" / f"{as_of.isoformat()}.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    ingested = stack.xcom(run_id, "ingest")
    dag_run = stack.dag_run(run_id)
    tis = stack.task_instances(run_id)
    memory = stack.sampler.by_task_instance() if stack.sampler else {}
    workers = stack.sampler.workers() if stack.sampler else []
    peak_total_kb = stack.sampler.peak_total_kb if stack.sampler else 0
    queued = parse_ts(dag_run.get("queued_at"))
    end = max((parse_ts(t["end_date"]) for t in tis if t["end_date"]), default=None)
    mlflow_runs = []
    if queued is not None:
        for run in stack.mlflow_runs():
            if run["start"] >= queued - timedelta(seconds=1) and (
                end is None or run["start"] <= end
            ):
                mlflow_runs.append(run)
    return {
        "label": label,
        "run_id": run_id,
        "as_of": as_of.isoformat(),
        "conf": full_conf,
        "state": state,
        "observed_seconds": observed,
        "dag_run": dag_run,
        "task_instances": tis,
        "report": report,
        "ingested": ingested,
        "memory": {t["id"]: memory.get(t["id"]) for t in tis},
        "peak_total_rss_mb": round(peak_total_kb / 1024, 1),
        "workers": workers,
        "executor": stack.executor,
        "mlflow_runs": mlflow_runs,
    }


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


def analyze(raw: dict[str, Any]) -> dict[str, Any]:
    """Figures of one run (see the module docstring for the definitions)."""
    tis = raw["task_instances"]
    queued = parse_ts(raw["dag_run"].get("queued_at"))
    for t in tis:
        t["_short"] = t["task_id"]
        t["_start"], t["_end"] = parse_ts(t["start_date"]), parse_ts(t["end_date"])
        t["_queued"], t["_scheduled"] = parse_ts(t["queued_dttm"]), parse_ts(t["scheduled_dttm"])
        t["_dur"] = (
            float(t["duration"])
            if t["duration"] is not None
            else ((t["_end"] - t["_start"]).total_seconds() if t["_start"] and t["_end"] else 0.0)
        )
    ran = [t for t in tis if t["_start"] and t["_end"]]
    report_ti = next((t for t in ran if t["_short"] == "report"), None)
    end = report_ti["_end"] if report_ti else parse_ts(raw["dag_run"].get("end_date"))
    wall = (end - queued).total_seconds() if end and queued else float("nan")
    busy = _union_seconds([(t["_start"], t["_end"]) for t in ran])
    first_start = min((t["_start"] for t in ran), default=None)
    task_seconds = sum(t["_dur"] for t in ran)
    parallelism = task_seconds / busy if busy else float("nan")

    per_task: dict[str, dict[str, Any]] = {}
    order = {name: i for i, name in enumerate(TASKS)}
    for short in sorted(dict.fromkeys(t["_short"] for t in tis), key=lambda n: order.get(n, 99)):
        group = [t for t in ran if t["_short"] == short]
        mem = [raw["memory"].get(t["id"]) for t in group]
        mem = [m for m in mem if m]
        per_task[short] = {
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
            "states": dict(
                sorted(
                    {
                        s: sum(1 for t in tis if t["_short"] == short and t["state"] == s)
                        for s in {t["state"] for t in tis if t["_short"] == short}
                    }.items(),
                    key=lambda kv: str(kv[0]),
                )
            ),
            "peak_rss_mb": round(max(m["hwm_kb"] for m in mem) / 1024, 1) if mem else None,
            "median_peak_rss_mb": round(statistics.median(m["hwm_kb"] for m in mem) / 1024, 1)
            if mem
            else None,
            "peak_private_mb": round(max(m["private_kb"] for m in mem) / 1024, 1) if mem else None,
            "memory_sampled": f"{len(mem)}/{len(group)}",
        }

    def dur(short: str) -> float:
        return per_task.get(short, {}).get("duration", {}).get("sum", 0.0)

    mlflow_span = sum(
        (r["end"] - r["start"]).total_seconds() for r in raw["mlflow_runs"] if r["end"]
    )
    fit = sum(r["fit_seconds"] or 0.0 for r in raw["mlflow_runs"])
    components = {
        "data phase (ingest+validate)": dur("ingest") + dur("validate"),
        "training": dur("train") - mlflow_span,
        "MLflow run in train": mlflow_span,
        "promote": dur("promote"),
        "forecast": dur("forecast"),
        "resolve+report": dur("resolve_tickers") + dur("report"),
    }
    gap = wall - busy

    rows = (raw.get("report") or {}).get("tickers") or []
    training = {}
    for r in rows:
        # "trained v3", "reused v2", "not retrained: v2 covers these bars", "-"
        status = str(r.get("training", "-")).split(":")[0].split(" v")[0]
        training[status] = training.get(status, 0) + 1
    staged = (raw.get("ingested") or {}).get("staged") or {}
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
    n = len(rows) or len(staged)
    train_tis = [t for t in tis if t["_short"] == "train" and (t["map_index"] or 0) >= 0]
    return {
        "label": raw["label"],
        "run_id": raw["run_id"],
        "as_of": raw["as_of"],
        "state": raw["state"],
        "tickers": n,
        "failed_tickers": (raw.get("report") or {}).get("failed", []),
        "wall_seconds": round(wall, 2),
        "per_ticker_seconds": round(wall / n, 3) if n else None,
        "start_latency_seconds": round((first_start - queued).total_seconds(), 2)
        if first_start and queued
        else None,
        "busy_seconds": round(busy, 2),
        "gap_seconds": round(gap, 2),
        "task_seconds": round(task_seconds, 2),
        "effective_parallelism": round(parallelism, 2),
        "components_task_seconds": {k: round(v, 2) for k, v in components.items()},
        "components_wall_seconds": {
            k: round(v / parallelism, 2) if parallelism == parallelism else None
            for k, v in components.items()
        },
        "fit_seconds": round(fit, 2),
        "mlflow_run_seconds": round(mlflow_span, 2),
        "mlflow_runs": len(raw["mlflow_runs"]),
        "per_task": per_task,
        "training": training,
        "fetched": fetched,
        "peak_total_rss_mb": raw["peak_total_rss_mb"],
        "executor": raw["executor"],
        "executor_workers": len(raw["workers"]),
        "worker_peak_rss_mb": round(
            max((w["hwm_kb"] for w in raw["workers"]), default=0) / 1024, 1
        ),
        "worker_peak_private_mb": round(
            max((w["private_kb"] for w in raw["workers"]), default=0) / 1024, 1
        ),
        "task_instances": len(tis),
        "task_instances_ran": len(ran),
        "train_instances": len(train_tis),
        "states": {s: sum(1 for r in rows if r.get("state") == s) for s in STATES},
    }


def universe_csv(path: Path, n: int, template: list[Any]) -> list[str]:
    """A made-up universe of `n` tickers SYN0001.. with the default universe's asset-class mix.

    Ticker i gets the class of template row (7 * i) mod len(template): every block of
    len(template) tickers has exactly the default mix, and small universes are still mixed.
    """
    import csv

    size = len(template)
    tickers = []
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ticker", "asset_class", "name"])
        for i in range(n):
            cls = template[(7 * i) % size].asset_class
            ticker = f"SYN{i + 1:04d}"
            writer.writerow([ticker, cls, f"synthetic {cls} {i + 1}"])
            tickers.append(ticker)
    return tickers


def logical_dates(count: int) -> list[datetime]:
    """Distinct logical dates for the bench's runs: the latest schedule tick first (so the
    scheduler does not create a run of its own on unpause), then one day earlier each."""
    from harness import latest_tick

    tick = latest_tick(datetime.now(UTC))
    return [tick - timedelta(days=k) for k in range(count)]
