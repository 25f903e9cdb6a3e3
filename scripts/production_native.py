"""The production topology of docker-compose.yaml, started natively on this machine (no Docker).

    python scripts/production_native.py                 run price_forecast once, print a summary, clean up
    python scripts/production_native.py --keep          leave everything running for inspection
    python scripts/production_native.py --stop DIR      tear down what a --keep run left in DIR
    python scripts/production_native.py --tickers GOOGL:stock SPY:etf --timeout 1200

It needs PostgreSQL (trust auth for user `postgres`) and Redis on 127.0.0.1 (scripts/services.py)
and starts (scripts/topology.py, with scripts/launcher.py):

- four throwaway PostgreSQL databases, `pf_airflow_<id>` (Airflow metadata and Celery results),
  `pf_mlflow_<id>` (MLflow backend store), `pf_mlflow_auth_<id>` (MLflow's users) and
  `pf_ledger_<id>` (the forecast ledger);
- an MLflow tracking server on the MLflow database, serving artifacts from the state dir, behind
  basic auth as in docker-compose.yaml (docker/mlflow-basic-auth.ini, a random admin password):
  only the Celery workers get the login (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD);
- Airflow with CeleryExecutor and a Redis broker (an empty Redis database number plus a unique key
  prefix): `db migrate`, pools, api-server, scheduler, dag-processor, triggerer and two Celery
  workers, `worker1@<host>` and `worker2@<host>`, each in its own process group;
- then triggers `price_forecast` for a fixed logical date, waits for the run and reports where each
  task instance ran and what the MLflow registry holds.

Each worker records its own name as the task-instance hostname (`[core] hostname_callable` set to
`scripts.launcher.worker_hostname`, which reads PF_WORKER_NAME), so the metadata database shows
which worker ran what. Without --keep everything is removed at the end: process groups, the
databases, the Redis keys, the state dir.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.launcher import tail  # noqa: E402
from scripts.services import (  # noqa: E402
    PG_HOST,
    PG_PORT,
    PG_USER,
    REDIS_HOST,
    REDIS_PORT,
    pg_dsn,
    pg_exec,
    redis_client,
)
from scripts.topology import DEFAULT_TICKERS, WORKERS, Log, Topology, _print  # noqa: E402

LOGICAL_DATE = "2024-06-28T22:30:00+00:00"


def services_available() -> str | None:
    """None if PostgreSQL and Redis answer on 127.0.0.1 (and the clients are installed), else why not."""
    try:
        import psycopg2
        import redis
    except ImportError as exc:
        return f"client library missing: {exc}"
    try:
        conn = psycopg2.connect(pg_dsn())
        conn.close()
    except psycopg2.Error as exc:
        detail = " ".join(str(exc).split())
        return f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT} as {PG_USER}: {detail}"
    try:
        redis_client().ping()
    except redis.RedisError as exc:
        return f"Redis not reachable at {REDIS_HOST}:{REDIS_PORT}: {exc}"
    return None


def run_topology(
    tickers: Iterable[tuple[str, str, str]] = DEFAULT_TICKERS,
    *,
    logical_date: str = LOGICAL_DATE,
    timeout: float = 900.0,
    keep: bool = False,
    state_dir: Path | None = None,
    worker_concurrency: int = 2,
    with_triggerer: bool = True,
    scheduled_runs: bool = False,
    token: str | None = None,
    log: Log = _print,
    while_up: Callable[[Topology], Any] | None = None,
) -> dict[str, Any]:
    """Start the topology, run price_forecast once for `logical_date`, collect where every task ran
    and what the registry holds, then (unless `keep`) tear everything down.
    `while_up(topology)`, if given, runs after the run, before teardown; its result is `while_up`.

    `timeout` bounds start-up plus the run; cleanup adds up to about a minute. The result dict has
    `state`, `wall_seconds`, `task_instances`, `tasks_per_worker`, `registry` (from the server),
    `registry_in_postgres` (model names read from the MLflow database), `ledger_in_postgres`
    (tickers in the ledger's forecasts and monitor tables), `report` (the run's JSON
    summary), `cleanup` (None with keep) and the topology's names (token, databases, Redis db and
    key prefix, URLs, state dir). `token` (default random) names the databases and marks every
    process started, so a caller can check afterwards that nothing is left."""
    if state_dir is not None and state_dir.exists() and any(state_dir.iterdir()):
        # cleanup removes the state dir: never one that holds anything else
        raise ValueError(f"state dir {state_dir} exists and is not empty")
    started = time.monotonic()
    deadline = started + timeout
    topo = Topology(
        tickers,
        state_dir=state_dir,
        worker_concurrency=worker_concurrency,
        with_triggerer=with_triggerer,
        scheduled_runs=scheduled_runs,
        token=token,
        log=log,
    )
    result: dict[str, Any] = {
        "token": topo.token,
        "state_dir": str(topo.state),
        "databases": [topo.airflow_db, topo.mlflow_db, topo.mlflow_auth_db],
        "tickers": [t for t, _, _ in topo.tickers],
        "cleanup": None,
    }
    try:
        topo.start(deadline)
        result.update(
            redis_db=topo.redis_db,
            redis_prefix=topo.redis_prefix,
            airflow_url=f"http://127.0.0.1:{topo.api_port}",
            mlflow_url=topo.mlflow_uri,
            admin_password=topo.admin_password,
            mlflow_login=[topo.mlflow_auth.username, topo.mlflow_auth.password],
            workers=[topo.worker_name(w) for w in WORKERS],
        )
        result.update(topo.run_dag(logical_date, deadline))
        result["wall_seconds"] = time.monotonic() - started
        tis = topo.task_instances(result["run_id"])
        result["task_instances"] = tis
        result["tasks_per_worker"] = dict(Counter(ti["hostname"] for ti in tis if ti["hostname"]))
        result["registry"] = topo.registry()
        # The same registry read straight from the MLflow database: it is PostgreSQL-backed.
        result["registry_in_postgres"] = sorted(
            r[0] for r in pg_exec("SELECT name FROM registered_models", topo.mlflow_db)
        )
        # The forecast ledger lives in its own PostgreSQL database too.
        result["ledger_in_postgres"] = {
            table: sorted({r[0] for r in pg_exec(f"SELECT ticker FROM {table}", topo.ledger_db)})
            for table in ("forecasts", "monitor")
        }
        report = Path(topo.env["DATA_DIR"]) / "reports" / f"{logical_date[:10]}.json"
        result["report"] = json.loads(report.read_text()) if report.exists() else None
        if while_up is not None:
            result["while_up"] = while_up(topo)
        if result["state"] != "success":
            result["failed_task_logs"] = _failed_task_logs(topo, tis)
    finally:
        if keep:
            log(f"--keep: left running; state in {topo.state}")
        else:
            log("cleaning up")
            result["cleanup"] = topo.cleanup()
            result["cleanup_seconds"] = time.monotonic() - started - result.get("wall_seconds", 0)
    return result


def _failed_task_logs(topo: Topology, tis: list[dict[str, Any]], lines: int = 30) -> dict[str, str]:
    """The tail of each failed task instance's log file, for the report of a failed run."""
    out = {}
    base = Path(topo.env["AIRFLOW_HOME"]) / "logs"
    for ti in tis:
        if ti["state"] not in ("failed", "up_for_retry"):
            continue
        where = f"task_id={ti['task_id']}"
        if ti["map_index"] >= 0:
            where += f"/map_index={ti['map_index']}"
        files = sorted(base.rglob(f"{where}/attempt=*.log"))
        key = f"{ti['task_id']}[{ti['ticker'] or ti['map_index']}]"
        out[key] = "\n".join(tail(f, lines * 200) for f in files[-1:]) or "(no log file found)"
    return out


def format_summary(result: dict[str, Any]) -> str:
    lines = [
        f"run {result.get('run_id')}: {result.get('state')} "
        f"(wall time {result.get('wall_seconds', 0):.0f}s, run {result.get('run_seconds', 0):.0f}s)"
    ]
    per_worker: dict[str, list[str]] = {}
    for ti in result.get("task_instances", []):
        label = ti["task_id"].split(".")[-1] + (f"[{ti['ticker']}]" if ti["map_index"] >= 0 else "")
        per_worker.setdefault(ti["hostname"] or "(never ran)", []).append(label)
    lines.append("tasks per worker:")
    for host, labels in sorted(per_worker.items()):
        lines.append(f"  {host}: {len(labels)}  {', '.join(labels)}")
    lines.append("registry (champion alias / gate_status of each version):")
    for name, info in sorted(result.get("registry", {}).items()):
        gates = ", ".join(f"v{v}={i['gate_status']}" for v, i in sorted(info["versions"].items()))
        lines.append(f"  {name}: champion={info['aliases'].get('champion')}  {gates}")
    cleanup = result.get("cleanup")
    if cleanup is not None:
        lines.append(f"cleanup: {json.dumps(cleanup)}")
    for key, text in (result.get("failed_task_logs") or {}).items():
        lines.append(f"--- {key} ---\n{text}")
    return "\n".join(lines)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _ticker_arg(raw: str) -> tuple[str, str, str]:
    ticker, _, asset_class = raw.partition(":")
    if not asset_class:
        raise argparse.ArgumentTypeError(f"{raw!r}: use TICKER:ASSET_CLASS, e.g. SPY:etf")
    return ticker, asset_class, ticker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tickers", nargs="+", type=_ticker_arg, default=list(DEFAULT_TICKERS),
        metavar="TICKER:CLASS", help="universe to run (default: GOOGL:stock SPY:etf EURUSD=X:forex SOL-USD:crypto)",
    )  # fmt: skip
    parser.add_argument("--logical-date", default=LOGICAL_DATE)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds for start-up + run")
    parser.add_argument("--keep", action="store_true", help="leave it all running (no cleanup)")
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--concurrency", type=int, default=2, help="per Celery worker")
    parser.add_argument("--no-triggerer", action="store_true")
    parser.add_argument(
        "--scheduled-runs", action="store_true", help="let the scheduler create cron runs too"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument(
        "--stop", type=Path, default=None, metavar="STATE_DIR",
        help="tear down a topology left running by --keep (processes, databases, Redis keys, dir)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.stop:
        report = Topology.from_manifest(args.stop).cleanup()
        print(json.dumps(report))
        return 0 if not report["errors"] and not report.get("leftover_pids") else 1
    reason = services_available()
    if reason:
        print(f"cannot start: {reason}", file=sys.stderr)
        return 2
    # `kill <pid>` of this script still cleans up (run_topology's `finally`).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    result = run_topology(
        args.tickers,
        logical_date=args.logical_date,
        timeout=args.timeout,
        keep=args.keep,
        state_dir=args.state_dir,
        worker_concurrency=args.concurrency,
        with_triggerer=not args.no_triggerer,
        scheduled_runs=args.scheduled_runs,
    )
    print()
    print(format_summary(result))
    if args.keep:
        print(f"Airflow UI : {result['airflow_url']}  (login: admin / {result['admin_password']})")
        print(f"MLflow UI  : {result['mlflow_url']}  (login: {' / '.join(result['mlflow_login'])})")
        print(f"logs       : {result['state_dir']}/logs")
        print(f"stop with  : {sys.executable} {__file__} --stop {result['state_dir']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0 if result.get("state") == "success" else 1


if __name__ == "__main__":
    raise SystemExit(main())
