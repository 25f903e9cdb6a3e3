"""Tests of the GX price suites: real Great Expectations on synthetic bars, no mocks."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import pandas as pd
import pytest

from ml.data.schema import OUTPUT_COLUMNS
from ml.data.sources import SyntheticSource
from ml.quality.derived import prepare_frame
from ml.quality.suite import (
    CLASS_RULES,
    DEFAULT_OHLC_TOLERANCE,
    HELPER_COLUMNS,
    build_schema_suite,
    build_suite,
)
from ml.quality.validation import PriceValidationError, ValidationReport, validate_prices
from ml.universe import Instrument

INSTRUMENTS = {
    "stock": Instrument("AMD", "stock"),
    "etf": Instrument("SPY", "etf"),
    "forex": Instrument("EURUSD=X", "forex"),
    "crypto": Instrument("SOL-USD", "crypto"),
    "future": Instrument("ZB=F", "future"),
}
STOCK = INSTRUMENTS["stock"]
END = date(2024, 6, 28)  # a Friday


def bars(instrument: Instrument, rows: int = 300, end: date = END) -> pd.DataFrame:
    """The last `rows` synthetic bars of `instrument` up to `end`."""
    frame = SyntheticSource().fetch(instrument, end - timedelta(days=2 * rows), end)
    return frame.tail(rows).reset_index(drop=True)


def day(frame: pd.DataFrame, i: int) -> str:
    return frame["Date"].iloc[i].date().isoformat()


def rejected(batch: pd.DataFrame, instrument: Instrument = STOCK, as_of: date = END, **kwargs):
    with pytest.raises(PriceValidationError) as excinfo:
        validate_prices(batch, instrument, as_of, **kwargs)
    return excinfo.value


def assert_names(err: PriceValidationError, check: str, expectation: str, when: str | None):
    """The error names the ticker, the failed check (id and GX type) and an example row's date."""
    message = str(err)
    assert err.ticker in message.splitlines()[0]
    assert check in {f["check"] for f in err.failures}, message
    assert f"[{check}] {expectation}(" in message
    if when is not None:
        failure = next(f for f in err.failures if f["check"] == check)
        assert when in [row["Date"] for row in failure["examples"]], message
        assert when in message
    assert err.report["success"] is False
    json.dumps(err.report, allow_nan=False)


def failed_checks(err: PriceValidationError) -> set[str]:
    return {f["check"] for f in err.failures}


# --- good data -----------------------------------------------------------------------------------


@pytest.mark.parametrize("asset_class", sorted(INSTRUMENTS))
def test_good_synthetic_data_passes_for_each_asset_class(asset_class):
    instrument = INSTRUMENTS[asset_class]
    batch = bars(instrument)
    report = validate_prices(batch, instrument, END)
    assert isinstance(report, ValidationReport)
    assert report.success and report.ticker == instrument.ticker
    assert report.statistics["unsuccessful_expectations"] == 0
    assert report.statistics["evaluated_expectations"] == len(build_suite(instrument).expectations)
    assert report.meta["asset_class"] == asset_class and report.meta["rows"] == 300


def test_long_history_and_a_short_overlapping_batch_pass():
    history = bars(STOCK, rows=2500, end=date(2024, 6, 14))
    assert validate_prices(history, STOCK, date(2024, 6, 14)).success
    # The daily batch re-fetches a trailing window that overlaps the published history.
    batch = bars(STOCK, rows=15)
    assert batch["Date"].min() < history["Date"].max()
    assert validate_prices(batch, STOCK, END, previous=history).success


def test_as_of_may_be_a_few_days_after_the_last_bar():
    # A Monday run after a Friday holiday: the newest bar is Thursday's, 4 days old.
    batch = bars(STOCK, end=date(2024, 6, 27))
    assert validate_prices(batch, STOCK, date(2024, 7, 1)).success


def test_forex_with_zero_volume_passes():
    batch = bars(INSTRUMENTS["forex"])
    assert (batch["Volume"] == 0).all()
    assert validate_prices(batch, INSTRUMENTS["forex"], END).success


def test_stock_with_zero_volume_on_one_day_passes():
    batch = bars(STOCK)
    batch.loc[100, "Volume"] = 0.0
    assert validate_prices(batch, STOCK, END).success


def test_close_a_hair_above_high_passes_within_the_tolerance():
    batch = bars(STOCK)
    batch.loc[50, "Close"] = batch.loc[50, "High"] * 1.001
    batch.loc[60, "Open"] = batch.loc[60, "Low"] * 0.999
    assert validate_prices(batch, STOCK, END).success


# --- bad data ------------------------------------------------------------------------------------


def test_nan_close_is_rejected():
    batch = bars(STOCK)
    batch.loc[40, "Close"] = float("nan")
    err = rejected(batch)
    assert_names(err, "Close_not_null", "expect_column_values_to_not_be_null", day(batch, 40))
    # Missing values are reported once, not again by the OHLC and jump checks.
    assert failed_checks(err) == {"Close_not_null"}


def test_high_below_low_is_rejected():
    batch = bars(STOCK)
    high, low = float(batch.loc[70, "High"]), float(batch.loc[70, "Low"])
    batch.loc[70, "High"], batch.loc[70, "Low"] = low, high
    err = rejected(batch)
    assert_names(
        err, "high_ge_low", "expect_column_pair_values_a_to_be_greater_than_b", day(batch, 70)
    )


def test_high_below_low_gets_no_tolerance():
    batch = bars(STOCK)
    low = batch.loc[70, "Low"]
    batch.loc[70, ["Open", "High", "Close"]] = low * (1 - DEFAULT_OHLC_TOLERANCE / 5)
    err = rejected(batch)
    assert failed_checks(err) == {"high_ge_low"}
    assert_names(
        err, "high_ge_low", "expect_column_pair_values_a_to_be_greater_than_b", day(batch, 70)
    )


def test_close_well_above_high_is_rejected():
    batch = bars(STOCK)
    batch.loc[50, "Close"] = batch.loc[50, "High"] * 1.05
    err = rejected(batch)
    assert failed_checks(err) == {"high_ge_close"}
    assert_names(
        err, "high_ge_close", "expect_column_pair_values_a_to_be_greater_than_b", day(batch, 50)
    )
    assert "High must be >= Close (within 0.50% tolerance)" in str(err)


@pytest.mark.parametrize("value", [0.0, -3.0])
def test_non_positive_price_is_rejected(value):
    batch = bars(STOCK)
    batch.loc[80, "Adj Close"] = value
    err = rejected(batch)
    assert failed_checks(err) == {"Adj Close_positive"}
    assert_names(err, "Adj Close_positive", "expect_column_values_to_be_between", day(batch, 80))


def test_duplicate_date_is_rejected():
    batch = bars(STOCK)
    batch = pd.concat([batch.iloc[:91], batch.iloc[90:]], ignore_index=True)
    err = rejected(batch)
    assert_names(err, "dates_unique", "expect_column_values_to_be_unique", day(batch, 90))
    assert "dates_increasing" in failed_checks(err)


def test_unordered_dates_are_rejected():
    batch = bars(STOCK)
    order = list(range(len(batch)))
    order[120], order[121] = order[121], order[120]
    batch = batch.iloc[order].reset_index(drop=True)
    err = rejected(batch)
    assert_names(err, "dates_increasing", "expect_column_values_to_be_increasing", day(batch, 121))


def test_a_100x_bar_is_rejected_by_the_jump_check():
    batch = bars(STOCK)
    prices = ["Open", "High", "Low", "Close", "Adj Close"]
    batch.loc[150, prices] = batch.loc[150, prices] * 100
    err = rejected(batch)
    # Every price column jumps, Close and the others alike.
    assert failed_checks(err) == {"close_jump", "price_jump"}
    assert_names(err, "close_jump", "expect_column_values_to_be_between", day(batch, 150))
    assert day(batch, 151) in str(err)  # and the way back down


def test_a_100x_close_alone_is_rejected():
    batch = bars(STOCK)
    batch.loc[150, "Close"] *= 100
    err = rejected(batch)
    assert {"close_jump", "high_ge_close"} <= failed_checks(err)
    assert_names(err, "close_jump", "expect_column_values_to_be_between", day(batch, 150))


def test_a_100x_jump_across_the_boundary_with_the_history_is_rejected():
    history = bars(STOCK, rows=300, end=date(2024, 5, 31))
    batch = bars(STOCK, rows=20)
    batch = batch[batch["Date"] > history["Date"].max()].reset_index(drop=True)
    prices = ["Open", "High", "Low", "Close", "Adj Close"]
    batch[prices] = batch[prices] * 100  # a consistent batch, in cents instead of dollars
    assert validate_prices(batch, STOCK, END).success  # alone it looks fine
    err = rejected(batch, previous=history)
    assert failed_checks(err) == {"close_jump", "price_jump"}
    assert_names(err, "close_jump", "expect_column_values_to_be_between", day(batch, 0))


def test_empty_frame_is_rejected():
    batch = bars(STOCK).iloc[:0]
    err = rejected(batch)
    assert "no rows" in str(err) and "AMD" in str(err)
    assert_names(err, "rows", "expect_table_row_count_to_be_between", None)
    assert rejected(pd.DataFrame()).ticker == "AMD"


def test_missing_column_is_rejected_naming_the_column():
    batch = bars(STOCK).drop(columns=["Volume"])
    err = rejected(batch)
    assert_names(err, "columns", "expect_table_columns_to_match_set", None)
    failure = next(f for f in err.failures if f["check"] == "columns")
    assert failure["details"]["mismatched"]["missing"] == ["Volume"]
    assert "missing Volume" in str(err)


def test_unexpected_column_and_wrong_dtype_are_rejected():
    batch = bars(STOCK)
    batch["Extra"] = 1
    batch["Close"] = batch["Close"].astype(str)
    err = rejected(batch)
    assert {"columns", "Close_dtype"} <= failed_checks(err)
    assert "unexpected Extra" in str(err)
    assert_names(err, "Close_dtype", "expect_column_values_to_be_in_type_list", None)
    assert "Close must be numeric; observed str" in str(err)


def test_weekend_date_for_a_stock_is_rejected():
    batch = bars(STOCK)
    friday = batch.index[batch["Date"].dt.dayofweek == 4][10]
    batch.loc[friday, "Date"] += pd.Timedelta(days=1)
    err = rejected(batch)
    assert failed_checks(err) == {"no_weekend"}
    assert_names(err, "no_weekend", "expect_column_values_to_be_in_set", day(batch, friday))


def test_weekends_are_fine_for_crypto():
    crypto = INSTRUMENTS["crypto"]
    batch = bars(crypto)
    assert (batch["Date"].dt.dayofweek >= 5).any()
    assert validate_prices(batch, crypto, END).success
    checks = {e.meta["check"] for e in build_suite(crypto).expectations}
    assert "no_weekend" not in checks


def test_too_large_gap_is_rejected():
    batch = bars(STOCK)
    batch = batch.drop(index=range(200, 210)).reset_index(drop=True)  # two weeks missing
    err = rejected(batch)
    assert failed_checks(err) == {"max_gap"}
    assert_names(err, "max_gap", "expect_column_values_to_be_between", day(batch, 200))


def test_crypto_gap_limit_is_tighter():
    crypto = INSTRUMENTS["crypto"]
    batch = bars(crypto).drop(index=[200, 201, 202]).reset_index(drop=True)  # a 4-day gap
    err = rejected(batch, instrument=crypto)
    assert_names(err, "max_gap", "expect_column_values_to_be_between", day(batch, 200))


def test_gap_to_the_published_history_is_rejected():
    history = bars(STOCK, rows=300, end=date(2024, 6, 7))
    batch = bars(STOCK, rows=5)  # starts 2024-06-24: two weeks after the history ends
    err = rejected(batch, previous=history)
    assert failed_checks(err) == {"max_gap"}
    assert_names(err, "max_gap", "expect_column_values_to_be_between", day(batch, 0))


def test_stale_data_is_rejected():
    batch = bars(STOCK)
    err = rejected(batch, as_of=END + timedelta(days=30))
    assert failed_checks(err) == {"fresh"}
    assert_names(err, "fresh", "expect_column_min_to_be_between", day(batch, -1))
    assert "stale" in str(err)


def test_bar_dated_after_as_of_is_rejected():
    batch = bars(STOCK)
    err = rejected(batch, as_of=END - timedelta(days=1))
    assert failed_checks(err) == {"not_after_as_of"}
    assert_names(err, "not_after_as_of", "expect_column_values_to_be_between", day(batch, -1))


def test_wrong_ticker_is_rejected():
    batch = bars(STOCK)
    batch.loc[5, "Ticker"] = "NVDA"
    err = rejected(batch)
    assert_names(err, "ticker", "expect_column_values_to_be_in_set", day(batch, 5))


def test_message_shows_at_most_five_example_rows_per_check():
    batch = bars(STOCK)
    batch.loc[10:30, "Volume"] = -1.0
    err = rejected(batch)
    failure = next(f for f in err.failures if f["check"] == "volume_non_negative")
    assert failure["unexpected_count"] == 21 and len(failure["examples"]) == 5
    assert day(batch, 14) in str(err) and day(batch, 15) not in str(err)
    # The report keeps every offending date.
    result = next(
        r
        for r in err.report["results"]
        if r["expectation_config"]["meta"]["check"] == "volume_non_negative"
    )
    assert len(result["result"]["unexpected_index_list"]) == 21


# --- reports and API -----------------------------------------------------------------------------


def test_report_json_is_valid_and_deterministic():
    batch = bars(STOCK)
    first = validate_prices(batch, STOCK, END).to_json()
    second = validate_prices(batch.copy(), STOCK, END).to_json()
    assert first == second
    data = json.loads(first)
    assert data["ticker"] == "AMD" and data["success"] is True
    assert len(data["results"]) == data["statistics"]["evaluated_expectations"]

    bad = batch.copy()
    bad.loc[40, "Close"] = float("nan")
    reports = [rejected(bad.copy()).report for _ in range(2)]
    assert json.dumps(reports[0], sort_keys=True) == json.dumps(reports[1], sort_keys=True)
    failed = [r for r in reports[0]["results"] if not r["success"]]
    assert failed[0]["result"]["unexpected_rows"][0]["Date"].startswith(day(bad, 40))


def test_error_survives_pickling():
    bad = bars(STOCK)
    bad.loc[40, "Close"] = float("nan")
    err = rejected(bad)
    clone = pickle.loads(pickle.dumps(err))
    assert isinstance(clone, PriceValidationError)
    assert str(clone) == str(err) and clone.ticker == err.ticker and clone.failures == err.failures


def test_suites_follow_the_asset_class():
    for asset_class, instrument in INSTRUMENTS.items():
        suite = build_suite(instrument)
        rules = CLASS_RULES[asset_class]
        by_check = {e.meta["check"]: e for e in suite.expectations}
        assert by_check["close_jump"].max_value == pytest.approx(rules.max_abs_log_return)
        assert by_check["max_gap"].max_value == rules.max_gap_days
        assert by_check["fresh"].max_value == rules.max_age_days
        assert ("no_weekend" in by_check) == rules.weekdays_only
    assert CLASS_RULES["forex"].max_abs_log_return < CLASS_RULES["stock"].max_abs_log_return
    assert [e.meta["check"] for e in build_schema_suite(STOCK, ["Date", "Close"]).expectations] == [
        "columns",
        "Date_dtype",
        "Close_dtype",
    ]


def test_prepare_frame_adds_the_helper_columns():
    batch = bars(STOCK, rows=10)
    frame = prepare_frame(batch, END)
    assert list(frame.columns) == [*OUTPUT_COLUMNS, *HELPER_COLUMNS]
    assert frame["_age_days"].iloc[-1] == 0
    assert pd.isna(frame["_gap_days"].iloc[0]) and pd.isna(frame["_close_log_return"].iloc[0])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="tolerance"):
        validate_prices(bars(STOCK, rows=5), STOCK, END, tolerance=0.5)
    with pytest.raises(ValueError, match="asset class"):
        validate_prices(bars(STOCK, rows=5), Instrument("AMD", "bond"), END)


def test_import_creates_no_context_and_imports_no_gx():
    code = (
        "import sys, ml.quality.validation as v; "
        "assert 'great_expectations' not in sys.modules; "
        "assert v._batch_definition.cache_info().currsize == 0"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
