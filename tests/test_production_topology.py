"""The production topology of docker-compose.yaml, natively: PostgreSQL, Redis, CeleryExecutor.

Runs `scripts/production_native.py` for a handful of tickers: three throwaway PostgreSQL databases
(Airflow metadata, MLflow backend, the forecast ledger), an MLflow server on PostgreSQL, the Airflow api-server,
scheduler, dag-processor, triggerer and two Celery workers on a Redis broker. One `price_forecast`
run must succeed with its task instances spread over both workers, every ticker must end with a
`champion` (or a recorded gate rejection) in the PostgreSQL-backed registry, its forecasts must be
in the ledger's PostgreSQL database, and afterwards nothing
may be left: no databases, no processes, no Redis keys, no state dir.

Skips, with the reason, only where PostgreSQL or Redis does not answer on 127.0.0.1.
"""

from __future__ import annotations

import functools
import os
import secrets
import signal
import sys
from collections import Counter
from pathlib import Path

# Installed from requirements.txt: missing clients are a broken environment, not a reason to skip.
import psycopg2  # noqa: F401
import pytest
import redis  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import production_native as native  # noqa: E402

from ml.universe import MODEL_NAME_PREFIX, ticker_slug  # noqa: E402

TICKERS = (
    ("GOOGL", "stock", "Alphabet"),
    ("SPY", "etf", "SPDR S&P 500 ETF"),
    ("EURUSD=X", "forex", "Euro / US Dollar"),
    ("SOL-USD", "crypto", "Solana"),
)
# Start-up plus the run (about 3 minutes on an idle 2-core machine); cleanup adds up to a minute.
RUN_TIMEOUT = 720
TEST_TIMEOUT = 900

# The timeout covers the module fixture's set-up, whichever test triggers it.
pytestmark = [pytest.mark.production, pytest.mark.slow, pytest.mark.timeout(TEST_TIMEOUT)]


@functools.cache
def _unavailable() -> str | None:
    return native.services_available()


@pytest.fixture(scope="module")
def topology() -> dict:
    reason = _unavailable()
    if reason:
        pytest.skip(f"needs PostgreSQL and Redis on 127.0.0.1: {reason}")
    token = "t" + secrets.token_hex(4)
    try:
        result = native.run_topology(TICKERS, timeout=RUN_TIMEOUT, token=token)
    finally:
        # run_topology cleans up in its own `finally`; this only catches what it could not.
        leftovers = [d for d in native.existing_databases() if d.endswith(f"_{token}")]
        for name in leftovers:
            native._pg_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        stray = native.processes_with_marker(token)
        for pid in stray:
            os.kill(pid, signal.SIGKILL)
    result["leftover_databases_seen_by_test"] = leftovers
    result["leftover_processes_seen_by_test"] = stray
    _print_summary(result)
    return result


def _print_summary(result: dict) -> None:
    print()
    print(
        f"production topology: run {result.get('state')} in {result.get('run_seconds', 0):.0f}s, "
        f"wall time {result.get('wall_seconds', 0):.0f}s (start-up + run), "
        f"cleanup {result.get('cleanup_seconds', 0):.0f}s"
    )
    print(native.format_summary(result))


def test_run_succeeds(topology: dict) -> None:
    failed = {
        f"{ti['task_id']}[{ti['ticker']}]": ti["state"]
        for ti in topology["task_instances"]
        if ti["state"] != "success"
    }
    assert topology["state"] == "success", (
        f"run ended {topology['state']}; unsuccessful task instances: {failed}\n"
        + "\n".join(f"--- {k}\n{v}" for k, v in (topology.get("failed_task_logs") or {}).items())
    )
    assert not failed
    # One pass: resolve_tickers, ingest, validate, promote, forecast, report + one train per ticker
    assert len(topology["task_instances"]) == 6 + len(TICKERS)
    report = topology["report"]
    assert report is not None, "no run report in DATA_DIR/reports"
    assert report["failed"] == []
    assert sorted(r["ticker"] for r in report["tickers"]) == sorted(t for t, _, _ in TICKERS)


def test_tasks_ran_on_both_celery_workers(topology: dict) -> None:
    workers = topology["workers"]
    assert len(set(workers)) == 2
    tis = topology["task_instances"]
    spread = Counter(ti["hostname"] for ti in tis)
    assert set(spread) == set(workers), f"task instances per hostname: {dict(spread)}"
    for ti in tis:
        # Each ran as a Celery task, and the worker whose log received that Celery task id is the
        # one whose name the task recorded as its hostname.
        assert ti["external_executor_id"], f"{ti['task_id']} has no Celery task id"
        assert ti["celery_worker"] == ti["hostname"], ti


def test_every_ticker_has_a_champion_or_a_recorded_rejection(topology: dict) -> None:
    registry = topology["registry"]
    for ticker, _, _ in TICKERS:
        name = MODEL_NAME_PREFIX + ticker_slug(ticker)
        assert name in registry, f"{name} not registered; registry has {sorted(registry)}"
        model = registry[name]
        gates = {v["gate_status"] for v in model["versions"].values()}
        assert "champion" in model["aliases"] or "rejected" in gates, (name, model)
        if "champion" in model["aliases"]:
            champion = model["versions"][model["aliases"]["champion"]]
            assert champion["gate_status"] == "promoted", (name, model)
    # The server's registry is the PostgreSQL database: the same names, read with SQL.
    assert topology["registry_in_postgres"] == sorted(registry)


def test_forecasts_and_the_ledger_are_in_postgresql(topology: dict) -> None:
    registry = topology["registry"]
    with_champion = sorted(
        t
        for t, _, _ in TICKERS
        if "champion" in registry.get(MODEL_NAME_PREFIX + ticker_slug(t), {}).get("aliases", {})
    )
    ledger = topology["ledger_in_postgres"]
    assert ledger["forecasts"] == with_champion, ledger
    assert ledger["monitor"] == sorted(t for t, _, _ in TICKERS)


def test_everything_was_cleaned_up(topology: dict) -> None:
    cleanup = topology["cleanup"]
    assert cleanup is not None
    assert cleanup["errors"] == []
    assert cleanup["leftover_pids"] == []
    assert topology["leftover_processes_seen_by_test"] == []
    assert native.processes_with_marker(topology["token"]) == []
    assert cleanup["databases_left"] == []
    assert topology["leftover_databases_seen_by_test"] == []
    present = set(native.existing_databases())
    assert not present & set(topology["databases"]), f"databases left: {present}"
    assert cleanup["redis_keys_left"] == 0
    assert cleanup["state_dir_removed"] is True
    assert not Path(topology["state_dir"]).exists()
