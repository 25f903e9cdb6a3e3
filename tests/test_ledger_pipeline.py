"""The ledger inside the daily run (real MLflow server, real store, tiny real training):

- ten business days of runs leave one scored outcome per forecast whose bar arrived, live
  metrics in the run summary and on the champion's model version, and re-running the days gives
  the same ledger;
- a ticker whose bars change regime is flagged (input drift) and retrained by the next run even
  without new bars.
"""

from __future__ import annotations

import itertools
import json
import uuid
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ml.config import Settings
from ml.forecasts.ledger import read_table
from tests.conftest import isolated_settings, with_model

pytestmark = pytest.mark.slow

DAYS = [d.date() for d in pd.bdate_range("2024-06-03", periods=10)]
TICKERS = ["LEDGA", "LEDGB"]


def run_day(tickers: list[str], as_of: date, settings: Settings) -> dict:
    """One daily run in the DAG's order, through the pipeline's batch steps."""
    from ml.steps.data import ingest_all, validate_all
    from ml.steps.forecast import forecast_all
    from ml.steps.model import promote_all, train_step

    ingested = ingest_all(tickers, as_of, settings)
    assert ingested["failed"] == {}, ingested
    validated = validate_all(list(ingested["staged"]), as_of, settings)
    assert validated["failed"] == {}, validated
    trained = [
        train_step(t, as_of, settings, seed=validated["tickers"][t].get("retrain_seed"))
        for t in validated["train"]
    ]
    promoted = promote_all(validated, trained, as_of, settings)
    forecasted = forecast_all(sorted(validated["tickers"]), as_of, settings)
    return {
        "validated": validated,
        "trained": trained,
        "promoted": promoted,
        "forecasted": forecasted,
    }


@pytest.fixture(scope="module")
def ten_days(tmp_path_factory: pytest.TempPathFactory, mlflow_server) -> dict:
    settings = with_model(
        isolated_settings(
            tmp_path_factory.mktemp("ledger"),
            mlflow_server.uri,
            f"test-ledger-{uuid.uuid4().hex[:8]}",
            {t: t for t in TICKERS},
        ),
        kinds=("lstm",),
        max_epochs=2,
    )
    runs = {day: run_day(TICKERS, day, settings) for day in DAYS}
    return {"settings": settings, "runs": runs}


def test_ten_days_leave_one_scored_outcome_per_forecast_whose_bar_arrived(ten_days) -> None:
    settings = ten_days["settings"]
    forecasts = read_table(settings, "forecasts")
    outcomes = read_table(settings, "outcomes")
    with_champion = {
        t for t in TICKERS if ten_days["runs"][DAYS[-1]]["forecasted"]["forecasts"].get(t)
    }
    assert with_champion, "no ticker got a champion"
    assert set(forecasts["ticker"]) == with_champion
    # One forecast per (ticker, day); every one made before the last day has its bar now.
    keys = ["ticker", "last_bar_date", "model_version"]
    assert not forecasts.duplicated(["ticker", "last_bar_date"]).any()
    expected = forecasts.loc[forecasts["last_bar_date"] < DAYS[-1].isoformat(), keys]
    pd.testing.assert_frame_equal(outcomes[keys], expected.reset_index(drop=True))
    next_day = {d.isoformat(): n.isoformat() for d, n in itertools.pairwise(DAYS)}
    assert list(outcomes["target_date"]) == [next_day[d] for d in outcomes["last_bar_date"]]
    assert np.isfinite(outcomes[[c for c in outcomes if c.startswith("err_")]]).all().all()


def test_live_metrics_reach_the_run_summary_and_the_champion_version(ten_days) -> None:
    from ml.registry.client import CHAMPION, get_alias, get_client
    from ml.steps.common import instrument_for
    from ml.steps.report import summarize_day
    from tests.conftest import day_from_steps

    settings = ten_days["settings"]
    last = ten_days["runs"][DAYS[-1]]
    monitor = last["forecasted"]["monitor"]
    for ticker, watched in monitor.items():
        if not last["forecasted"]["forecasts"].get(ticker):
            continue
        assert watched["live"]["n"] == len(DAYS) - 1
        assert watched["live"]["u2_high"] > 0 and 0 <= watched["live"]["coverage"] <= 1
        client = get_client(settings)
        champion = get_alias(client, instrument_for(ticker, settings).model_name, CHAMPION)
        tags = client.get_model_version(champion.name, champion.version).tags
        assert tags["live_as_of"] == DAYS[-1].isoformat()
        assert json.loads(tags["live_metrics"])["20"]["n"] == len(DAYS) - 1
        assert "tested" in json.loads(tags["input_drift"])
    rows = summarize_day(
        day_from_steps(
            TICKERS,
            ingested={"staged": {t: {} for t in TICKERS}, "failed": {}},
            validated=last["validated"],
            trained=last["trained"],
            promoted=last["promoted"],
            forecasted=last["forecasted"],
        )
    )
    assert any(r.get("live", {}).get("n") == len(DAYS) - 1 for r in rows)


def test_re_running_the_days_gives_the_same_ledger(ten_days) -> None:
    settings = ten_days["settings"]
    before = {name: read_table(settings, name) for name in ("forecasts", "outcomes", "monitor")}
    for day in DAYS:
        again = run_day(TICKERS, day, settings)
        assert again["trained"] == [] or all(t["status"] != "trained" for t in again["trained"])
    for name, table in before.items():
        pd.testing.assert_frame_equal(read_table(settings, name), table, obj=name)


# --- a regime change -----------------------------------------------------------------------------


def calm_then_wild(n_calm: int, n_wild: int) -> pd.DataFrame:
    """Weekday bars: a calm random walk, then n_wild bars with four times the volatility."""
    rng = np.random.default_rng(7)
    n = n_calm + n_wild
    vol = np.r_[np.full(n_calm, 0.008), np.full(n_wild, 0.032)]
    close = 50 * np.exp(np.cumsum(rng.normal(0, vol)))
    open_ = close * np.exp(rng.normal(0, vol / 3))
    high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0, vol)))
    low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0, vol)))
    return pd.DataFrame(
        {
            "Date": pd.bdate_range("2022-01-03", periods=n).strftime("%Y-%m-%d"),
            "Open": open_,
            "High": high,
            "Low": low,
            "Close": close,
            "Adj Close": close,
            "Volume": rng.integers(10_000, 20_000, n).astype(float),
        }
    )


def test_a_regime_change_is_flagged_and_retrained_without_new_bars(
    tmp_path: Path, mlflow_server
) -> None:
    ticker = "REGIME"
    files = tmp_path / "files"
    files.mkdir()
    (tmp_path / "root").mkdir()
    settings = with_model(
        isolated_settings(
            tmp_path / "root",
            mlflow_server.uri,
            f"test-regime-{uuid.uuid4().hex[:8]}",
            {ticker: "x"},
        ),
        kinds=("lstm",),
        max_epochs=2,
    )
    settings = replace(
        settings, price_source="files", price_files_dir=files, history_start=date(2022, 1, 3)
    )
    bars = calm_then_wild(560, 60)
    calm_end = date.fromisoformat(bars["Date"].iloc[559])
    wild_end = date.fromisoformat(bars["Date"].iloc[-1])

    bars.iloc[:560].to_csv(files / f"{ticker}.csv", index=False)
    first = run_day([ticker], calm_end, settings)
    assert first["promoted"]["decisions"][ticker]["promoted"], first["promoted"]
    assert first["forecasted"]["monitor"][ticker]["drifted"] is False

    bars.to_csv(files / f"{ticker}.csv", index=False)  # sixty wild bars arrive
    wild = run_day([ticker], wild_end, settings)
    watched = wild["forecasted"]["monitor"][ticker]
    assert watched["drifted"] is True, watched
    assert watched["retrain_reason"].startswith("input drift: ")

    # The next run has no new bar; the monitor's flag alone sends the ticker to training.
    holiday = run_day([ticker], wild_end + pd.Timedelta(days=3).to_pytimedelta(), settings)
    summary = holiday["validated"]["tickers"][ticker]
    assert summary["rows_added"] == 0 and summary["rows_updated"] == 0
    assert holiday["validated"]["train"] == [ticker]
    assert summary["train_reason"].startswith(f"monitor ({wild_end}): input drift: ")
    assert [t["status"] for t in holiday["trained"]] == ["trained"]
    # Re-running that day reuses the retrained version instead of training again.
    again = run_day([ticker], wild_end + pd.Timedelta(days=3).to_pytimedelta(), settings)
    assert [t["status"] for t in again["trained"]] == ["reused"]
    assert again["trained"][0]["version"] == holiday["trained"][0]["version"]
