"""The next bar's quantiles in the ledger (`ml.forecasts`): stored with each forecast (ledger and
CSV export, and a ledger or an export written before them still works), scored when the bar
arrives (coverage flags, Close's 90 % interval score beside historical simulation's, point in
time), live coverage over 20/60 bars and the retrain reason of a miscalibrated interval. Real
SQLite ledgers and files; no MLflow."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ml.config import get_settings
from ml.forecasts.ledger import _engine, read_table, record_forecasts
from ml.forecasts.monitor import (
    coverage_reason,
    live_metrics,
    monitor,
    outcome_row,
    retrain_reason,
    score_outcomes,
)
from ml.model.probabilistic import binomial_band
from ml.model.quantiles import RECORD_KEYS
from tests.test_ledger import bars, forecast

Z90 = 1.6448536269514722  # the standard normal's 0.95 quantile
Z80 = 1.2815515655446004

# The ledger's tables as the version before the quantiles created them (SQLAlchemy's DDL).
OLD_SCHEMA = """
CREATE TABLE forecasts (
    ticker VARCHAR(32) NOT NULL, last_bar_date VARCHAR(10) NOT NULL,
    model_version VARCHAR(32) NOT NULL, logical_date VARCHAR(10) NOT NULL,
    model_name VARCHAR(200) NOT NULL, last_close FLOAT NOT NULL, pred_high FLOAT NOT NULL,
    pred_low FLOAT NOT NULL, pred_close FLOAT NOT NULL, pred_adj_close FLOAT NOT NULL,
    source VARCHAR(32) NOT NULL, PRIMARY KEY (ticker, last_bar_date, model_version)
);
CREATE TABLE outcomes (
    ticker VARCHAR(32) NOT NULL, last_bar_date VARCHAR(10) NOT NULL,
    model_version VARCHAR(32) NOT NULL, target_date VARCHAR(10) NOT NULL,
    actual_high FLOAT NOT NULL, actual_low FLOAT NOT NULL, actual_close FLOAT NOT NULL,
    err_high FLOAT NOT NULL, err_low FLOAT NOT NULL, err_close FLOAT NOT NULL,
    persistence_err_high FLOAT NOT NULL, persistence_err_low FLOAT NOT NULL,
    persistence_err_close FLOAT NOT NULL, inside_range BOOLEAN NOT NULL, direction_hit BOOLEAN,
    PRIMARY KEY (ticker, last_bar_date, model_version)
);
CREATE INDEX ix_outcomes_target_date ON outcomes (target_date);
CREATE TABLE monitor (
    ticker VARCHAR(32) NOT NULL, as_of VARCHAR(10) NOT NULL, model_version VARCHAR(32),
    live TEXT NOT NULL, drift TEXT NOT NULL, retrain_reason TEXT, PRIMARY KEY (ticker, as_of)
);
"""


@pytest.fixture
def settings(tmp_path: Path):
    return replace(get_settings({}), data_dir=tmp_path / "data")


def quantiles(last: float, sd: float, width: float = 1.0) -> dict[str, float]:
    """Quantile fields of a forecast whose log-ratios are N(0, sd), intervals `width` times
    the calibrated ones."""
    half90, half80 = width * Z90 * sd, width * Z80 * sd
    return {
        "pred_close_q05": last * np.exp(-half90),
        "pred_close_q10": last * np.exp(-half80),
        "pred_close_q50": last,
        "pred_close_q90": last * np.exp(half80),
        "pred_close_q95": last * np.exp(half90),
        "pred_high_q90": last * np.exp(half80 + sd),
        "pred_high_q95": last * np.exp(half90 + sd),
        "pred_low_q10": last * np.exp(-half80 - sd),
        "pred_low_q05": last * np.exp(-half90 - sd),
    }


def with_quantiles(history: pd.DataFrame, i: int, sd: float = 0.01, width: float = 1.0) -> dict:
    row = forecast("AAA", history, i)
    return {**row, **quantiles(row["last_close"], sd, width)}


def test_quantiles_are_stored_and_read_back(settings) -> None:
    history = bars(30)
    rows = [with_quantiles(history, 20), forecast("AAA", history, 21)]  # the second: no quantiles
    record_forecasts(settings, rows)
    stored = read_table(settings, "forecasts")
    assert set(RECORD_KEYS) <= set(stored.columns)
    for key in RECORD_KEYS:
        assert stored[key].iloc[0] == pytest.approx(rows[0][key], rel=1e-12)
    assert stored[list(RECORD_KEYS)].iloc[1].isna().all()


def test_an_old_ledger_gains_the_new_columns_and_keeps_its_rows(settings) -> None:
    history = bars(30)
    path = settings.data_dir / "ledger.db"
    path.parent.mkdir(parents=True)
    old = forecast("AAA", history, 20)
    with sqlite3.connect(path) as connection:
        connection.executescript(OLD_SCHEMA)
        connection.execute(
            f"insert into forecasts ({', '.join(old)}) values ({', '.join('?' * len(old))})",
            list(old.values()),
        )
    _engine.cache_clear()  # a process that opens this file for the first time
    try:
        record_forecasts(settings, [with_quantiles(history, 21)])
        as_of = history["Date"].iloc[-1].date()
        assert score_outcomes(settings, {"AAA": history}, as_of) == {"AAA": 2}
        stored = read_table(settings, "forecasts")
        assert stored[list(RECORD_KEYS)].iloc[0].isna().all()
        assert stored[list(RECORD_KEYS)].iloc[1].notna().all()
        outcomes = read_table(settings, "outcomes")
        assert outcomes["covered_close_90"].iloc[0] is None
        assert (
            outcomes["interval_score_close_90"].iloc[0]
            != outcomes["interval_score_close_90"].iloc[0]
        )
        assert isinstance(outcomes["covered_close_90"].iloc[1], bool)
        assert np.isfinite(outcomes["hs_interval_score_close_90"].iloc[1])
        _engine.cache_clear()  # opened again: nothing left to add
        assert len(read_table(settings, "forecasts")) == 2
    finally:
        _engine.cache_clear()
    with sqlite3.connect(path) as connection:
        columns = [r[1] for r in connection.execute("pragma table_info(forecasts)")]
    assert columns[-len(RECORD_KEYS) :] == list(RECORD_KEYS)


def test_an_old_forecasts_csv_is_read_and_upserted(settings) -> None:
    from ml.forecasts.export import (
        FORECAST_COLUMNS,
        REQUIRED_COLUMNS,
        forecasts_path,
        read_forecasts,
        upsert_forecasts,
    )

    history = bars(30)
    path = forecasts_path(settings)
    path.parent.mkdir(parents=True)
    old = {**forecast("AAA", history, 20), "logical_date": "2024-01-29"}
    pd.DataFrame([old], columns=REQUIRED_COLUMNS).to_csv(path, index=False)
    table = read_forecasts(settings)
    assert list(table.columns) == FORECAST_COLUMNS
    assert table[list(RECORD_KEYS)].isna().all().all()
    new = {**with_quantiles(history, 21), "logical_date": "2024-01-30"}
    upsert_forecasts(settings, [new])
    header = path.read_text().splitlines()[0].split(",")
    assert header == FORECAST_COLUMNS
    table = read_forecasts(settings)
    assert table[list(RECORD_KEYS)].iloc[0].isna().all()
    assert table["pred_close_q95"].iloc[1] == pytest.approx(new["pred_close_q95"], abs=1e-6)
    # A word where a quantile should be is a damaged export, not an empty quantile.
    path.write_text(path.read_text().replace(f"{new['pred_low_q05']:.6f}", "oops"))
    from ml.forecasts.export import CorruptForecastsFile

    with pytest.raises(CorruptForecastsFile, match="pred_low_q05 is not a number"):
        read_forecasts(settings)


def test_outcome_row_scores_the_quantiles_by_hand() -> None:
    f = {"ticker": "X", "last_bar_date": "2024-01-01", "model_version": "3", "last_close": 100.0}
    f.update(pred_high=102.0, pred_low=98.0, pred_close=101.0)
    f.update(pred_close_q05=97.0, pred_close_q10=98.0, pred_close_q50=100.0)
    f.update(pred_close_q90=102.0, pred_close_q95=103.0, pred_high_q90=102.0, pred_low_q10=98.0)
    f.update(pred_high_q95=103.0, pred_low_q05=97.0)
    bar = {"Date": "2024-01-02", "High": 101.5, "Low": 97.5, "Close": 103.5}
    row = outcome_row(f, bar, hs_close_90=(96.0, 104.0))
    assert row["covered_close_80"] is False and row["covered_close_90"] is False
    assert row["covered_high_q90"] is True  # 101.5 <= 102
    assert row["covered_low_q10"] is False  # 97.5 < 98
    # Width 6 plus 2 / 0.1 times the miss above the upper end (0.5).
    assert row["interval_score_close_90"] == pytest.approx(6 + 20 * 0.5)
    assert row["hs_interval_score_close_90"] == pytest.approx(8.0)  # inside: its width
    inside = outcome_row(f, {**bar, "Close": 99.0, "Low": 98.0, "High": 102.0})
    assert inside["covered_close_80"] is True and inside["covered_close_90"] is True
    assert inside["covered_high_q90"] is True and inside["covered_low_q10"] is True
    assert inside["interval_score_close_90"] == pytest.approx(6.0)
    assert inside["hs_interval_score_close_90"] is None
    below = outcome_row(f, {**bar, "Close": 96.0})
    assert below["interval_score_close_90"] == pytest.approx(6 + 20 * 1.0)
    plain = {k: v for k, v in f.items() if not k.startswith("pred_") or k.count("_") == 1}
    assert all(v is None for k, v in outcome_row(plain, bar).items() if "covered_" in k)
    assert outcome_row(plain, bar)["interval_score_close_90"] is None


def test_historical_simulation_is_point_in_time_and_in_the_forecasts_units(settings) -> None:
    history = bars(320, seed=3)
    j = 300
    record_forecasts(settings, [with_quantiles(history, j)])
    as_of = history["Date"].iloc[j + 1].date()
    score_outcomes(settings, {"AAA": history.iloc[: j + 2]}, as_of)
    close = history["Close"].to_numpy()
    returns = np.log(close[j - 249 : j + 1] / close[j - 250 : j])  # the 250 bars up to bar j
    lo, hi = close[j] * np.exp(np.quantile(returns, [0.05, 0.95]))
    actual = close[j + 1]
    expected = (hi - lo) + 20 * max(lo - actual, 0) + 20 * max(actual - hi, 0)
    outcome = read_table(settings, "outcomes").iloc[0]
    assert outcome["hs_interval_score_close_90"] == pytest.approx(expected, rel=1e-9)
    # Later bars do not change it; a 2:1 split re-adjusting the history does not either.
    later = history.copy()
    later.loc[j + 2 :, ["High", "Low", "Close"]] *= 1.5
    prices = ["Open", "High", "Low", "Close", "Adj Close"]
    later[prices] = later[prices] / 2
    score_outcomes(settings, {"AAA": later}, history["Date"].iloc[-1].date())
    again = read_table(settings, "outcomes").iloc[0]
    for key in ("hs_interval_score_close_90", "interval_score_close_90", "covered_close_90"):
        assert again[key] == pytest.approx(outcome[key], rel=1e-9)


def run_monitor(settings, width: float, seed: int) -> dict:
    """60 forecasts of a random walk with daily volatility 1 %, each with Close intervals
    `width` times the calibrated ones, scored by the monitor."""
    history = bars(400, vol=0.01, seed=seed)
    record_forecasts(settings, [with_quantiles(history, i, 0.01, width) for i in range(339, 399)])
    as_of = history["Date"].iloc[-1].date()
    champion = ("1", history["Date"].iloc[338].date())
    return monitor(settings, {"AAA": history}, {"AAA": champion}, as_of)["AAA"]


def test_the_retrain_reason_fires_on_a_miscalibrated_interval(settings) -> None:
    watched = run_monitor(settings, width=0.5, seed=5)
    stats = watched.live["60"]
    assert stats["n_intervals"] == 60 and stats["coverage_close_90"] < 0.8
    assert watched.drift["drifted"] is False
    # The band of 60 bars that each fall inside with probability 0.9: 47 to 59 of them.
    assert binomial_band(60) == (47 / 60, 59 / 60)
    assert watched.retrain_reason == (
        f"Close 90 % coverage {stats['coverage_close_90']:.2f} over 60 bars outside its 99 % "
        "band 0.78-0.98"
    )


def test_a_calibrated_interval_is_no_reason(settings) -> None:
    watched = run_monitor(settings, width=1.0, seed=5)
    stats = watched.live["60"]
    assert stats["n_intervals"] == 60 and 47 / 60 <= stats["coverage_close_90"] <= 59 / 60
    assert 0.65 <= stats["coverage_close_80"] <= 0.95
    assert stats["interval_score_close_90"] > 0
    assert 0.5 < stats["interval_score_close_90_vs_hs"] < 2
    assert watched.live["20"]["n_intervals"] == 20
    assert watched.retrain_reason is None


def test_live_interval_figures_by_hand() -> None:
    n = 60
    TARGETS = ("high", "low", "close")
    outcomes = pd.DataFrame(
        {
            "target_date": [f"2024-{1 + i // 28:02d}-{1 + i % 28:02d}" for i in range(n)],
            **{f"err_{t}": np.full(n, 0.5) for t in TARGETS},
            **{f"persistence_err_{t}": np.ones(n) for t in TARGETS},
            "inside_range": [True] * n,
            "direction_hit": [None] * n,
            "covered_close_80": [None] * 10 + [True] * 30 + [False] * 20,
            "covered_close_90": [None] * 10 + [True] * 40 + [False] * 10,
            "covered_high_q90": [None] * 10 + [True] * 50,
            "covered_low_q10": [None] * 10 + [False] * 50,
            "interval_score_close_90": np.r_[np.full(10, np.nan), np.full(50, 3.0)],
            "hs_interval_score_close_90": np.r_[np.full(10, 5.0), np.full(50, 4.0)],
        }
    )
    live = live_metrics(outcomes)
    assert live["60"]["n_intervals"] == 50 and live["20"]["n_intervals"] == 20
    assert live["60"]["coverage_close_90"] == pytest.approx(40 / 50)
    assert live["20"]["coverage_close_90"] == pytest.approx(10 / 20)
    assert live["60"]["coverage_close_80"] == pytest.approx(30 / 50)
    assert live["60"]["coverage_high_q90"] == 1.0 and live["60"]["coverage_low_q10"] == 0.0
    assert live["60"]["interval_score_close_90"] == pytest.approx(3.0)
    assert live["60"]["interval_score_close_90_vs_hs"] == pytest.approx(0.75)  # the same bars
    # 50 of the last 60 bars had quantiles: too few to tell a miscalibration from chance.
    assert coverage_reason(live) is None
    assert retrain_reason(live, {"drifted": False}) is None


def test_an_old_champion_without_quantiles_forecasts_and_scores_nulls(settings) -> None:
    from ml.config import ModelConfig
    from ml.forecasts.export import forecast_row, read_forecasts, upsert_forecasts
    from ml.model.training import naive_result
    from ml.universe import Instrument

    history = bars(700, seed=7)
    as_of = history["Date"].iloc[-2].date()
    seen = history.iloc[:-1]
    forecaster = naive_result("AAA", as_of, seen, ModelConfig()).forecaster
    instrument = Instrument("AAA", "equity", "a test")
    fresh = forecast_row(instrument, as_of, seen, forecaster, "2", settings)
    assert all(np.isfinite(fresh[k]) for k in RECORD_KEYS)
    assert fresh["pred_close_q05"] < fresh["pred_close_q50"] < fresh["pred_close_q95"]
    forecaster.intervals = None  # as loaded from a model saved before the quantiles
    old = forecast_row(instrument, as_of, seen, forecaster, "1", settings)
    assert all(old[k] is None for k in RECORD_KEYS)
    assert old["pred_close"] == pytest.approx(fresh["pred_close"])
    record_forecasts(settings, [old, fresh])
    upsert_forecasts(settings, [old])
    assert read_forecasts(settings)[list(RECORD_KEYS)].isna().all().all()
    score_outcomes(settings, {"AAA": history}, history["Date"].iloc[-1].date())
    outcomes = read_table(settings, "outcomes").set_index("model_version")
    assert outcomes.loc["1", "covered_close_90"] is None
    assert outcomes.loc["1", ["interval_score_close_90", "hs_interval_score_close_90"]].isna().all()
    assert isinstance(outcomes.loc["2", "covered_close_90"], bool)
    assert np.isfinite(outcomes.loc["2", "hs_interval_score_close_90"])
    assert date.fromisoformat(outcomes.loc["1", "target_date"]) == history["Date"].iloc[-1].date()
