"""`price_forecast` end to end with `dag.test()` against a real MLflow server (README.md, "What a daily run does").

Each scenario runs the DAG in a subprocess (`dag_runner.py`) with its own AIRFLOW_HOME, DATA_DIR
and MLflow server, then checks what the run left behind: task states, the run report, the store,
the forecasts table and the MLflow registry.

1. bad params: a malformed ticker is refused at trigger; an unknown one fails `resolve_tickers`;
2. one bad batch among five tickers (file source): only that ticker fails, nothing of it is
   published or registered, its batch is in quarantine, the others finish, the run fails;
3. the whole universe (31 tickers, synthetic data, tiny models), then the same logical date again:
   one pass (one task per stage + one train instance per ticker), every ticker gets a model and a gate
   decision; the second run maps no train instance and registers nothing new.
"""

from __future__ import annotations

import json
import math
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from ml.config import PROJECT_ROOT
from ml.pipeline import STAGES
from ml.servers import MlflowServer
from ml.universe import Universe, load_universe
from tests.dags.conftest import DagTestResult, pipeline_env, task_states

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

LOGICAL_DATE = "2024-06-28T22:30:00+00:00"
AS_OF = date(2024, 6, 28)
ONCE_PER_RUN = tuple(s for s in STAGES if s != "train")


@pytest.fixture(scope="module")
def universe() -> Universe:
    return load_universe(PROJECT_ROOT / "universe.csv")


def _client(server: MlflowServer):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)


def _registered(server: MlflowServer) -> dict[str, list[Any]]:
    """{registered model name: [versions]} on `server`."""
    client = _client(server)
    names = [m.name for m in client.search_registered_models(max_results=1000)]
    return {n: client.search_model_versions(f"name = '{n}'", max_results=1000) for n in names}


def _champion(server: MlflowServer, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return _client(server).get_model_version_by_alias(name, "champion")
    except MlflowException:
        return None


def _forecasts(data_dir: Path):
    import pandas as pd

    path = data_dir / "forecasts" / "forecasts.csv"
    return pd.read_csv(path, dtype={"model_version": "string"}) if path.exists() else None


def _mapped(run: dict[str, Any], task_id: str) -> dict[int, dict[str, Any]]:
    return {t["map_index"]: t for t in run["task_instances"] if t["task_id"] == task_id}


# --- 1. bad params ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_params(run_dag_test, tmp_path_factory: pytest.TempPathFactory) -> DagTestResult:
    work = tmp_path_factory.mktemp("bad_params")
    # Nothing may reach MLflow: point it at a closed port.
    env = pipeline_env(work / "data", "http://127.0.0.1:9")
    return run_dag_test(
        work,
        [
            {"logical_date": LOGICAL_DATE, "conf": {"tickers": ["../x"]}},
            {"logical_date": LOGICAL_DATE, "conf": {"tickers": ["ZZZZ"]}},
        ],
        env,
        timeout=600,
    )


def _no_ticker_work(data_dir: Path) -> list[str]:
    return [
        p.name for p in (data_dir / d for d in ("staging", "prices", "quarantine")) if p.exists()
    ]


def test_malformed_ticker_is_refused_at_trigger(bad_params: DagTestResult) -> None:
    run = bad_params.runs[0]
    assert "exception" in run, f"dag.test accepted tickers=['../x']\n{bad_params.describe()}"
    assert run["exception"]["type"] == "ParamValidationError", run["exception"]
    assert "tickers" in run["exception"]["message"] and "../x" in run["exception"]["message"]
    assert "task_instances" not in run
    assert _no_ticker_work(bad_params.data_dir) == []


def test_unknown_ticker_fails_resolve_before_any_ticker_work(bad_params: DagTestResult) -> None:
    run = bad_params.runs[1]
    assert run.get("state") == "failed", bad_params.describe()
    states = task_states(run)
    assert states[("resolve_tickers", None)] == "failed"
    downstream = [
        t for t in run["task_instances"] if t["task_id"] not in ("resolve_tickers", "report")
    ]
    assert {t["task_id"] for t in downstream} == set(STAGES) - {"resolve_tickers", "report"}
    # The data phase never ran and train was never expanded (one unmapped placeholder);
    # promote and forecast run after any outcome (all_done) and found nothing to do.
    assert {t["task_id"]: (t["map_index"], t["state"]) for t in downstream} == {
        **{stage: (-1, "upstream_failed") for stage in STAGES[1 : STAGES.index("train") + 1]},
        "promote": (-1, "success"),
        "forecast": (-1, "success"),
    }
    assert _no_ticker_work(bad_params.data_dir) == []
    log = bad_params.log_of(1)
    assert "unknown ticker 'ZZZZ'" in log, log[-4000:]
    assert "invalid run parameters" in log


def test_report_fails_cleanly_when_resolve_failed(bad_params: DagTestResult) -> None:
    run = bad_params.runs[1]
    assert task_states(run)[("report", None)] == "failed"
    assert "TypeError: 'NoneType' object is not iterable" not in bad_params.log_of(1)


# --- 2. one bad batch among five tickers ---------------------------------------------------------

BATCH_TICKERS = ["AMD", "SPY", "EURUSD=X", "SOL-USD", "ZB=F"]
BAD_TICKER = "SPY"
BAD_DAY = "2024-06-26"


@pytest.fixture(scope="module")
def bad_batch_mlflow(tmp_path_factory: pytest.TempPathFactory):
    from ml.servers import sqlite_mlflow_server

    with sqlite_mlflow_server(tmp_path_factory.mktemp("bad_batch_mlflow")) as server:
        yield server


@pytest.fixture(scope="module")
def bad_batch(
    run_dag_test, bad_batch_mlflow: MlflowServer, universe: Universe, tmp_path_factory
) -> DagTestResult:
    """Five tickers replayed from CSV files; SPY has High < Low on one recent row."""
    from ml.data.sources import SyntheticSource

    work = tmp_path_factory.mktemp("bad_batch")
    files = work / "price_files"
    files.mkdir()
    for ticker in BATCH_TICKERS:
        instrument = universe.get(ticker)
        frame = SyntheticSource().fetch(instrument, date(2022, 1, 3), AS_OF)
        if ticker == BAD_TICKER:
            row = frame.index[frame["Date"] == BAD_DAY]
            assert len(row) == 1
            high, low = frame.loc[row, "High"].copy(), frame.loc[row, "Low"].copy()
            frame.loc[row, "High"], frame.loc[row, "Low"] = low.to_numpy(), high.to_numpy()
            assert (frame.loc[row, "High"] < frame.loc[row, "Low"]).all()
        frame.to_csv(files / f"{instrument.slug}.csv", index=False)
    env = pipeline_env(
        work / "data",
        bad_batch_mlflow.uri,
        PRICE_SOURCE="files",
        PRICE_FILES_DIR=str(files),
        MODEL_KINDS="gru",
    )
    return run_dag_test(
        work, [{"logical_date": LOGICAL_DATE, "conf": {"tickers": BATCH_TICKERS}}], env
    )


def test_bad_batch_fails_only_its_ticker(bad_batch: DagTestResult) -> None:
    run = bad_batch.runs[0]
    assert run.get("state") == "failed", bad_batch.describe()
    states = task_states(run)
    good = [t for t in BATCH_TICKERS if t != BAD_TICKER]
    # The data phase ran once for all five; only the good four were mapped for training.
    for task_id in ONCE_PER_RUN[:-1]:
        assert states[(task_id, None)] == "success", task_id
    assert states[("report", None)] == "failed"
    trains = {
        t["rendered_map_index"]: t["state"]
        for t in run["task_instances"]
        if t["task_id"] == "train"
    }
    assert trains == dict.fromkeys(good, "success")
    assert len(run["task_instances"]) == len(ONCE_PER_RUN) + len(good)


def test_bad_batch_report_names_ticker_and_check(bad_batch: DagTestResult) -> None:
    report = bad_batch.runs[0]["report"]
    assert report is not None, f"no report for {AS_OF}"
    assert report["logical_date"] == AS_OF.isoformat()
    assert report["failed"] == [BAD_TICKER]
    rows = {r["ticker"]: r for r in report["tickers"]}
    assert list(rows) == BATCH_TICKERS
    bad = rows[BAD_TICKER]
    assert bad["state"] == "failed" and bad["failed_step"] == "validate_and_publish"
    assert bad["validation"] == "failed"
    assert bad["error"].startswith("PriceValidationError"), bad["error"]
    assert BAD_TICKER in bad["error"] and "high_ge_low" in bad["error"], bad["error"]
    assert BAD_DAY in bad["error"], bad["error"]
    for ticker in BATCH_TICKERS:
        if ticker != BAD_TICKER:
            assert rows[ticker]["state"] == "done", rows[ticker]
            assert rows[ticker]["validation"] == "passed"
    log = bad_batch.log
    assert f"1 of {len(BATCH_TICKERS)} ticker(s) failed: {BAD_TICKER} (validate_and_publish)" in log


def test_bad_batch_is_quarantined_not_published(
    bad_batch: DagTestResult, universe: Universe
) -> None:
    data = bad_batch.data_dir
    slug = universe.get(BAD_TICKER).slug
    assert not (data / "prices" / f"{slug}.parquet").exists()
    quarantine = data / "quarantine" / slug / AS_OF.isoformat()
    assert (quarantine / "batch.parquet").is_file()
    report = json.loads((quarantine / "validation.json").read_text())
    assert "high_ge_low" in json.dumps(report)
    assert not (data / "staging" / slug / f"{AS_OF.isoformat()}.parquet").exists()
    assert not (data / "validation" / slug / f"{AS_OF.isoformat()}.json").exists()
    for ticker in BATCH_TICKERS:
        if ticker != BAD_TICKER:
            good = universe.get(ticker).slug
            assert (data / "prices" / f"{good}.parquet").is_file(), ticker
            assert not (data / "quarantine" / good).exists(), ticker


def test_bad_batch_registers_and_forecasts_only_good_tickers(
    bad_batch: DagTestResult, bad_batch_mlflow: MlflowServer, universe: Universe
) -> None:
    registered = _registered(bad_batch_mlflow)
    good = {universe.get(t).model_name for t in BATCH_TICKERS if t != BAD_TICKER}
    assert set(registered) == good
    assert universe.get(BAD_TICKER).model_name not in registered
    table = _forecasts(bad_batch.data_dir)
    forecast_tickers = set() if table is None else set(table["ticker"])
    assert BAD_TICKER not in forecast_tickers
    champions = {
        t
        for t in BATCH_TICKERS
        if t != BAD_TICKER and _champion(bad_batch_mlflow, universe.get(t).model_name) is not None
    }
    assert forecast_tickers == champions


def test_model_kinds_env_is_honoured(
    bad_batch: DagTestResult, bad_batch_mlflow: MlflowServer
) -> None:
    client = _client(bad_batch_mlflow)
    experiment = client.get_experiment_by_name("dag-tests")
    runs = client.search_runs([experiment.experiment_id])
    assert runs
    assert {r.data.params.get("kinds") for r in runs} == {"gru"}  # MODEL_KINDS=gru


# --- 3. the whole universe, twice ------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_universe(
    run_dag_test, private_mlflow: MlflowServer, tmp_path_factory: pytest.TempPathFactory
) -> DagTestResult:
    work = tmp_path_factory.mktemp("full_universe")
    env = pipeline_env(work / "data", private_mlflow.uri)
    # No `tickers`: the whole universe.csv. One candidate kind per ticker keeps 31 trainings
    # affordable (LSTM and GRU are both covered by tests/test_training.py).
    run = {"logical_date": LOGICAL_DATE, "conf": {"model_kinds": ["gru"]}}
    return run_dag_test(work, [run, run], env, timeout=1800)


def test_full_universe_run_succeeds(full_universe: DagTestResult, universe: Universe) -> None:
    first = full_universe.runs[0]
    print(
        f"first run: {first.get('seconds')} s, second run: {full_universe.runs[1].get('seconds')} s"
    )
    assert first.get("state") == "success", full_universe.describe()
    failed = [t for t in first["task_instances"] if t["state"] != "success"]
    assert not failed, failed
    assert len(universe) == 31
    # One pass: one task per stage plus one train instance per ticker.
    assert len(first["task_instances"]) == len(ONCE_PER_RUN) + 31 == 39


def test_mapped_task_instances_are_named_by_ticker(
    full_universe: DagTestResult, universe: Universe
) -> None:
    first = full_universe.runs[0]
    tis = _mapped(first, "train")
    assert {i: t["rendered_map_index"] for i, t in tis.items()} == dict(enumerate(universe.tickers))


def test_every_ticker_has_a_model_and_a_gate_decision(
    full_universe: DagTestResult, private_mlflow: MlflowServer, universe: Universe
) -> None:
    registered = _registered(private_mlflow)
    assert set(registered) == {i.model_name for i in universe}
    for instrument in universe:
        versions = registered[instrument.model_name]
        assert versions, instrument.ticker
        for v in versions:
            assert v.tags.get("ticker") == instrument.ticker
            assert v.tags.get("logical_date") == AS_OF.isoformat()
            assert v.tags.get("gate_status") in ("promoted", "rejected"), (instrument, v.tags)
        champion = _champion(private_mlflow, instrument.model_name)
        if champion is not None:
            assert champion.tags.get("gate_status") == "promoted"
        else:
            rejected = [v for v in versions if v.tags.get("gate_status") == "rejected"]
            assert rejected, f"{instrument.ticker}: no champion and no rejected version"
            assert all(v.tags.get("gate_reason") for v in rejected)


def test_one_forecast_per_promoted_ticker(
    full_universe: DagTestResult, private_mlflow: MlflowServer, universe: Universe
) -> None:
    table = _forecasts(full_universe.data_dir)
    assert table is not None
    today = table.loc[table["logical_date"] == AS_OF.isoformat()]
    assert not today["ticker"].duplicated().any()
    champions = {
        i.ticker: c.version
        for i in universe
        if (c := _champion(private_mlflow, i.model_name)) is not None
    }
    assert champions, "no ticker got a champion"
    assert set(today["ticker"]) == set(champions)
    for row in today.itertuples():
        assert row.model_version == champions[row.ticker]
        assert row.last_bar_date <= AS_OF.isoformat()
        for value in (row.pred_high, row.pred_low, row.pred_close, row.pred_adj_close):
            assert math.isfinite(value) and value > 0, row


def test_run_summary_lists_every_ticker(full_universe: DagTestResult, universe: Universe) -> None:
    for run in full_universe.runs:
        report = run["report"]
        assert report is not None
        assert report["logical_date"] == AS_OF.isoformat()
        assert report["run_id"] == run["run_id"]
        assert [r["ticker"] for r in report["tickers"]] == universe.tickers
        assert report["failed"] == []
    assert {r["state"] for r in full_universe.runs[0]["report"]["tickers"]} == {"done"}
    assert {r["state"] for r in full_universe.runs[1]["report"]["tickers"]} == {"skipped"}
    path = full_universe.data_dir / "reports" / f"{AS_OF.isoformat()}.json"
    assert json.loads(path.read_text()) == full_universe.runs[-1]["report"]
    first = full_universe.runs[0]["report"]["tickers"]
    assert all(r["training"].startswith("trained v") for r in first), first


def test_second_run_for_the_same_date_is_idempotent(
    full_universe: DagTestResult, private_mlflow: MlflowServer, universe: Universe
) -> None:
    second = full_universe.runs[1]
    assert second.get("state") == "success", full_universe.describe()
    assert second["run_id"] != full_universe.runs[0]["run_id"]
    # Run 1 registered one trained version per ticker, and the range-aware naive as champion
    # for a ticker whose candidate the gate refused (it had none); run 2 must not add any.
    registered = _registered(private_mlflow)
    kinds = {name: [v.tags.get("model_kind") for v in vs] for name, vs in registered.items()}
    assert set(kinds) == {i.model_name for i in universe}
    for name, found in kinds.items():
        trained = [k for k in found if k != "naive"]
        assert len(trained) == 1 and len(found) - len(trained) <= 1, (name, found)
        naive = [v for v in registered[name] if v.tags.get("model_kind") == "naive"]
        assert all(v.tags.get("logical_date") == AS_OF.isoformat() for v in naive), name
    rows = {r["ticker"]: r for r in second["report"]["tickers"]}
    for ticker, row in rows.items():
        assert row["training"] == "not retrained: v1 covers these bars", (ticker, row)
        assert row["rows_added"] == 0, (ticker, row)
    table = _forecasts(full_universe.data_dir)
    assert not table.duplicated(["ticker", "logical_date"]).any()


def test_second_run_skips_train_promote_forecast(
    full_universe: DagTestResult, universe: Universe
) -> None:
    """No new bar and a version for these bars: train is mapped over nothing, forecasts are kept."""
    second = full_universe.runs[1]
    states = task_states(second)
    for task_id in ONCE_PER_RUN:
        assert states[(task_id, None)] == "success", task_id
    # An empty expansion: one unmapped placeholder, skipped; no train instance ran.
    trains = [
        (t["map_index"], t["state"]) for t in second["task_instances"] if t["task_id"] == "train"
    ]
    assert trains == [(-1, "skipped")], trains
    # The report still lists each ticker's kept champion and its forecast from the first run.
    first_rows = {r["ticker"]: r for r in full_universe.runs[0]["report"]["tickers"]}
    for row in second["report"]["tickers"]:
        before = first_rows[row["ticker"]]
        assert row.get("forecast_version") == before.get("forecast_version"), row
        if before.get("forecast_close") is None:
            assert row.get("forecast_close") is None, row
        else:  # read back from the forecasts table, which stores 6 decimals
            assert row["forecast_close"] == pytest.approx(before["forecast_close"], abs=1e-6), row


def test_run_conf_and_env_reach_the_tasks(
    full_universe: DagTestResult, private_mlflow: MlflowServer, universe: Universe
) -> None:
    """One MLflow run per ticker, with the run's `model_kinds` and the env's model settings."""
    client = _client(private_mlflow)
    experiment = client.get_experiment_by_name("dag-tests")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    # The range-aware naive registered as a fallback champion has a run of its own: not trained.
    runs = [r for r in runs if r.data.tags.get("model_kind", r.data.params.get("kinds")) != "naive"]
    assert sorted(r.data.tags["ticker"] for r in runs) == sorted(universe.tickers)
    for r in runs:
        params = r.data.params
        assert params["kinds"] == "gru", params  # from the run conf
        assert params["max_epochs"] == "2" and params["units"] == "8", params  # from the env
        assert params["history_start"] >= "2022-01-03", params
        assert params["history_end"] <= AS_OF.isoformat(), params
