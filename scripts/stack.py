"""The embedded one-machine stack: MLflow server + Airflow standalone, all state under `.state/`.

    python scripts/stack.py demo       start both (if not running), run price_forecast once, print the summary
    python scripts/stack.py start      start both and return
    python scripts/stack.py backfill --from-date D1 --to-date D2
    python scripts/stack.py stop       stop what this script started (by pid)

Ports: AIRFLOW_PORT (8080), MLFLOW_PORT (5000). PRICE_SOURCE picks the data (synthetic by default);
STACK_EXECUTOR=LocalExecutor gives Airflow's stock executor; STACK_STATE_DIR moves `.state/`. The
stack is scripts/launcher.py's `embedded_env` with this process's environment; `.state/pids.json`
records its processes.

`demo` can be run again: Airflow allows one run per logical date, so when the day already has its
run, the new one has no logical date and processes the same day through the DAG's `as_of` param
(one line of the output says which). A failure of demo, start or backfill is one line: what went
wrong, what became of the stack and where the details are (`.state/logs/stack.log`). The stack is
stopped if this command started it (all or part of it), unless `--keep` or STACK_KEEP=1 asks to
leave it up for a look (`stop` stops it later); a stack that was already running is left alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import time
import traceback
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.launcher import DAG_ID, AirflowStack, StackError, embedded_env  # noqa: E402

STATE = Path(os.environ.get("STACK_STATE_DIR", ROOT / ".state"))
PIDS = STATE / "pids.json"
# The full story of a failure (traceback, the CLI's output); the terminal gets one line.
FAILURES = STATE / "logs" / "stack.log"
KEEP_ENV = "STACK_KEEP"


def stack() -> AirflowStack:
    """The stack under STATE: the one pids.json records (running or not), or a new one."""
    record = json.loads(PIDS.read_text()) if PIDS.exists() else {}
    if "token" in record:
        launcher, _ = AirflowStack.load(PIDS, STATE)
    else:
        launcher = AirflowStack(STATE)
    airflow_port = int(os.environ.get("AIRFLOW_PORT", "8080"))
    mlflow_port = os.environ.get("MLFLOW_PORT", "5000")
    launcher.env = embedded_env(
        STATE,
        api_port=airflow_port,
        mlflow_uri=f"http://127.0.0.1:{mlflow_port}",
        token=launcher.token,
    )
    launcher.on_spawn = lambda: launcher.save(PIDS)
    return launcher


def start(launcher: AirflowStack) -> None:
    """Start what of the stack is not running yet, and wait until it is ready for a run. What
    this process starts is in `launcher.processes` (the way `fail` tells whose stack it is)."""
    env = launcher.env
    STATE.mkdir(parents=True, exist_ok=True)
    os.environ.update({k: env[k] for k in ("DATA_DIR", "PRICE_SOURCE")})
    running = launcher.leaders()
    if {"mlflow", "standalone"} <= running.keys():
        mlflow = env["MLFLOW_TRACKING_URI"]
        print(f"reusing the running stack: Airflow {launcher.api_url}, MLflow {mlflow}")
    if "mlflow" not in running:
        port = int(env["MLFLOW_TRACKING_URI"].rsplit(":", 1)[1])
        print(f"starting MLflow tracking server on 127.0.0.1:{port} (SQLite, local artifacts)")
        launcher.start_mlflow(f"sqlite:///{STATE / 'mlflow' / 'mlflow.db'}", port=port)
    if "standalone" not in running:
        executor = env["AIRFLOW__CORE__EXECUTOR"].rsplit(".", 1)[-1]
        print(f"starting Airflow standalone on 127.0.0.1:{launcher.api_port} ({executor}, SQLite)")
        launcher.migrate()
        launcher.start("standalone")
    launcher.wait_healthy(timeout=300)
    launcher.import_pools()
    launcher.wait_for_dag(timeout=180)


def latest_tick() -> datetime:
    """The latest 22:30 UTC schedule tick: the run the scheduler itself would create on unpause."""
    now = datetime.now(UTC)
    tick = now.replace(hour=22, minute=30, second=0, microsecond=0)
    return tick if tick <= now else tick - timedelta(days=1)


def _credentials() -> str:
    path = STATE / "airflow" / "simple_auth_manager_passwords.json.generated"
    try:
        users = json.loads(path.read_text())
        return ", ".join(f"{u} / {p}" for u, p in users.items())
    except (OSError, json.JSONDecodeError):
        return f"see {path}"


def _progress(run_id: str):
    last = [""]

    def show(runs: list[dict]) -> None:
        state = next((r.get("state") for r in runs), None) or ""
        if state != last[0]:
            print(f"  {run_id}: {state}", flush=True)
            last[0] = state

    return show


def runs_on(launcher: AirflowStack, logical: datetime) -> list[dict[str, Any]]:
    """The runs of the DAG whose logical date is `logical` (at most one: Airflow's unique key)."""
    return [
        r for r in launcher.list_runs()
        if r.get("logical_date") and datetime.fromisoformat(r["logical_date"]) == logical
    ]  # fmt: skip


def trigger_demo_run(
    launcher: AirflowStack, logical: datetime, tickers: list[str] | None = None
) -> str:
    """Trigger the demo's run of `logical`'s day, print one line saying which run it is, and
    return its run id.

    The day's first run has the schedule tick as its logical date, like the run the scheduler
    would create. Airflow allows one run per logical date (the metadata DB refuses a second: an
    IntegrityError), so when the day has its run already (an earlier demo, or the scheduler's
    own once the DAG is unpaused), the new run has no logical date and gets the day through the
    DAG's `as_of` param: the pipeline is idempotent per day, so it reuses the bars and models
    stored by then and writes the day's forecasts and report again."""
    day = logical.date().isoformat()
    conf: dict[str, Any] = {"tickers": tickers} if tickers else {}
    stamp = int(time.time())
    source = launcher.env["PRICE_SOURCE"]
    earlier = runs_on(launcher, logical)
    if not earlier:
        run_id = f"demo__{day}__{stamp}"
        try:
            launcher.trigger(run_id, logical.isoformat(), conf or None)
        except StackError:
            # An unpaused DAG on a restarted stack: the scheduler may have created the tick's
            # run since the look above. Anything else is a failure.
            earlier = runs_on(launcher, logical)
            if not earlier:
                raise
        else:
            print(f"triggering {DAG_ID} for {day} ({source} prices) as {run_id}")
            return run_id
    first = earlier[0]
    run_id = f"demo__{day}__{stamp}__again"
    print(
        f"{day} already has its run ({first['run_id']}, {first['state']}) and Airflow allows one"
        f" run per logical date: triggering a new run of {day} without one (param as_of), which"
        f" reuses the bars and models stored so far, as {run_id}"
    )
    launcher.trigger(run_id, None, {**conf, "as_of": day})
    return run_id


def demo(
    launcher: AirflowStack, as_of: date | None, timeout: float, tickers: list[str] | None = None
) -> int:
    """Start the stack, trigger one run and wait for it. By default the run is for the latest
    schedule tick, created before the DAG is unpaused, so the scheduler does not start a second
    run for the same date. With an explicit date, unpausing also lets the scheduler run the latest
    tick (catchup is off, max_active_runs=1 queues the two runs one after the other)."""
    started = time.monotonic()
    start(launcher)
    env = launcher.env
    if as_of is None:
        logical = latest_tick()
    else:
        logical = datetime(as_of.year, as_of.month, as_of.day, 22, 30, tzinfo=UTC)
    as_of = logical.date()
    run_id = trigger_demo_run(launcher, logical, tickers)
    launcher.unpause()
    runs = launcher.wait_for_runs(timeout, run_id=run_id, poll=5, on_poll=_progress(run_id))
    state = runs[0]["state"]
    report = Path(env["DATA_DIR"]) / "reports" / f"{as_of.isoformat()}.json"
    from ml.steps.report import format_table

    if report.exists():
        payload = json.loads(report.read_text())
        print()
        print(format_table(payload["tickers"]))
    print()
    print(f"run {run_id}: {state} in {time.monotonic() - started:.0f}s")
    print(f"Airflow UI : {launcher.api_url}  (login: {_credentials()})")
    print(f"MLflow UI  : {env['MLFLOW_TRACKING_URI']}")
    print(f"summary    : {report}")
    print(f"forecasts  : {Path(env['DATA_DIR']) / 'forecasts' / 'forecasts.csv'}")
    print("stop with  : make stop")
    return 0 if state == "success" else 1


def backfill(
    launcher: AirflowStack, from_date: str, to_date: str, wait: bool, timeout: float
) -> int:
    """Backfill [from, to] one date after the other. A plain end date is taken as the whole day:
    the runs are at 22:30, and Airflow reads `--to-date 2024-06-27` as midnight, leaving that day
    out. One run at a time, so each date's promotion sees the dates before it."""
    start(launcher)
    launcher.unpause()
    if len(to_date) == 10:
        to_date += "T23:59:59"
    out = launcher.cli(
        "backfill", "create", "--dag-id", DAG_ID, "--from-date", from_date,
        "--to-date", to_date, "--max-active-runs", "1",
    )  # fmt: skip
    print(out.stdout)
    if not wait:
        return 0
    try:
        runs = launcher.wait_for_runs(timeout, run_type="backfill", poll=5)
    except StackError:
        print("backfill still running; watch it in the Airflow UI (Dag runs)")
        return 1
    for r in runs:
        print(f"  {r['logical_date']}  {r['state']}")
    return 0 if all(r["state"] == "success" for r in runs) else 1


def stop() -> int:
    if not PIDS.exists():
        return 0
    record = json.loads(PIDS.read_text())
    if "token" not in record:  # written before scripts/launcher.py: {name: pid}
        for name, pid in record.items():
            print(f"stopping {name} (pid {pid})")
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGTERM)
        PIDS.unlink()
        return 0
    launcher = stack()
    for name, pid in launcher.leaders().items():
        print(f"stopping {name} (pid {pid})")
    left = launcher.stop()
    PIDS.unlink(missing_ok=True)
    if left:
        print(f"still running after SIGKILL: {left}")
    return 1 if left else 0


def _reason(exc: BaseException) -> str:
    """What went wrong, in a few words: the error's first line, and for a failed `airflow`
    command the last error its output names (its first line is only "... exited 1")."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    what = lines[0].rstrip(":")
    if not isinstance(exc, StackError | RuntimeError | OSError):
        what = f"{type(exc).__name__}: {what}"  # unexpected: the type says more
    cause = [line for line in lines[1:] if re.match(r"^[\w.]+(Error|Exception): ", line)]
    if cause:
        what += f" ({cause[-1][:200]})"
    return what


def fail(command: str, launcher: AirflowStack | None, exc: BaseException, keep: bool) -> int:
    """Report a failure of `command` in one line: what went wrong, what became of the stack, the
    way out; the traceback and the whole error (a CLI's output) go to FAILURES. The stack is
    stopped if this process started any of it (a half-started stack is of no use, and nothing
    would tell the user it is running), unless `keep`; one that was running before is left alone.
    Returns the exit code."""
    FAILURES.parent.mkdir(parents=True, exist_ok=True)
    with open(FAILURES, "a") as log:
        log.write(f"--- {datetime.now(UTC).isoformat(timespec='seconds')} stack.py {command}\n")
        log.write("".join(traceback.format_exception(exc)))
    what = _reason(exc)
    if launcher is None or not launcher.processes:
        running = launcher.leaders() if launcher is not None else {}
        stack_is = (
            "the stack that was running before is left running (make stop stops it)"
            if running else "nothing is left running"
        )  # fmt: skip
    elif keep:
        names = ", ".join(launcher.leaders()) or "nothing"
        stack_is = f"left running as asked: {names} (make stop stops it)"
    else:
        left = launcher.stop()
        PIDS.unlink(missing_ok=True)
        stack_is = (
            f"stopped the stack it had started (--keep or {KEEP_ENV}=1 leaves it up for a look)"
            if not left else f"could not stop pids {left}"
        )  # fmt: skip
    print(f"stack.py {command} failed: {what}; {stack_is}; details in {FAILURES}", file=sys.stderr)
    return 130 if isinstance(exc, KeyboardInterrupt) else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    keeping = argparse.ArgumentParser(add_help=False)
    keeping.add_argument(
        "--keep",
        action="store_true",
        default=os.environ.get(KEEP_ENV, "") not in ("", "0"),
        help=f"on a failure, leave the stack this command started running (or {KEEP_ENV}=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", parents=[keeping])
    d.add_argument(
        "--date",
        type=date.fromisoformat,
        default=None,
        help="logical date (default: the latest 22:30 UTC schedule tick)",
    )
    d.add_argument("--timeout", type=float, default=3600)
    d.add_argument("--tickers", nargs="+", help="subset of the universe (default: all)")
    sub.add_parser("start", parents=[keeping])
    b = sub.add_parser("backfill", parents=[keeping])
    b.add_argument("--from-date", required=True)
    b.add_argument("--to-date", required=True)
    b.add_argument("--no-wait", action="store_true")
    b.add_argument("--timeout", type=float, default=3600)
    sub.add_parser("stop")
    args = parser.parse_args()
    if args.command == "stop":
        return stop()
    launcher = None
    try:
        launcher = stack()
        if args.command == "demo":
            return demo(launcher, args.date, args.timeout, args.tickers)
        if args.command == "backfill":
            return backfill(launcher, args.from_date, args.to_date, not args.no_wait, args.timeout)
        start(launcher)
        return 0
    except (Exception, KeyboardInterrupt) as exc:
        return fail(args.command, launcher, exc, args.keep)


if __name__ == "__main__":
    raise SystemExit(main())
