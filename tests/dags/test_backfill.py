"""A 3-day backfill through the REAL Airflow 3 scheduler (point in time: README.md, "Backfills").

The test starts its own stack (tests/dags/stack.py, on scripts/launcher.py) as subprocesses on a
temp AIRFLOW_HOME:
`airflow dag-processor`, `airflow scheduler` (LocalExecutor on the SQLite metadata DB) and
`airflow api-server` (LocalExecutor tasks report to its execution API), plus a private MLflow
server. It creates the pools, unpauses the DAG, runs `airflow backfill create` for
2024-06-25..2024-06-27 on a two-ticker universe and waits until the three runs finish.

Then, for each day D: the run succeeded, its report is `reports/<D>.json`, and every model trained
for D saw exactly the published bars dated <= D (MLflow param `history_end` and the version's
`data_fingerprint` against the store as of D), although the store holds later bars by then; the
forecast of D comes from a champion trained on data up to D at the latest.

Every process the test started is stopped in a `finally`, on success or failure.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest

from ml.servers import MlflowServer, sqlite_mlflow_server
from ml.universe import load_universe
from tests.dags.stack import new_stack

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

DAYS = [date(2024, 6, 25), date(2024, 6, 26), date(2024, 6, 27)]
TICKERS = [("AMD", "stock"), ("EURUSD=X", "forex")]
# The DAG's schedule is cron 30 22 * * * (UTC): the run for day D has logical date D 22:30, and
# --to-date is an inclusive timestamp, so it must reach past 22:30 of the last day.
FROM_DATE, TO_DATE = "2024-06-25", "2024-06-27T23:59:59"
RUN_CONF = {"model_kinds": ["gru"]}  # one candidate per ticker: the scheduler is what is tested
DEADLINE_SECONDS = float(os.environ.get("BACKFILL_TEST_TIMEOUT", "900"))


@pytest.fixture(scope="module")
def backfill_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with sqlite_mlflow_server(tmp_path_factory.mktemp("backfill_mlflow")) as server:
        yield server


@pytest.fixture(scope="module")
def backfill(
    airflow_db_template: Path, backfill_mlflow: MlflowServer, tmp_path_factory
) -> Iterator[dict]:
    """Start the stack, run the backfill, wait for the three runs; yields what the tests need."""
    stack = new_stack(
        airflow_db_template,
        tmp_path_factory.mktemp("backfill"),
        mlflow_uri=backfill_mlflow.uri,
        tickers=TICKERS,
        experiment="backfill",
    )
    started = time.monotonic()
    try:
        stack.boot()
        stack.cli(
            "backfill",
            "create",
            "--dag-id",
            "price_forecast",
            "--from-date",
            FROM_DATE,
            "--to-date",
            TO_DATE,
            "--max-active-runs",
            "1",
            "--dag-run-conf",
            json.dumps(RUN_CONF),
        )
        runs = stack.wait_for_runs(DEADLINE_SECONDS, count=len(DAYS))
        elapsed = time.monotonic() - started
        print(f"backfill of {len(DAYS)} days x {len(TICKERS)} tickers: {elapsed:.0f} s")
        yield {
            "runs": runs,
            "data_dir": stack.data_dir,
            "universe": load_universe(stack.universe_file),
            "stack": stack,
            "mlflow": backfill_mlflow,
        }
    finally:
        stack.stop()


def _client(server: MlflowServer):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)


def test_backfill_creates_one_successful_run_per_day(backfill: dict) -> None:
    runs = backfill["runs"]
    by_day = {r["logical_date"][:10]: r for r in runs}
    assert sorted(by_day) == [d.isoformat() for d in DAYS], runs
    for day, run in by_day.items():
        assert run["logical_date"].startswith(f"{day}T22:30:00"), run
        assert run["run_id"].startswith("backfill__"), run
        assert run["state"] == "success", f"{run}\n{backfill['stack'].diagnostics()}"


def test_each_day_has_its_own_report(backfill: dict) -> None:
    by_day = {r["logical_date"][:10]: r for r in backfill["runs"]}
    for day in DAYS:
        path = backfill["data_dir"] / "reports" / f"{day.isoformat()}.json"
        assert path.is_file(), path
        report = json.loads(path.read_text())
        assert report["logical_date"] == day.isoformat()
        assert report["run_id"] == by_day[day.isoformat()]["run_id"]
        assert [r["ticker"] for r in report["tickers"]] == [t for t, _ in TICKERS]
        assert report["failed"] == []


def test_each_day_trained_only_on_bars_up_to_that_day(backfill: dict) -> None:
    """Point in time: the store ends on the last day, yet the model of day D saw bars <= D."""
    from ml.data.store import PriceStore, data_fingerprint

    client = _client(backfill["mlflow"])
    experiment = client.get_experiment_by_name("backfill")
    assert experiment is not None
    store = PriceStore(backfill["data_dir"])
    for instrument in backfill["universe"]:
        assert store.last_date(instrument) == DAYS[-1], instrument.ticker
        for day in DAYS:
            runs = client.search_runs(
                [experiment.experiment_id],
                filter_string=(
                    f"tags.logical_date = '{day.isoformat()}' "
                    f"and tags.ticker = '{instrument.ticker}'"
                ),
            )
            assert len(runs) == 1, (instrument.ticker, day, len(runs))
            params = runs[0].data.params
            assert params["history_end"] == day.isoformat(), (instrument.ticker, day, params)
            assert params["kinds"] == "gru"  # the backfill's --dag-run-conf reached the tasks
            history = store.load(instrument, until=day)
            assert int(params["n_bars"]) == len(history)
            versions = client.search_model_versions(f"name = '{instrument.model_name}'")
            for_day = [v for v in versions if v.tags.get("logical_date") == day.isoformat()]
            assert len(for_day) == 1, (instrument.ticker, day)
            assert for_day[0].tags["data_fingerprint"] == data_fingerprint(history)
            assert for_day[0].run_id == runs[0].info.run_id


def test_each_forecast_uses_a_model_trained_up_to_its_day(backfill: dict) -> None:
    """Runs go in date order (--max-active-runs 1): the champion used on D was trained <= D."""
    import pandas as pd

    client = _client(backfill["mlflow"])
    table = pd.read_csv(
        backfill["data_dir"] / "forecasts" / "forecasts.csv", dtype={"model_version": "string"}
    )
    assert not table.duplicated(["ticker", "logical_date"]).any()
    for row in table.itertuples():
        assert row.logical_date in {d.isoformat() for d in DAYS}, row
        assert row.last_bar_date == row.logical_date, row  # all three days are weekdays
        instrument = backfill["universe"].get(row.ticker)
        version = client.get_model_version(instrument.model_name, row.model_version)
        assert version.tags["logical_date"] <= row.logical_date, (row, version.tags)
