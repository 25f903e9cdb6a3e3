"""A 2:1 split healed through `price_forecast` with `dag.test()` (docs/data.md, "Corporate
actions and vendor revisions").

Three tickers replayed from CSV files against a real MLflow server: a day before the split,
then the vendor's series after it (every earlier NVDA bar halved) for the next day, run twice.
The split is detected, NVDA's history replaced by the re-adjusted one and trained once; the
neighbour AMD is not refetched; the re-run maps no train instance and registers nothing. GLD's
new bar has High = 1e308 (a hostile file): it is quarantined, never published, and fails the run
after the others finished.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ml.data.revisions import max_relative_difference
from ml.data.sources import FileSource, SyntheticSource
from ml.data.store import PriceStore
from ml.servers import MlflowServer
from ml.universe import Instrument
from tests.dags.conftest import DagTestResult, pipeline_env, task_states

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

START = date(2022, 1, 3)
D0, D1 = date(2024, 6, 21), date(2024, 6, 24)
NVDA, AMD, GLD = Instrument("NVDA", "stock"), Instrument("AMD", "stock"), Instrument("GLD", "etf")
PRICES = ["Open", "High", "Low", "Close", "Adj Close"]


def _serve(files: Path, ticker: str, bars: pd.DataFrame, until: date) -> None:
    bars.loc[bars["Date"] <= pd.Timestamp(until)].to_csv(files / f"{ticker}.csv", index=False)


def _versions(server: MlflowServer, name: str) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
    return sorted(v.version for v in client.search_model_versions(f"name = '{name}'"))


@pytest.fixture(scope="module")
def healed(
    run_dag_test, private_mlflow: MlflowServer, tmp_path_factory: pytest.TempPathFactory
) -> tuple[DagTestResult, DagTestResult, dict]:
    work = tmp_path_factory.mktemp("revision")
    files = work / "price_files"
    files.mkdir()
    nvda = SyntheticSource().fetch(NVDA, START, D1).drop(columns="Ticker")
    amd = SyntheticSource().fetch(AMD, START, D1).drop(columns="Ticker")
    gld = SyntheticSource().fetch(GLD, START, D1).drop(columns="Ticker")
    before = nvda.copy()
    before[PRICES] *= 2  # the pre-split scale: the vendor halves every earlier bar at the split
    before["Volume"] /= 2
    env = pipeline_env(
        work / "data",
        private_mlflow.uri,
        PRICE_SOURCE="files",
        PRICE_FILES_DIR=str(files),
        HISTORY_START=START.isoformat(),
    )
    conf = {"tickers": ["NVDA", "AMD", "GLD"]}
    _serve(files, "NVDA", before, D0)
    _serve(files, "AMD", amd, D0)
    _serve(files, "GLD", gld, D0)
    first = run_dag_test(work / "d0", [{"logical_date": f"{D0}T22:30:00+00:00", "conf": conf}], env)
    versions = {"before": _versions(private_mlflow, "price-forecast-NVDA")}
    gld_published = (work / "data" / "prices" / "GLD.parquet").read_bytes()
    _serve(files, "NVDA", nvda, D1)
    _serve(files, "AMD", amd, D1)
    gld.loc[gld.index[-1], "High"] = 1e308
    _serve(files, "GLD", gld, D1)
    day = {"logical_date": f"{D1}T22:30:00+00:00", "conf": conf}
    second = run_dag_test(work / "d1", [day, day], env)
    versions["after"] = _versions(private_mlflow, "price-forecast-NVDA")
    versions["amd"] = _versions(private_mlflow, "price-forecast-AMD")
    return first, second, {"versions": versions, "files": files, "gld": gld_published}


def test_the_split_is_healed_and_reported(healed) -> None:
    first, second, extra = healed
    assert first.runs[0].get("state") == "success", first.describe()
    run = second.runs[0]
    assert run.get("state") == "failed", second.describe()  # GLD's hostile bar, below
    rows = {r["ticker"]: r for r in run["report"]["tickers"]}
    assert run["report"]["failed"] == ["GLD"]
    assert rows["NVDA"]["state"] == rows["AMD"]["state"] == "done"
    assert rows["NVDA"]["data_event"].startswith("split 2:1 on 2024-06-24: history re-adjusted")
    assert "data_event" not in rows["AMD"]
    assert rows["NVDA"]["train_reason"] == rows["NVDA"]["data_event"]

    store = PriceStore(second.data_dir)
    published = store.load(NVDA)
    fresh = FileSource(extra["files"]).fetch(NVDA, START, D1)
    assert max_relative_difference(fresh, published) < 1e-6
    assert np.abs(np.diff(np.log(published["Close"]))).max() < 0.3
    assert list((second.data_dir / "quarantine" / "NVDA").glob("superseded-*/NVDA.parquet"))


def test_the_ticker_trains_once_and_a_rerun_changes_nothing(healed) -> None:
    _, second, extra = healed
    trained = [k for k, v in task_states(second.runs[0]).items() if k[0] == "train"]
    assert sorted(t for _, t in trained) == ["AMD", "NVDA"]  # AMD: its new bar
    rerun = second.runs[1]
    assert rerun["report"]["failed"] == ["GLD"], second.describe()
    trains = [
        (t["map_index"], t["state"]) for t in rerun["task_instances"] if t["task_id"] == "train"
    ]
    assert trains == [(-1, "skipped")], trains  # an empty expansion: no train instance ran
    rows = {r["ticker"]: r for r in rerun["report"]["tickers"]}
    assert rows["NVDA"]["state"] == "skipped"
    assert rows["NVDA"]["data_event"].startswith("split 2:1 on 2024-06-24")
    versions = extra["versions"]
    assert len(versions["after"]) == len(versions["before"]) + 1  # one version for the split


def test_a_hostile_bar_is_quarantined_and_never_published(healed) -> None:
    _, second, extra = healed
    rows = {r["ticker"]: r for r in second.runs[0]["report"]["tickers"]}
    assert rows["GLD"]["failed_step"] == "validate_and_publish"
    assert "[range_to_close]" in rows["GLD"]["error"] and "High=1e+308" in rows["GLD"]["error"]
    assert (second.data_dir / "prices" / "GLD.parquet").read_bytes() == extra["gld"]
    report = second.data_dir / "quarantine" / "GLD" / D1.isoformat() / "validation.json"
    assert "1e+308" in report.read_text()
