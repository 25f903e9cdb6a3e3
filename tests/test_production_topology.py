"""The production topology of docker-compose.yaml, natively: PostgreSQL, Redis, CeleryExecutor.

Runs `scripts/production_native.py` (scripts/topology.py, on scripts/launcher.py) for a handful
of tickers: four throwaway PostgreSQL databases (Airflow metadata, MLflow backend, MLflow's users,
the forecast ledger), an MLflow server on PostgreSQL behind basic auth, the Airflow api-server,
scheduler, dag-processor, triggerer and two Celery workers on a Redis broker. One `price_forecast`
run must succeed with its task instances spread over both workers (so the pipeline logged in to
MLflow), every ticker must end with a
`champion` (or a recorded gate rejection) in the PostgreSQL-backed registry, its forecasts must be
in the ledger's PostgreSQL database, MLflow must refuse requests without the pipeline's login and
other users' attempts to move the `champion` alias, and afterwards nothing
may be left: no databases, no processes, no Redis keys, no state dir.

Skips, with the reason, only where PostgreSQL or Redis does not answer on 127.0.0.1.
"""

from __future__ import annotations

import functools
import os
import secrets
import signal
from collections import Counter
from pathlib import Path
from typing import Any

# Installed from requirements.txt: missing clients are a broken environment, not a reason to skip.
import psycopg2  # noqa: F401
import pytest
import redis  # noqa: F401

from ml.pipeline import STAGES
from ml.universe import MODEL_NAME_PREFIX, ticker_slug
from scripts import production_native as native
from scripts.launcher import processes_with_marker
from scripts.services import existing_databases, pg_exec
from scripts.topology import Topology

TICKERS = (
    ("GOOGL", "stock", "Alphabet"),
    ("SPY", "etf", "SPDR S&P 500 ETF"),
    ("EURUSD=X", "forex", "Euro / US Dollar"),
    ("SOL-USD", "crypto", "Solana"),
)
# Start-up plus the run (about 3 minutes on an idle 2-core machine); cleanup adds up to a minute.
RUN_TIMEOUT = 720
TEST_TIMEOUT = 900

LOGIN_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
VIEWER = ("viewer", "a-viewer-password")

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
        result = native.run_topology(
            TICKERS, timeout=RUN_TIMEOUT, token=token, while_up=_probe_mlflow_auth
        )
    finally:
        # run_topology cleans up in its own `finally`; this only catches what it could not.
        leftovers = [d for d in existing_databases() if d.endswith(f"_{token}")]
        for name in leftovers:
            pg_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        stray = processes_with_marker(token)
        for pid in stray:
            os.kill(pid, signal.SIGKILL)
    result["leftover_databases_seen_by_test"] = leftovers
    result["leftover_processes_seen_by_test"] = stray
    _print_summary(result)
    return result


def _probe_mlflow_auth(topo: Topology) -> dict[str, Any]:
    """While the topology is up: HTTP statuses of MLflow requests made without the pipeline's login,
    with a wrong one, with the right one, and by another (non-admin) user on a pipeline model."""
    import requests
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = topo.mlflow_uri
    api = f"{uri}/api/2.0/mlflow"
    search = f"{api}/registered-models/search"
    login = (topo.mlflow_auth.username, topo.mlflow_auth.password)
    out: dict[str, Any] = {}
    try:
        out["no_login"] = requests.get(search, timeout=30).status_code
        out["wrong_password"] = requests.get(
            search, auth=(login[0], "x" + login[1]), timeout=30
        ).status_code
        out["unknown_user"] = requests.get(
            search, auth=("nobody", login[1]), timeout=30
        ).status_code
        out["pipeline_login"] = requests.get(search, auth=login, timeout=30).status_code
        saved = {k: os.environ.pop(k) for k in LOGIN_VARIABLES if k in os.environ}
        try:
            MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models()
            out["client_without_login"] = "allowed"
        except MlflowException as exc:
            out["client_without_login"] = exc.get_http_status_code()
        finally:
            os.environ.update(saved)
        # Another user, as the admin may create for people: by default it is granted nothing.
        user = {"username": VIEWER[0], "password": VIEWER[1]}
        out["viewer_created"] = requests.post(
            f"{api}/users/create", json=user, auth=login, timeout=30
        ).status_code
        models = sorted(
            topo.registry().items(), key=lambda m: ("champion" not in m[1]["aliases"], m)
        )
        name, info = models[0]
        # Point `champion` where it already is (or at version 1): harmless had it been allowed.
        alias = {"name": name, "alias": "champion", "version": info["aliases"].get("champion", "1")}
        out["viewer_reads_model"] = requests.get(
            f"{api}/registered-models/get", params={"name": name}, auth=VIEWER, timeout=30
        ).status_code
        out["viewer_sets_champion"] = requests.post(
            f"{api}/registered-models/alias", json=alias, auth=VIEWER, timeout=30
        ).status_code
        out["admin_sets_champion"] = requests.post(
            f"{api}/registered-models/alias", json=alias, auth=login, timeout=30
        ).status_code
    except Exception as exc:  # reported by the test, not raised into the fixture
        out["error"] = repr(exc)
    return out


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
    # One task per stage, train mapped: one instance per ticker.
    assert len(topology["task_instances"]) == len(STAGES) - 1 + len(TICKERS)
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
    assert processes_with_marker(topology["token"]) == []
    assert cleanup["databases_left"] == []
    assert topology["leftover_databases_seen_by_test"] == []
    present = set(existing_databases())
    assert not present & set(topology["databases"]), f"databases left: {present}"
    assert cleanup["redis_keys_left"] == 0
    assert cleanup["state_dir_removed"] is True
    assert not Path(topology["state_dir"]).exists()


def test_mlflow_refuses_requests_without_the_pipelines_login(topology: dict) -> None:
    # The run succeeded (test_run_succeeds): the workers logged in; nothing else gets in.
    auth = topology["while_up"]
    assert "error" not in auth, auth
    assert auth["no_login"] == 401, auth
    assert auth["client_without_login"] == 401, auth
    assert auth["wrong_password"] == 401, auth
    assert auth["unknown_user"] == 401, auth
    assert auth["pipeline_login"] == 200, auth


def test_other_mlflow_users_cannot_read_or_move_the_champion(topology: dict) -> None:
    auth = topology["while_up"]
    assert "error" not in auth, auth
    assert auth["viewer_created"] == 200, auth
    assert auth["viewer_reads_model"] == 403, auth
    assert auth["viewer_sets_champion"] == 403, auth
    assert auth["admin_sets_champion"] == 200, auth
