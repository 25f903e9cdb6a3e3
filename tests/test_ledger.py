"""The forecast ledger (`ml.forecasts.ledger`): scoring when the bar arrives, point in time, idempotent
upserts, live metrics, input drift and the retrain hint; on SQLite and, where it runs, on
PostgreSQL. Pure database work: no MLflow, no training."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ml.config import get_settings
from ml.forecasts.ledger import _engine, engine_for, read_table, record_forecasts, upsert
from ml.forecasts.monitor import (
    Monitor,
    input_drift,
    live_metrics,
    outcome_row,
    pending_retrains,
    retrain_reason,
    score_outcomes,
)

D0 = date(2024, 6, 3)


def bars(n: int, start: str = "2024-01-01", vol: float = 0.01, seed: int = 0) -> pd.DataFrame:
    """n weekday bars of a random walk with daily volatility `vol`."""
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range(start, periods=n)
    close = 100 * np.exp(np.cumsum(rng.normal(0, vol, n)))
    high = close * np.exp(np.abs(rng.normal(0, vol, n)))
    low = close * np.exp(-np.abs(rng.normal(0, vol, n)))
    return pd.DataFrame(
        {
            "Date": dates.astype("datetime64[ns]"),
            "Open": close,
            "High": high,
            "Low": low,
            "Close": close,
            "Adj Close": close,
            "Volume": rng.integers(1_000, 2_000, n).astype(float),
        }
    )


def forecast(ticker: str, history: pd.DataFrame, i: int, version: str = "1", **pred) -> dict:
    last = float(history["Close"].iloc[i])
    return {
        "ticker": ticker,
        "last_bar_date": history["Date"].iloc[i].date().isoformat(),
        "model_version": version,
        "logical_date": history["Date"].iloc[i].date().isoformat(),
        "model_name": f"price-forecast-{ticker}",
        "last_close": last,
        "pred_high": pred.get("high", last * 1.01),
        "pred_low": pred.get("low", last * 0.99),
        "pred_close": pred.get("close", last * 1.001),
        "pred_adj_close": last,
        "source": "synthetic",
    }


@pytest.fixture
def settings(tmp_path: Path):
    return replace(get_settings({}), data_dir=tmp_path / "data")


def test_outcome_row_errors_range_and_direction() -> None:
    f = {"ticker": "X", "last_bar_date": "2024-01-01", "model_version": "3", "last_close": 100.0}
    f.update(pred_high=102.0, pred_low=98.0, pred_close=101.0)
    bar = {"Date": "2024-01-02", "High": 101.5, "Low": 97.0, "Close": 99.0}
    row = outcome_row(f, bar)
    assert row["target_date"] == "2024-01-02"
    assert (row["err_high"], row["err_low"], row["err_close"]) == (0.5, 1.0, 2.0)
    assert (row["persistence_err_high"], row["persistence_err_close"]) == (-1.5, 1.0)
    assert row["inside_range"] is False  # the Low went below the predicted Low
    assert row["direction_hit"] is False  # up called, down happened
    flat = outcome_row({**f, "pred_close": 100.0}, bar)
    assert flat["direction_hit"] is None  # no call


def test_scoring_is_point_in_time_and_idempotent(settings) -> None:
    history = bars(30)
    rows = [forecast("AAA", history, i) for i in range(20, 29)]
    record_forecasts(settings, rows)
    as_of = history["Date"].iloc[24].date()
    counts = score_outcomes(
        settings, {"AAA": history.loc[history["Date"] <= pd.Timestamp(as_of)]}, as_of
    )
    # Forecasts made on bars 20..23 have their next bar (21..24) by as_of; 24..28 do not.
    assert counts == {"AAA": 4}
    outcomes = read_table(settings, "outcomes")
    assert list(outcomes["target_date"]) == [
        history["Date"].iloc[i].date().isoformat() for i in range(21, 25)
    ]
    again = score_outcomes(
        settings, {"AAA": history.loc[history["Date"] <= pd.Timestamp(as_of)]}, as_of
    )
    assert again == counts
    pd.testing.assert_frame_equal(read_table(settings, "outcomes"), outcomes)
    record_forecasts(settings, rows)  # the same forecasts again: still one row each
    assert len(read_table(settings, "forecasts")) == len(rows)


def test_a_split_after_the_forecast_is_scored_in_the_forecasts_units(settings) -> None:
    """Forecasts made before a 2:1 split, scored after the history was re-adjusted (every
    earlier bar halved): the same errors as before the split, no fake miss."""
    history = bars(30)
    rows = [forecast("AAA", history, i) for i in range(20, 29)]
    record_forecasts(settings, rows)
    as_of = history["Date"].iloc[29].date()
    score_outcomes(settings, {"AAA": history}, as_of)
    before = read_table(settings, "outcomes")

    adjusted = history.copy()
    prices = ["Open", "High", "Low", "Close", "Adj Close"]
    adjusted[prices] = adjusted[prices] / 2
    adjusted["Volume"] = adjusted["Volume"] * 2
    assert score_outcomes(settings, {"AAA": adjusted}, as_of) == {"AAA": 9}
    after = read_table(settings, "outcomes")
    errors = [c for c in after.columns if c.startswith(("err_", "persistence_err_", "actual_"))]
    np.testing.assert_allclose(after[errors].to_numpy(), before[errors].to_numpy(), rtol=1e-12)
    assert after["inside_range"].tolist() == before["inside_range"].tolist()
    assert after["direction_hit"].tolist() == before["direction_hit"].tolist()


@pytest.mark.parametrize("ticker", ["NA", "NULL", "0700.HK", "EURUSD=X"])
def test_tickers_round_trip_unchanged(settings, ticker: str) -> None:
    history = bars(5)
    record_forecasts(settings, [forecast(ticker, history, 2)])
    score_outcomes(settings, {ticker: history}, history["Date"].iloc[-1].date())
    assert list(read_table(settings, "forecasts")["ticker"]) == [ticker]
    assert list(read_table(settings, "outcomes")["ticker"]) == [ticker]


def test_live_metrics_over_the_last_scored_bars() -> None:
    n = 60
    outcomes = pd.DataFrame(
        {
            "target_date": [f"2024-{1 + i // 28:02d}-{1 + i % 28:02d}" for i in range(n)],
            "err_high": np.r_[np.full(40, 2.0), np.full(20, 1.0)],
            "persistence_err_high": np.full(n, 2.0),
            "err_low": np.full(n, -1.0),
            "persistence_err_low": np.full(n, 2.0),
            "err_close": np.full(n, 1.0),
            "persistence_err_close": np.full(n, 1.0),
            "inside_range": [True] * 45 + [False] * 15,
            "direction_hit": [True, False, None] * 20,
        }
    )
    live = live_metrics(outcomes)
    assert live["20"]["n"] == 20 and live["60"]["n"] == 60
    assert live["20"]["u2_high"] == pytest.approx(0.5)
    assert live["60"]["u2_high"] == pytest.approx(np.sqrt((40 * 4 + 20) / 60) / 2)
    assert live["60"]["mae_low"] == pytest.approx(1.0) and live["60"]["u2_close"] == 1.0
    assert live["20"]["coverage"] == pytest.approx(5 / 20)
    assert live["60"]["directional_accuracy"] == pytest.approx(0.5)


def test_input_drift_flags_a_regime_change_and_not_the_same_regime() -> None:
    calm = bars(400, vol=0.01, seed=1)
    train_end = calm["Date"].iloc[299].date()
    assert input_drift(calm, train_end)["drifted"] is False
    wild = calm.copy()
    wild = pd.concat([calm.iloc[:340], bars(60, start="2025-07-28", vol=0.04, seed=2)])
    wild = wild.reset_index(drop=True)
    drift = input_drift(wild, train_end)
    assert drift["drifted"] is True
    assert drift["tests"]["log_range"]["p"] < 1e-6
    assert "input drift: " in retrain_reason({}, drift)


def test_retrain_reason_needs_a_full_window_of_live_u2() -> None:
    bad = {"20": {"n": 20, "u2_high": 1.05, "u2_low": 0.9}}
    assert retrain_reason(bad, {"drifted": False}) == ("live U2 High 1.050 >= 1.0 over 20 bars")
    short = {"20": {"n": 12, "u2_high": 1.5, "u2_low": 1.5}}
    assert retrain_reason(short, {"drifted": False}) is None


def test_pending_retrains_read_the_latest_earlier_monitor_row(settings) -> None:
    rows = [
        Monitor("AAA", "2024-06-03", "1", {}, {}, "input drift: ..."),
        Monitor("AAA", "2024-06-04", "1", {}, {}, None),
        Monitor("BBB", "2024-06-03", "2", {}, {}, "live U2 High 1.1 >= 1.0 over 20 bars"),
    ]
    with engine_for(settings).begin() as connection:
        upsert(connection, "monitor", [m.row() for m in rows])
    assert pending_retrains(settings, ["AAA", "BBB"], date(2024, 6, 5)) == {
        "BBB": ("live U2 High 1.1 >= 1.0 over 20 bars", "2024-06-03")
    }
    # Point in time: a run for the 4th sees only the 3rd.
    assert set(pending_retrains(settings, ["AAA", "BBB"], date(2024, 6, 4))) == {
        "AAA",
        "BBB",
    }


def _postgres_url() -> str | None:
    try:
        import psycopg2  # noqa: F401
        from sqlalchemy import create_engine, text
    except ImportError:
        return None
    try:
        engine = create_engine("postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
        with engine.connect() as connection:
            connection.execute(text("select 1"))
    except Exception:
        return None
    return "postgresql+psycopg2://postgres@127.0.0.1:5432/"


def test_the_ledger_on_postgresql(tmp_path: Path) -> None:
    base = _postgres_url()
    if base is None:
        pytest.skip("no PostgreSQL at 127.0.0.1:5432 (trust auth) with psycopg2: skipped")
    from sqlalchemy import create_engine, text

    name = f"ledger_test_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base + "postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"create database {name}"))
    try:
        settings = replace(get_settings({}), data_dir=tmp_path / "data", ledger_url=base + name)
        history = bars(30)
        rows = [forecast("NA", history, i) for i in range(20, 29)]
        record_forecasts(settings, rows)
        record_forecasts(settings, rows)
        as_of = history["Date"].iloc[24].date()
        visible = {"NA": history.loc[history["Date"] <= pd.Timestamp(as_of)]}
        assert score_outcomes(settings, visible, as_of) == {"NA": 4}
        assert score_outcomes(settings, visible, as_of) == {"NA": 4}
        assert len(read_table(settings, "outcomes")) == 4
        assert not (tmp_path / "data" / "ledger.db").exists()
    finally:
        _engine.cache_clear()
        with admin.connect() as connection:
            connection.execute(text(f"drop database if exists {name} with (force)"))
