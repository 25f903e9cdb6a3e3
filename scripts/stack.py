"""The embedded one-machine stack: MLflow server + Airflow standalone, all state under `.state/`.

    python scripts/stack.py demo       start both (if not running), run price_forecast once, print the summary
    python scripts/stack.py start      start both and return
    python scripts/stack.py backfill --from-date D1 --to-date D2
    python scripts/stack.py stop       stop what this script started (by pid)

Ports: AIRFLOW_PORT (8080), MLFLOW_PORT (5000). PRICE_SOURCE picks the data (synthetic by default).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("STACK_STATE_DIR", ROOT / ".state"))
PIDS = STATE / "pids.json"
BIN = Path(sys.executable).parent
DAG_ID = "price_forecast"
POOLS = {
    "price_source": (4, "caps concurrent requests to the price source (Yahoo rate limits)"),
    "training": (2, "caps concurrent model trainings (one per core)"),
}

sys.path.insert(0, str(ROOT))

from ml.servers import start_mlflow_server, wait_for_http  # noqa: E402


def stack_env() -> dict[str, str]:
    airflow_port = os.environ.get("AIRFLOW_PORT", "8080")
    mlflow_port = os.environ.get("MLFLOW_PORT", "5000")
    env = os.environ.copy()
    env.update(
        AIRFLOW_HOME=str(STATE / "airflow"),
        AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(ROOT / "plugins"),
        # SQLite has one writer: wait for it (plugins/airflow_sqlite.py) instead of "database is locked".
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS="airflow_sqlite.CONNECT_ARGS",
        AIRFLOW__CORE__LOAD_EXAMPLES="false",
        AIRFLOW__CORE__PARALLELISM=env.get("AIRFLOW__CORE__PARALLELISM", "4"),
        # LocalExecutor whose workers import TensorFlow/MLflow/GX once (plugins/preloading_executor.py);
        # STACK_EXECUTOR=LocalExecutor gives the stock one.
        AIRFLOW__CORE__EXECUTOR=env.get(
            "STACK_EXECUTOR", "preloading_executor.PreloadingLocalExecutor"
        ),
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="true",
        AIRFLOW__API__PORT=airflow_port,
        AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{airflow_port}",
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{airflow_port}/execution/",
        AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="30",
        # A run is a chain of a few tasks: an idle scheduler loop of 1 s (the default) adds up to
        # a second to every hand-off. A quarter of a second costs little CPU on one machine.
        AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME=env.get(
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME", "0.25"
        ),
        DATA_DIR=env.get("DATA_DIR", str(STATE / "data")),
        MLFLOW_TRACKING_URI=f"http://127.0.0.1:{mlflow_port}",
        PRICE_SOURCE=env.get("PRICE_SOURCE", "synthetic"),
        TF_CPP_MIN_LOG_LEVEL="2",
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
        MLFLOW_DISABLE_TELEMETRY="true",
        PYTHONPATH=str(ROOT),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def _load_pids() -> dict[str, int]:
    return json.loads(PIDS.read_text()) if PIDS.exists() else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def airflow(*args: str, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    """Run an `airflow` CLI command against the stack. SQLite allows one writer at a time: a
    command that timed out on "database is locked" (the scheduler was writing) rolled back and
    is run again, up to five times."""
    for attempt in range(5):
        proc = subprocess.run(
            [str(BIN / "airflow"), *args],
            env=stack_env(),
            check=False,
            text=True,
            capture_output=capture,
        )
        output = (proc.stdout or "") + (proc.stderr or "")
        if proc.returncode == 0 or "database is locked" not in output:
            break
        time.sleep(3 * (attempt + 1))
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


def start() -> None:
    env = stack_env()
    STATE.mkdir(parents=True, exist_ok=True)
    os.environ.update({k: env[k] for k in ("DATA_DIR", "PRICE_SOURCE")})
    pids = {k: v for k, v in _load_pids().items() if _alive(v)}
    mlflow_port = int(env["MLFLOW_TRACKING_URI"].rsplit(":", 1)[1])
    if "mlflow" not in pids:
        print(
            f"starting MLflow tracking server on 127.0.0.1:{mlflow_port} (SQLite, local artifacts)"
        )
        server = start_mlflow_server(
            f"sqlite:///{STATE / 'mlflow' / 'mlflow.db'}",
            STATE / "mlflow" / "artifacts",
            STATE / "logs" / "mlflow.log",
            port=mlflow_port,
        )
        pids["mlflow"] = server.process.pid
        PIDS.write_text(json.dumps(pids))
    if "airflow" not in pids:
        print(
            f"starting Airflow standalone on 127.0.0.1:{env['AIRFLOW__API__PORT']} ({env['AIRFLOW__CORE__EXECUTOR'].rsplit('.', 1)[-1]}, SQLite)"
        )
        airflow("db", "migrate")
        log = open(STATE / "logs" / "airflow-standalone.log", "ab")  # noqa: SIM115 - outlives this call
        proc = subprocess.Popen(
            [str(BIN / "airflow"), "standalone"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=STATE,
        )
        pids["airflow"] = proc.pid
        PIDS.write_text(json.dumps(pids))
    wait_for_http(f"http://127.0.0.1:{env['AIRFLOW__API__PORT']}/api/v2/version", timeout=300)
    for name, (slots, description) in POOLS.items():
        airflow("pools", "set", name, str(slots), description)
    _wait_for_dag()


def _wait_for_dag(timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = airflow("dags", "list", "-o", "json", check=False)
        if listed.returncode == 0 and DAG_ID in listed.stdout:
            return
        time.sleep(3)
    errors = airflow("dags", "list-import-errors", check=False).stdout
    raise SystemExit(f"{DAG_ID} was not parsed within {timeout:.0f}s. Import errors:\n{errors}")


def _runs() -> list[dict]:
    out = airflow("dags", "list-runs", DAG_ID, "-o", "json", check=False).stdout or ""
    # The CLI may print warnings before the JSON document: parse from the line that starts it.
    for i, line in enumerate(out.splitlines()):
        if line.startswith("["):
            try:
                return json.loads("\n".join(out.splitlines()[i:]))
            except json.JSONDecodeError:
                return []
    return []


def _wait_for_run(run_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        state = next((r.get("state") for r in _runs() if r.get("run_id") == run_id), None)
        if state != last:
            print(f"  {run_id}: {state}", flush=True)
            last = state or ""
        if state in ("success", "failed"):
            return state
        time.sleep(5)
    raise SystemExit(
        f"{run_id} did not finish within {timeout:.0f}s; it is still running in Airflow"
    )


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


def demo(as_of: date | None, timeout: float, tickers: list[str] | None = None) -> int:
    """Trigger one run and wait for it. By default the run is for the latest schedule tick, created
    before the DAG is unpaused, so the scheduler does not start a second run for the same date.
    With an explicit date, unpausing also lets the scheduler run the latest tick (catchup is off,
    max_active_runs=1 queues the two runs one after the other)."""
    started = time.monotonic()
    start()
    env = stack_env()
    if as_of is None:
        logical = latest_tick()
    else:
        logical = datetime(as_of.year, as_of.month, as_of.day, 22, 30, tzinfo=UTC)
    as_of = logical.date()
    run_id = f"demo__{as_of.isoformat()}__{int(time.time())}"
    print(f"triggering {DAG_ID} for {as_of} ({env['PRICE_SOURCE']} prices) as {run_id}")
    conf = ["--conf", json.dumps({"tickers": tickers})] if tickers else []
    airflow(
        "dags", "trigger", DAG_ID, "--run-id", run_id, "--logical-date", logical.isoformat(), *conf
    )
    airflow("dags", "unpause", DAG_ID)
    state = _wait_for_run(run_id, timeout)
    report = Path(env["DATA_DIR"]) / "reports" / f"{as_of.isoformat()}.json"
    from ml.steps.report import format_table

    if report.exists():
        payload = json.loads(report.read_text())
        print()
        print(format_table(payload["tickers"]))
    print()
    print(f"run {run_id}: {state} in {time.monotonic() - started:.0f}s")
    print(f"Airflow UI : http://127.0.0.1:{env['AIRFLOW__API__PORT']}  (login: {_credentials()})")
    print(f"MLflow UI  : {env['MLFLOW_TRACKING_URI']}")
    print(f"summary    : {report}")
    print(f"forecasts  : {Path(env['DATA_DIR']) / 'forecasts' / 'forecasts.csv'}")
    print("stop with  : make stop")
    return 0 if state == "success" else 1


def backfill(from_date: str, to_date: str, wait: bool, timeout: float) -> int:
    """Backfill [from, to] one date after the other. A plain end date is taken as the whole day:
    the runs are at 22:30, and Airflow reads `--to-date 2024-06-27` as midnight, leaving that day
    out. One run at a time, so each date's promotion sees the dates before it."""
    start()
    airflow("dags", "unpause", DAG_ID)
    if len(to_date) == 10:
        to_date += "T23:59:59"
    out = airflow(
        "backfill",
        "create",
        "--dag-id",
        DAG_ID,
        "--from-date",
        from_date,
        "--to-date",
        to_date,
        "--max-active-runs",
        "1",
    )
    print(out.stdout)
    if not wait:
        return 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [r for r in _runs() if r.get("run_type") == "backfill"]
        pending = [r for r in runs if r.get("state") not in ("success", "failed")]
        if runs and not pending:
            for r in runs:
                print(f"  {r['logical_date']}  {r['state']}")
            return 0 if all(r["state"] == "success" for r in runs) else 1
        time.sleep(5)
    print("backfill still running; watch it in the Airflow UI (Dag runs)")
    return 1


def stop() -> int:
    pids = _load_pids()
    for name, pid in pids.items():
        if not _alive(pid):
            continue
        print(f"stopping {name} (pid {pid})")
        try:
            os.killpg(pid, signal.SIGTERM)
        except OSError:
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(p) for p in pids.values()):
        time.sleep(0.5)
    # Each service leads its own process group: kill whatever of the group is left (server workers
    # can outlive their parent), not only the leader.
    for pid in pids.values():
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
    PIDS.unlink(missing_ok=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo")
    d.add_argument(
        "--date", type=date.fromisoformat, default=None, help="logical date (default: last weekday)"
    )
    d.add_argument("--timeout", type=float, default=3600)
    d.add_argument("--tickers", nargs="+", help="subset of the universe (default: all)")
    sub.add_parser("start")
    b = sub.add_parser("backfill")
    b.add_argument("--from-date", required=True)
    b.add_argument("--to-date", required=True)
    b.add_argument("--no-wait", action="store_true")
    b.add_argument("--timeout", type=float, default=3600)
    sub.add_parser("stop")
    args = parser.parse_args()
    if args.command == "demo":
        return demo(args.date, args.timeout, args.tickers)
    if args.command == "start":
        start()
        return 0
    if args.command == "backfill":
        return backfill(args.from_date, args.to_date, not args.no_wait, args.timeout)
    return stop()


if __name__ == "__main__":
    raise SystemExit(main())
