"""ml.steps: the batch steps of one daily run (ingest_all, validate_all, promote_all,
forecast_all) and the run summary.

Real MLflow server, real store, real (tiny) training. Validation must send to training exactly
the tickers whose bars changed or that have no version for these bars and config; a day
without new bars trains nothing, promotes nothing new and keeps the forecasts; a version whose
gate never ran (a run that died after training) is finished by the next run's promote.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import replace
from datetime import date

import pytest

from ml.config import GateConfig, Settings
from tests.conftest import isolated_settings, staged_with_a_bad_batch

pytestmark = pytest.mark.slow

FRIDAY = date(2023, 12, 29)
SATURDAY = date(2023, 12, 30)  # no bar for a stock: the trailing window is fetched again
TUESDAY = date(2024, 1, 2)  # new bars
TICKER = "TUPTD"
OTHER = "TOTHR"
REJECTED = "TREJD"


@pytest.fixture(scope="module")
def pl_settings(tmp_path_factory: pytest.TempPathFactory, mlflow_server) -> Settings:
    return isolated_settings(
        tmp_path_factory.mktemp("pipeline"),
        mlflow_server.uri,
        f"test-pipeline-{uuid.uuid4().hex[:8]}",
        {TICKER: "Up to date", OTHER: "Other", REJECTED: "Always rejected"},
    )


def _data_phase(tickers: list[str], as_of: date, settings: Settings, **kw) -> dict:
    from ml.steps.data import ingest_all, validate_all

    ingested = ingest_all(tickers, as_of, settings)
    assert ingested["failed"] == {}, ingested
    return validate_all(list(ingested["staged"]), as_of, settings, **kw)


@pytest.fixture(scope="module")
def friday_done(pl_settings: Settings) -> dict:
    """TICKER and OTHER through every step for FRIDAY, in the DAG's order."""
    from ml.steps.forecast import forecast_all
    from ml.steps.model import promote_all, train_step

    validated = _data_phase([TICKER, OTHER], FRIDAY, pl_settings)
    trained = [train_step(t, FRIDAY, pl_settings) for t in validated["train"]]
    promoted = promote_all(validated, trained, FRIDAY, pl_settings)
    forecasted = forecast_all(sorted(validated["tickers"]), FRIDAY, pl_settings)
    return {
        "validated": validated,
        "trained": {t["ticker"]: t for t in trained},
        "promoted": promoted,
        "forecasted": forecasted,
    }


def test_first_day_trains_promotes_and_forecasts_every_ticker(friday_done: dict) -> None:
    validated = friday_done["validated"]
    assert validated["train"] == [TICKER, OTHER]
    assert validated["failed"] == {}
    for ticker in (TICKER, OTHER):
        summary = validated["tickers"][ticker]
        assert summary["rows_added"] > 0 and summary["validation"] == "passed"
        assert summary["train_reason"] == "new or revised bars"
        assert len(summary["data_fingerprint"]) == 16
        assert friday_done["trained"][ticker]["status"] == "trained"
    decisions = friday_done["promoted"]["decisions"]
    assert set(decisions) == {TICKER, OTHER} and friday_done["promoted"]["failed"] == {}
    forecasted = friday_done["forecasted"]
    assert forecasted["kept"] == [] and forecasted["failed"] == {}
    # Every ticker has a champion to forecast with: its candidate, or the range-aware naive
    # registered when the candidate failed the gate and there was none.
    champions = {t for t, d in decisions.items() if d["promoted"] or d.get("fallback")}
    assert set(forecasted["forecasts"]) == champions == {TICKER, OTHER}, decisions


def test_forecasts_of_a_run_are_one_write(pl_settings: Settings, friday_done: dict) -> None:
    from ml.forecasts.export import read_forecasts

    table = read_forecasts(pl_settings)
    day = table.loc[table["logical_date"] == FRIDAY.isoformat()]
    assert sorted(day["ticker"]) == sorted(friday_done["forecasted"]["forecasts"])
    assert not table.duplicated(["ticker", "logical_date"]).any()


def test_same_day_rerun_trains_nothing_and_keeps_the_forecast(
    pl_settings: Settings, friday_done: dict
) -> None:
    from ml.steps.forecast import forecast_all
    from ml.steps.model import promote_all

    validated = _data_phase([TICKER], FRIDAY, pl_settings)
    assert validated["train"] == []
    summary = validated["tickers"][TICKER]
    assert summary["rows_added"] == 0 and summary["rows_updated"] == 0
    assert summary["version"] == friday_done["trained"][TICKER]["version"]
    assert summary["gate_status"] in ("promoted", "rejected")
    assert set(summary["metrics"]) >= {"High", "Low", "Close"}
    assert promote_all(validated, [], FRIDAY, pl_settings) == {"decisions": {}, "failed": {}}
    forecasted = forecast_all([TICKER], FRIDAY, pl_settings)
    if TICKER in friday_done["forecasted"]["forecasts"]:
        assert forecasted["kept"] == [TICKER]
        before = friday_done["forecasted"]["forecasts"][TICKER]
        assert forecasted["forecasts"][TICKER]["pred_close"] == pytest.approx(before["pred_close"])


def test_weekend_without_new_bars_trains_nothing(pl_settings: Settings, friday_done: dict) -> None:
    validated = _data_phase([TICKER, OTHER], SATURDAY, pl_settings)
    assert validated["train"] == []
    for ticker in (TICKER, OTHER):
        assert validated["tickers"][ticker]["trained_for"] == FRIDAY.isoformat()


def test_force_retrain_trains_every_ticker(pl_settings: Settings, friday_done: dict) -> None:
    validated = _data_phase([TICKER, OTHER], SATURDAY, pl_settings, force=True)
    assert validated["train"] == [TICKER, OTHER]
    assert {s["train_reason"] for s in validated["tickers"].values()} == {"force_retrain"}


def test_unreachable_tracking_server_means_train_runs(
    pl_settings: Settings,
    friday_done: dict,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The registry lookup only saves work: it never fails a publish that already happened."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    offline = replace(
        pl_settings, mlflow_tracking_uri="http://127.0.0.1:9", mlflow_unreachable_timeout=1
    )
    with caplog.at_level(logging.WARNING, logger="ml.steps.data"):
        validated = _data_phase([TICKER, OTHER], SATURDAY, offline)
    assert validated["train"] == [TICKER, OTHER]
    for ticker in (TICKER, OTHER):
        assert validated["tickers"][ticker]["validation"] == "passed"
        assert "registry lookup failed" in validated["tickers"][ticker]["train_reason"]
    assert any("registry lookup failed" in r.getMessage() for r in caplog.records)


def test_concurrently_keeps_the_order_and_each_items_error() -> None:
    """The batch steps' registry reads run a few at a time (`ml.steps.common.concurrently`):
    results come back in the items' order, an exception stays with its item."""
    import threading
    import time

    from ml.steps.common import concurrently

    seen: set[str] = set()

    def work(n: int) -> int:
        seen.add(threading.current_thread().name)
        time.sleep(0.05 * (5 - n))  # the first items finish last
        if n == 2:
            raise ValueError("two")
        return n * 10

    out = concurrently(work, range(5), workers=3)
    assert [item for item, _, _ in out] == [0, 1, 2, 3, 4]
    assert [result for _, result, _ in out] == [0, 10, None, 30, 40]
    assert [type(exc).__name__ if exc else None for _, _, exc in out] == [
        None,
        None,
        "ValueError",
        None,
        None,
    ]
    assert len(seen) > 1  # threads of a pool, not the caller's
    assert concurrently(work, [4], workers=3) == [(4, 40, None)]


def test_new_bars_are_trained(pl_settings: Settings, friday_done: dict) -> None:
    validated = _data_phase([TICKER], TUESDAY, pl_settings)
    assert validated["train"] == [TICKER]
    assert validated["tickers"][TICKER]["rows_added"] > 0


def test_version_without_gate_decision_is_promoted_by_the_next_run(
    pl_settings: Settings, friday_done: dict
) -> None:
    """A run that died between train and promote: the next run's promote finishes the job."""
    from ml.registry.client import get_client
    from ml.steps.model import promote_all, train_step

    strict = replace(pl_settings, gate=GateConfig(u2_high_max=0.0, u2_low_max=0.0))
    validated = _data_phase([REJECTED], FRIDAY, strict)
    assert validated["train"] == [REJECTED]
    trained = train_step(REJECTED, FRIDAY, strict)  # ... and the run dies here
    rerun = _data_phase([REJECTED], FRIDAY, strict)
    assert rerun["train"] == []
    assert rerun["tickers"][REJECTED]["version"] == trained["version"]
    assert rerun["tickers"][REJECTED]["gate_status"] is None
    promoted = promote_all(rerun, [], FRIDAY, strict)
    decision = promoted["decisions"][REJECTED]
    assert decision["promoted"] is False
    version = get_client(strict).get_model_version(f"price-forecast-{REJECTED}", trained["version"])
    assert version.tags["gate_status"] == "rejected"
    # It had no champion: the range-aware naive is registered as its champion.
    assert "the range-aware naive is the champion" in decision["reason"]
    naive = get_client(strict).get_model_version(
        f"price-forecast-{REJECTED}", decision["champion_version"]
    )
    assert naive.tags["model_kind"] == "naive" and naive.tags["gate_status"] == "promoted"


def test_rejected_ticker_forecasts_with_its_naive_champion(
    pl_settings: Settings, friday_done: dict
) -> None:
    """Its candidate failed the gate and it had no champion: the naive champion forecasts."""
    from ml.steps.forecast import forecast_all
    from ml.steps.report import summarize_day
    from tests.conftest import day_from_steps

    strict = replace(pl_settings, gate=GateConfig(u2_high_max=0.0, u2_low_max=0.0))
    validated = _data_phase([REJECTED], SATURDAY, strict)
    assert validated["train"] == []
    forecasted = forecast_all([REJECTED], SATURDAY, strict)
    assert forecasted["no_champion"] == [] and set(forecasted["forecasts"]) == {REJECTED}
    assert forecasted["kinds"] == {REJECTED: "naive"}
    [row] = summarize_day(
        day_from_steps(
            [REJECTED],
            ingested={"staged": {REJECTED: {}}, "failed": {}},
            validated=validated,
            promoted={"decisions": {}, "failed": {}},
            forecasted=forecasted,
        )
    )
    assert row["state"] == "skipped"
    assert row["training"].startswith("not retrained: v")
    assert row["promotion"].startswith("kept v") and row["champion_kind"] == "naive"
    assert row["forecast_close"] is not None


# --- the data phase's concurrency and isolation ---------------------------------------------------


class _CountingSource:
    """The synthetic source, slowed down, counting downloads in flight; one ticker refused."""

    name = "counting"

    def __init__(self, refused: str) -> None:
        from ml.data.sources import SyntheticSource

        self.inner = SyntheticSource()
        self.refused = refused
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0

    def fetch(self, instrument, start, end):
        from ml.data.sources import PriceSourceError

        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            time.sleep(0.2)
            if instrument.ticker == self.refused:
                raise PriceSourceError(f"{instrument.ticker}: refused by the source")
            return self.inner.fetch(instrument, start, end)
        finally:
            with self.lock:
                self.in_flight -= 1


def test_ingest_is_concurrent_bounded_and_isolates_failures(tmp_path) -> None:
    from ml.steps.common import StepFailed
    from ml.steps.data import ingest_all

    tickers = {f"TC{i}": f"Ticker {i}" for i in range(7)}
    settings = replace(
        isolated_settings(tmp_path, "http://127.0.0.1:9", "unused", tickers), fetch_concurrency=3
    )
    source = _CountingSource(refused="TC3")
    result = ingest_all(list(tickers), FRIDAY, settings, source=source)
    assert source.peak == 3
    assert list(result["staged"]) == [t for t in tickers if t != "TC3"]
    assert result["failed"] == {"TC3": "PriceSourceError: TC3: refused by the source"}
    # Every ticker failing looks like an outage: the DAG's task (strict) raises to be retried.
    with pytest.raises(StepFailed, match="all 1 ticker"):
        ingest_all(["TC3"], FRIDAY, settings, source=source, strict=True)
    assert ingest_all(["TC3"], FRIDAY, settings, source=source)["staged"] == {}


class _LocalSource:
    """The synthetic source as a local (CPU-bound) one, noting the process that fetched each
    batch; one ticker refused."""

    name = "local-probe"
    local = True

    def __init__(self, refused: str) -> None:
        from ml.data.sources import SyntheticSource

        self.inner = SyntheticSource()
        self.refused = refused

    def fetch(self, instrument, start, end):
        import os

        from ml.data.sources import PriceSourceError

        if instrument.ticker == self.refused:
            raise PriceSourceError(f"{instrument.ticker}: refused by the source")
        batch = self.inner.fetch(instrument, start, end)
        batch.attrs["notes"] = [f"pid {os.getpid()}"]
        return batch


def test_a_local_source_is_ingested_over_processes_and_isolates_failures(
    tmp_path, monkeypatch
) -> None:
    """A local source (synthetic, files: CPU-bound) is spread over processes forked from the
    step; what they stage is what a serial ingest stages, and one ticker's failure comes back
    as that ticker's error."""
    import os

    from ml.data.sources import SyntheticSource
    from ml.data.store import PriceStore
    from ml.steps import common
    from ml.steps.common import PROCESS_WORKERS, instrument_for
    from ml.steps.data import ingest_all

    # An earlier test may have started TensorFlow here (then `in_processes` stays in this
    # process on purpose); these children never touch it, so fork anyway.
    monkeypatch.setattr(common, "tensorflow_started", lambda: False)

    tickers = {f"LP{i}": f"Ticker {i}" for i in range(6)}
    settings = isolated_settings(tmp_path, "http://127.0.0.1:9", "unused", tickers)
    result = ingest_all(list(tickers), FRIDAY, settings, source=_LocalSource(refused="LP2"))
    assert list(result["staged"]) == [t for t in tickers if t != "LP2"]
    assert result["failed"] == {"LP2": "PriceSourceError: LP2: refused by the source"}
    pids = {batch["notes"][0] for batch in result["staged"].values()}
    if PROCESS_WORKERS < 2:  # one core: the work stays in this process
        assert pids == {f"pid {os.getpid()}"}
    else:
        assert f"pid {os.getpid()}" not in pids and len(pids) == PROCESS_WORKERS
    store = PriceStore(settings.data_dir)
    for ticker in result["staged"]:
        staged = store.read_staged(instrument_for(ticker, settings), FRIDAY)
        expected = SyntheticSource().fetch(
            instrument_for(ticker, settings), settings.history_start, FRIDAY
        )
        assert staged.drop(columns="Ticker").equals(
            expected.drop(columns="Ticker").reset_index(drop=True)
        )


# --- the run summary -------------------------------------------------------------------------------


def test_summary_names_the_step_each_ticker_failed_at() -> None:
    from ml.steps.report import summarize_day
    from tests.conftest import day_from_steps

    tickers = ["ING", "VAL", "TRN", "LOST", "PRO", "FOR", "OK", "SKIP"]
    rows = summarize_day(
        day_from_steps(
            tickers,
            ingested={"staged": {t: {} for t in tickers[1:]}, "failed": {"ING": "YahooError: 429"}},
            validated={
                "train": ["TRN", "LOST", "PRO", "FOR", "OK"],
                "tickers": {t: {"rows_added": 1, "validation": "passed"} for t in tickers[2:]},
                "failed": {"VAL": "PriceValidationError: VAL: high_ge_low"},
            },
            trained=[
                {"ticker": t, "status": "trained", "version": "1", "metrics": {"High": 0.7}}
                for t in ("PRO", "FOR", "OK")
            ],
            train_errors=[{"ticker": "TRN", "error": "ValueError: too few bars"}],
            promoted={
                "decisions": {
                    "FOR": {"promoted": True, "version": "1", "reason": "first champion"},
                    "OK": {"promoted": True, "version": "1", "reason": "first champion"},
                },
                "failed": {"PRO": "MlflowException: boom"},
            },
            forecasted={
                "forecasts": {"OK": {"pred_close": 1.5, "model_version": "1"}},
                "kept": [],
                "no_champion": [],
                "failed": {"FOR": "ValueError: need at least 7 bars"},
            },
        )
    )
    by = {r["ticker"]: r for r in rows}
    assert [r["ticker"] for r in rows] == tickers
    expected = {
        "ING": ("ingest", "YahooError: 429"),
        "VAL": ("validate_and_publish", "PriceValidationError: VAL: high_ge_low"),
        "TRN": ("train", "ValueError: too few bars"),
        "LOST": ("train", "the train task did not finish: see its log"),
        "PRO": ("promote", "MlflowException: boom"),
        "FOR": ("forecast", "ValueError: need at least 7 bars"),
    }
    for ticker, (step, error) in expected.items():
        assert (by[ticker]["state"], by[ticker]["failed_step"], by[ticker]["error"]) == (
            "failed",
            step,
            error,
        )
    assert by["VAL"]["validation"] == "failed"
    assert by["OK"]["state"] == "done" and by["OK"]["promotion"] == "promoted v1"
    assert by["OK"]["forecast_close"] == 1.5
    assert by["SKIP"]["state"] == "skipped"


def test_summary_when_a_whole_task_failed() -> None:
    """A batch task that failed returned nothing: its tickers are failed at that step."""
    from ml.steps.report import summarize_day
    from tests.conftest import day_from_steps

    [row] = summarize_day(day_from_steps(["A"], ingested=None, validated=None))
    assert (row["failed_step"], row["error"]) == ("ingest", "the ingest task failed: see its log")
    [row] = summarize_day(
        day_from_steps(["A"], ingested={"staged": {"A": {}}, "failed": {}}, validated=None)
    )
    assert row["failed_step"] == "validate_and_publish"
    [row] = summarize_day(
        day_from_steps(
            ["A"],
            ingested={"staged": {"A": {}}, "failed": {}},
            validated={"train": [], "tickers": {"A": {}}, "failed": {}},
            promoted={"decisions": {}, "failed": {}},
            forecasted=None,
        )
    )
    assert row["failed_step"] == "forecast"


def test_a_retried_validate_keeps_what_the_killed_try_published(tmp_path) -> None:
    """validate killed after publishing some tickers, then retried by Airflow: the staged files
    of the published ones are gone; they are reported as published (nothing changed), not lost,
    and a quarantined one still fails, naming its quarantine report."""
    from ml.data.store import PriceStore
    from ml.steps.data import validate_all

    tickers = {"TKA": "Published", "TKB": "Quarantined"}
    settings = staged_with_a_bad_batch(tmp_path, tickers, "TKB", FRIDAY)
    store = PriceStore(settings.data_dir)
    first = validate_all(list(tickers), FRIDAY, settings, check_registry=False)
    assert list(first["tickers"]) == ["TKA"] and list(first["failed"]) == ["TKB"]
    prices = store.history_path(_instrument("TKA", settings)).read_bytes()

    retry = validate_all(list(tickers), FRIDAY, settings, check_registry=False)
    assert retry["tickers"]["TKA"]["rows_added"] == 0
    assert retry["tickers"]["TKA"]["validation"] == "passed"
    assert retry["tickers"]["TKA"]["total_rows"] == first["tickers"]["TKA"]["total_rows"]
    assert (
        retry["tickers"]["TKA"]["data_fingerprint"] == first["tickers"]["TKA"]["data_fingerprint"]
    )
    assert "quarantined" in retry["failed"]["TKB"] and "validation.json" in retry["failed"]["TKB"]
    assert store.history_path(_instrument("TKA", settings)).read_bytes() == prices


def _instrument(ticker: str, settings: Settings):
    from ml.steps.common import instrument_for

    return instrument_for(ticker, settings)
