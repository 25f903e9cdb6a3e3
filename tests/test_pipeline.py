"""ml.pipeline: the "up to date" check that lets a no-new-data day skip train, promote, forecast.

Real MLflow server, real store, real (tiny) training. The check must say "up to date" only when
the version for exactly these bars exists, has been through the gate, and the champion's forecast
of the next bar is in the forecasts table; anything missing means the steps run again.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace
from datetime import date

import pytest

from ml.config import GateConfig, Settings
from tests.conftest import isolated_settings

pytestmark = pytest.mark.slow

FRIDAY = date(2023, 12, 29)
SATURDAY = date(2023, 12, 30)  # no bar for a stock: the trailing window is fetched again
TUESDAY = date(2024, 1, 2)  # new bars
TICKER = "TUPTD"
REJECTED = "TREJD"


@pytest.fixture(scope="module")
def pl_settings(tmp_path_factory: pytest.TempPathFactory, mlflow_server) -> Settings:
    return isolated_settings(
        tmp_path_factory.mktemp("pipeline"),
        mlflow_server.uri,
        f"test-pipeline-{uuid.uuid4().hex[:8]}",
        {TICKER: "Up to date", REJECTED: "Always rejected"},
    )


def _stage(ticker: str, as_of: date, settings: Settings) -> None:
    from ml.pipeline import ingest_step

    ingest_step(ticker, as_of, settings)


@pytest.fixture(scope="module")
def friday_done(pl_settings: Settings) -> dict:
    """TICKER through every step for FRIDAY, checking `up_to_date` after each one."""
    from ml.pipeline import (
        forecast_step,
        promote_step,
        publish_and_check,
        train_step,
        up_to_date,
    )

    _stage(TICKER, FRIDAY, pl_settings)
    published = publish_and_check(TICKER, FRIDAY, pl_settings)
    assert published["rows_added"] > 0 and "up_to_date" not in published, published
    assert up_to_date(TICKER, FRIDAY, pl_settings) is None  # nothing trained yet
    trained = train_step(TICKER, FRIDAY, pl_settings)
    gaps = {"after train (no gate decision)": up_to_date(TICKER, FRIDAY, pl_settings)}
    decision = promote_step(TICKER, FRIDAY, trained, pl_settings)
    assert decision["promoted"] is True, decision
    gaps["after promote (no forecast)"] = up_to_date(TICKER, FRIDAY, pl_settings)
    forecast = forecast_step(TICKER, FRIDAY, pl_settings)
    return {"trained": trained, "forecast": forecast, "gaps": gaps}


def test_not_up_to_date_until_gate_and_forecast_are_done(friday_done: dict) -> None:
    """A run that died after registering, or after promoting, is finished by the next run."""
    assert friday_done["gaps"] == {
        "after train (no gate decision)": None,
        "after promote (no forecast)": None,
    }


def test_same_day_rerun_is_up_to_date(pl_settings: Settings, friday_done: dict) -> None:
    from ml.pipeline import publish_and_check

    _stage(TICKER, FRIDAY, pl_settings)
    published = publish_and_check(TICKER, FRIDAY, pl_settings)
    assert published["rows_added"] == 0 and published["rows_updated"] == 0
    current = published["up_to_date"]
    assert current["status"] == "reused"
    assert current["version"] == friday_done["trained"]["version"]
    assert current["champion_version"] == friday_done["trained"]["version"]
    assert current["gate_status"] == "promoted"
    assert current["forecast"]["pred_close"] == pytest.approx(friday_done["forecast"]["pred_close"])
    assert set(current["metrics"]) >= {"High", "Low", "Close"}


def test_weekend_without_new_bars_is_up_to_date(pl_settings: Settings, friday_done: dict) -> None:
    from ml.pipeline import publish_and_check

    _stage(TICKER, SATURDAY, pl_settings)
    published = publish_and_check(TICKER, SATURDAY, pl_settings)
    assert published["rows_added"] == 0
    current = published["up_to_date"]
    assert current["status"] == "skipped"
    assert current["trained_for"] == FRIDAY.isoformat()
    assert "no new bars since version" in current["reason"]
    # The forecast of Friday's run still holds: same last bar, same champion.
    assert current["forecast"]["last_bar_date"] == friday_done["forecast"]["last_bar_date"]


def test_force_retrain_never_skips(pl_settings: Settings, friday_done: dict) -> None:
    from ml.pipeline import publish_and_check

    _stage(TICKER, SATURDAY, pl_settings)
    assert "up_to_date" not in publish_and_check(TICKER, SATURDAY, pl_settings, force=True)


def test_unreachable_tracking_server_means_train_runs(
    pl_settings: Settings,
    friday_done: dict,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check is an optimisation: it never fails a publish that already happened."""
    from ml.pipeline import publish_and_check

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    offline = replace(pl_settings, mlflow_tracking_uri="http://127.0.0.1:9")
    _stage(TICKER, SATURDAY, offline)
    with caplog.at_level(logging.WARNING, logger="ml.pipeline"):
        published = publish_and_check(TICKER, SATURDAY, offline)
    assert published["up_to_date"] is None
    assert published["validation"] == "passed"
    assert any(
        "could not check" in r.getMessage() and TICKER in r.getMessage() for r in caplog.records
    )


def test_new_bars_are_never_up_to_date(pl_settings: Settings, friday_done: dict) -> None:
    from ml.pipeline import publish_and_check

    _stage(TICKER, TUESDAY, pl_settings)
    published = publish_and_check(TICKER, TUESDAY, pl_settings)
    assert published["rows_added"] > 0
    assert "up_to_date" not in published


def test_rejected_ticker_without_champion_is_up_to_date_without_forecast(
    pl_settings: Settings,
) -> None:
    """No champion means no forecast is expected: the gate decision alone completes the ticker."""
    from ml.pipeline import promote_step, publish_and_check, summarize_ticker, train_step

    strict = replace(pl_settings, gate=GateConfig(u2_high_max=0.0, u2_low_max=0.0))
    _stage(REJECTED, FRIDAY, strict)
    publish_and_check(REJECTED, FRIDAY, strict)
    trained = train_step(REJECTED, FRIDAY, strict)
    assert promote_step(REJECTED, FRIDAY, trained, strict)["promoted"] is False
    _stage(REJECTED, SATURDAY, strict)
    published = publish_and_check(REJECTED, SATURDAY, strict)
    current = published["up_to_date"]
    assert current["gate_status"] == "rejected"
    assert current["champion_version"] is None and current["forecast"] is None
    row = summarize_ticker(
        REJECTED,
        {
            "steps": {
                "ingest": {"status": "ok", "result": {}},
                "publish": {"status": "ok", "result": published},
            }
        },
    )
    assert row["state"] == "success" and row["up_to_date"] is True
    assert row["training"] == f"skipped v{trained['version']}"
    assert row["promotion"] == "none"


def test_summary_of_an_up_to_date_ticker_shows_what_is_kept(
    pl_settings: Settings, friday_done: dict
) -> None:
    from ml.pipeline import publish_and_check, summarize_ticker

    _stage(TICKER, SATURDAY, pl_settings)
    published = publish_and_check(TICKER, SATURDAY, pl_settings)
    version = friday_done["trained"]["version"]
    row = summarize_ticker(
        TICKER,
        {
            "steps": {
                "ingest": {"status": "ok", "result": {}},
                "publish": {"status": "ok", "result": published},
            }
        },
    )
    assert row["state"] == "success", row
    assert row["training"] == f"skipped v{version}"
    assert row["promotion"] == f"kept v{version}"
    assert row["forecast_version"] == version
    assert row["forecast_close"] == pytest.approx(friday_done["forecast"]["pred_close"])
    assert "no new bars" in row["promotion_reason"]


def test_summary_without_up_to_date_still_reports_missing_steps_as_failed() -> None:
    from ml.pipeline import summarize_ticker

    row = summarize_ticker(
        "X",
        {
            "steps": {
                "ingest": {"status": "ok", "result": {}},
                "publish": {"status": "ok", "result": {"rows_added": 0, "up_to_date": None}},
            }
        },
    )
    assert row["state"] == "failed" and row["failed_step"] == "train"
