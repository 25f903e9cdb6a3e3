"""Tests of `ml.data.sources`: the deterministic synthetic source, file replay and source selection."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ml.config import Settings, without_pipeline_env
from ml.data.schema import OUTPUT_COLUMNS, PRICE_COLUMNS, PriceSourceError
from ml.data.sources import FileSource, SyntheticSource, YahooSource, get_source
from ml.data.synthetic import ANCHOR_DATE, ANCHOR_PRICES
from ml.universe import Instrument, Universe, load_universe

REPO = Path(__file__).resolve().parent.parent
START, END = date(2024, 1, 1), date(2024, 6, 28)
GOOGL = Instrument("GOOGL", "stock")
EURUSD = Instrument("EURUSD=X", "forex")
SOL = Instrument("SOL-USD", "crypto")


@pytest.fixture(scope="module")
def universe() -> Universe:
    return load_universe(REPO / "universe.csv")


@pytest.fixture(scope="module")
def frames(universe: Universe) -> dict[str, pd.DataFrame]:
    """Synthetic bars of every default ticker over the first half of 2024."""
    source = SyntheticSource()
    return {i.ticker: source.fetch(i, START, END) for i in universe}


def csv_digest(frame: pd.DataFrame) -> str:
    return hashlib.sha256(frame.to_csv(index=False).encode()).hexdigest()


# --- synthetic -----------------------------------------------------------------------------------


@pytest.mark.parametrize("instrument", [GOOGL, EURUSD, SOL], ids=lambda i: i.ticker)
def test_synthetic_bars_depend_only_on_ticker_and_date(instrument: Instrument) -> None:
    source = SyntheticSource()
    a = source.fetch(instrument, date(2024, 1, 1), date(2024, 6, 28))
    b = source.fetch(instrument, date(2023, 6, 1), date(2024, 3, 29))
    overlap_a = a.loc[a["Date"] <= pd.Timestamp(2024, 3, 29)].reset_index(drop=True)
    overlap_b = b.loc[b["Date"] >= pd.Timestamp(2024, 1, 1)].reset_index(drop=True)
    assert len(overlap_a) > 50
    pd.testing.assert_frame_equal(overlap_a, overlap_b, check_exact=True)


def test_synthetic_bars_are_identical_in_another_process() -> None:
    code = (
        "from datetime import date; import hashlib; from ml.data.sources import SyntheticSource; "
        "from ml.universe import Instrument; "
        "f = SyntheticSource().fetch(Instrument('GOOGL', 'stock'), date(2024, 1, 1), "
        "date(2024, 6, 28)); print(hashlib.sha256(f.to_csv(index=False).encode()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "987", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == csv_digest(SyntheticSource().fetch(GOOGL, START, END))


def test_different_tickers_get_different_paths(frames: dict[str, pd.DataFrame]) -> None:
    returns = {
        t: np.diff(np.log(f["Close"].to_numpy())) for t, f in frames.items() if t != "SOL-USD"
    }
    assert returns["SPY"].std() > 0
    assert not np.allclose(returns["SPY"], returns["IVV"])
    assert not np.allclose(returns["GOOGL"], returns["AMD"])


def test_calendars_follow_the_asset_class(
    universe: Universe, frames: dict[str, pd.DataFrame]
) -> None:
    for instrument in universe:
        weekdays = frames[instrument.ticker]["Date"].dt.dayofweek
        if instrument.trades_weekends:
            assert set(weekdays) == set(range(7)), instrument.ticker
            expected = pd.date_range(START, END, freq="D")
            assert list(frames[instrument.ticker]["Date"]) == list(expected)
        else:
            assert weekdays.max() <= 4, instrument.ticker
            assert set(weekdays) == set(range(5)), instrument.ticker


def test_bars_are_consistent_positive_and_have_class_volume(
    universe: Universe, frames: dict[str, pd.DataFrame]
) -> None:
    for instrument in universe:
        f = frames[instrument.ticker]
        prices = f[["Open", "High", "Low", "Close", "Adj Close"]]
        assert (prices > 0).all().all(), instrument.ticker
        assert not f[PRICE_COLUMNS[1:]].isna().any().any(), instrument.ticker
        assert (f["Low"] <= f[["Open", "Close"]].min(axis=1)).all(), instrument.ticker
        assert (f["High"] >= f[["Open", "Close"]].max(axis=1)).all(), instrument.ticker
        assert (f["High"] > f["Low"]).mean() > 0.99, instrument.ticker
        if instrument.has_volume:
            assert (f["Volume"] > 0).all(), instrument.ticker
        else:
            assert (f["Volume"] == 0).all(), instrument.ticker


def test_price_levels_are_near_the_anchor(
    universe: Universe, frames: dict[str, pd.DataFrame]
) -> None:
    assert ANCHOR_DATE == END
    for instrument in universe:
        f = frames[instrument.ticker]
        close = f.loc[f["Date"] == pd.Timestamp(ANCHOR_DATE), "Close"]
        assert len(close) == 1, instrument.ticker
        anchor = ANCHOR_PRICES[instrument.ticker]
        assert abs(close.iloc[0] / anchor - 1) < 0.01, (instrument.ticker, close.iloc[0])
    googl = frames["GOOGL"]
    assert googl["Close"].iloc[-1] == pytest.approx(182.0, rel=0.01)


def test_output_columns_and_dtypes(frames: dict[str, pd.DataFrame]) -> None:
    for ticker, f in frames.items():
        assert list(f.columns) == OUTPUT_COLUMNS
        assert str(f["Date"].dtype) == "datetime64[ns]"
        assert (f["Date"] == f["Date"].dt.normalize()).all()
        assert f["Date"].is_monotonic_increasing and f["Date"].is_unique
        assert f["Date"].min() >= pd.Timestamp(START) and f["Date"].max() <= pd.Timestamp(END)
        for col in PRICE_COLUMNS[1:]:
            assert f[col].dtype == np.float64, (ticker, col)
        assert (f["Ticker"] == ticker).all()
        assert f.index.equals(pd.RangeIndex(len(f)))


def test_start_after_end_raises() -> None:
    with pytest.raises(PriceSourceError, match="GOOGL: start 2024-06-28 is after end 2024-06-01"):
        SyntheticSource().fetch(GOOGL, date(2024, 6, 28), date(2024, 6, 1))


def test_dates_outside_the_synthetic_span_raise() -> None:
    with pytest.raises(PriceSourceError, match="synthetic data span"):
        SyntheticSource().fetch(GOOGL, date(1999, 1, 4), date(2000, 2, 1))


def test_a_weekend_range_has_no_equity_bars_but_crypto_bars() -> None:
    saturday, sunday = date(2024, 6, 29), date(2024, 6, 30)
    assert SyntheticSource().fetch(GOOGL, saturday, sunday).empty
    assert list(SyntheticSource().fetch(SOL, saturday, sunday)["Date"].dt.day) == [29, 30]


# --- files ---------------------------------------------------------------------------------------


def yfinance_layout(frame: pd.DataFrame, tz: str | None = None) -> pd.DataFrame:
    """A frame as yfinance's `Ticker.history()` returns it: Date index, extra columns."""
    out = frame.drop(columns="Ticker").set_index("Date")
    if tz:
        out.index = out.index.tz_localize(tz)
    out["Dividends"] = 0.0
    out["Stock Splits"] = 0.0
    return out


@pytest.fixture(scope="module")
def googl() -> pd.DataFrame:
    return SyntheticSource().fetch(GOOGL, START, END)


def test_file_source_reads_csv_with_a_date_column(tmp_path: Path, googl: pd.DataFrame) -> None:
    googl.drop(columns="Ticker").to_csv(tmp_path / "GOOGL.csv", index=False)
    got = FileSource(tmp_path).fetch(GOOGL, START, END)
    pd.testing.assert_frame_equal(got, googl)


def test_file_source_reads_csv_written_from_the_date_index(
    tmp_path: Path, googl: pd.DataFrame
) -> None:
    yfinance_layout(googl).to_csv(tmp_path / "GOOGL.csv")
    got = FileSource(tmp_path).fetch(GOOGL, START, END)
    pd.testing.assert_frame_equal(got, googl)


def test_file_source_reads_parquet_with_a_tz_aware_date_index(
    tmp_path: Path, googl: pd.DataFrame
) -> None:
    yfinance_layout(googl, tz="America/New_York").to_parquet(tmp_path / "GOOGL.parquet")
    got = FileSource(tmp_path).fetch(GOOGL, START, END)
    assert str(got["Date"].dtype) == "datetime64[ns]"
    pd.testing.assert_frame_equal(got, googl)


def test_file_source_keeps_the_local_session_date_east_of_utc(
    tmp_path: Path, googl: pd.DataFrame
) -> None:
    yfinance_layout(googl, tz="Asia/Tokyo").to_parquet(tmp_path / "GOOGL.parquet")
    got = FileSource(tmp_path).fetch(GOOGL, START, END)
    pd.testing.assert_frame_equal(got, googl)


def test_file_source_reads_csv_with_a_single_utc_offset(
    tmp_path: Path, googl: pd.DataFrame
) -> None:
    winter = googl.loc[googl["Date"] < pd.Timestamp(2024, 3, 1)].reset_index(drop=True)
    yfinance_layout(winter, tz="America/New_York").to_csv(tmp_path / "GOOGL.csv")
    assert "-05:00" in (tmp_path / "GOOGL.csv").read_text().splitlines()[1]
    got = FileSource(tmp_path).fetch(GOOGL, START, END)
    pd.testing.assert_frame_equal(got, winter)


def test_file_source_reads_csv_spanning_a_dst_change(tmp_path: Path, googl: pd.DataFrame) -> None:
    yfinance_layout(googl, tz="America/New_York").to_csv(tmp_path / "GOOGL.csv")
    got = FileSource(tmp_path).fetch(GOOGL, START, END)
    pd.testing.assert_frame_equal(got, googl)


def test_file_source_drops_rows_outside_the_range(tmp_path: Path, googl: pd.DataFrame) -> None:
    googl.drop(columns="Ticker").to_csv(tmp_path / "GOOGL.csv", index=False)
    got = FileSource(tmp_path).fetch(GOOGL, date(2024, 3, 1), date(2024, 3, 31))
    assert got["Date"].min() == pd.Timestamp(2024, 3, 1)
    assert got["Date"].max() == pd.Timestamp(2024, 3, 29)
    assert len(got) == 21


@pytest.mark.parametrize("file_name", ["EURUSD_X.csv", "EURUSD=X.csv", "EURUSD_X.parquet"])
def test_file_source_finds_the_slug_or_the_ticker_file(tmp_path: Path, file_name: str) -> None:
    bars = SyntheticSource().fetch(EURUSD, START, END)
    raw = bars.drop(columns="Ticker")
    path = tmp_path / file_name
    raw.to_parquet(path) if path.suffix == ".parquet" else raw.to_csv(path, index=False)
    pd.testing.assert_frame_equal(FileSource(tmp_path).fetch(EURUSD, START, END), bars)


def test_missing_file_names_the_expected_file(tmp_path: Path) -> None:
    (tmp_path / "GOOGL.csv").write_text("not for this ticker")
    with pytest.raises(PriceSourceError) as excinfo:
        FileSource(tmp_path).fetch(EURUSD, START, END)
    message = str(excinfo.value)
    assert message.startswith("EURUSD=X:")
    assert "EURUSD_X.csv" in message and str(tmp_path) in message


def test_missing_column_raises_naming_it(tmp_path: Path, googl: pd.DataFrame) -> None:
    googl.drop(columns=["Ticker", "Low"]).to_csv(tmp_path / "GOOGL.csv", index=False)
    with pytest.raises(PriceSourceError) as excinfo:
        FileSource(tmp_path).fetch(GOOGL, START, END)
    message = str(excinfo.value)
    assert "GOOGL" in message and "'Low'" in message and "GOOGL.csv" in message


# --- files as users have them (plain OHLCV, other names, other orders) ---------------------------


def plain_ohlcv(frame: pd.DataFrame) -> pd.DataFrame:
    """What `backtesting`'s GOOG.csv looks like: the date as an unnamed index, no Adj Close."""
    return frame.drop(columns=["Ticker", "Adj Close"]).set_index("Date").rename_axis(None)


def test_plain_ohlcv_with_an_unnamed_date_column_reads_with_adj_close_equal_close(
    tmp_path: Path, googl: pd.DataFrame
) -> None:
    plain_ohlcv(googl).to_csv(tmp_path / "GOOGL.csv")
    assert (tmp_path / "GOOGL.csv").read_text().startswith(",Open,High,Low,Close,Volume\n")
    got = FileSource(tmp_path).fetch(GOOGL, START, END)
    expected = googl.assign(**{"Adj Close": googl["Close"]})
    pd.testing.assert_frame_equal(got, expected)
    assert got.attrs["notes"] == [
        "GOOGL.csv: no Adj Close column: Adj Close = Close (no adjustment)"
    ]


@pytest.mark.parametrize("date_name", ["date", "Date", "timestamp"])
def test_lowercase_names_newest_first_and_extra_columns(
    tmp_path: Path, googl: pd.DataFrame, date_name: str
) -> None:
    raw = googl.drop(columns="Ticker").iloc[::-1].reset_index(drop=True)
    raw.columns = [date_name if c == "Date" else c.lower() for c in raw.columns]
    raw["dividends"], raw["stock splits"], raw["OpenInt"] = 0.0, 0.0, 0
    raw.to_csv(tmp_path / "googl.csv", index=False)  # the file name in another case, too
    got = FileSource(tmp_path).fetch(GOOGL, START, END)
    pd.testing.assert_frame_equal(got, googl)
    notes = got.attrs["notes"]
    assert "googl.csv: newest-first order, read in reverse" in notes
    assert "googl.csv: ignored column(s) ['dividends', 'stock splits', 'OpenInt']" in notes


def test_a_file_without_a_date_column_names_the_file_and_its_columns(
    tmp_path: Path, googl: pd.DataFrame
) -> None:
    googl.drop(columns=["Ticker", "Date"]).to_csv(tmp_path / "GOOGL.csv", index=False)
    with pytest.raises(PriceSourceError) as excinfo:
        FileSource(tmp_path).fetch(GOOGL, START, END)
    message = str(excinfo.value)
    assert "GOOGL.csv" in message and "no date column" in message and "'Volume'" in message


def test_a_date_column_that_holds_no_dates_names_the_file_and_the_column(
    tmp_path: Path, googl: pd.DataFrame
) -> None:
    raw = googl.drop(columns="Ticker").rename(columns={"Date": "timestamp"})
    raw["timestamp"] = raw["timestamp"].astype(str)
    raw.loc[5, "timestamp"] = "yesterday-ish"
    raw.to_csv(tmp_path / "GOOGL.csv", index=False)
    with pytest.raises(PriceSourceError) as excinfo:
        FileSource(tmp_path).fetch(GOOGL, START, END)
    message = str(excinfo.value)
    assert "GOOGL.csv" in message and "column 'timestamp' does not hold dates" in message
    assert "data row 6 is not a date" in message
    assert "yesterday-ish" not in message  # the row to fix is named, its content is not echoed


def test_a_shuffled_file_is_not_sorted_silently(tmp_path: Path, googl: pd.DataFrame) -> None:
    """Only a whole newest-first file is reversed: out-of-order rows reach validation."""
    raw = googl.drop(columns="Ticker")
    raw = raw.iloc[[*range(len(raw) - 3), len(raw) - 2, len(raw) - 3, len(raw) - 1]]
    raw.to_csv(tmp_path / "GOOGL.csv", index=False)
    got = FileSource(tmp_path).fetch(GOOGL, START, END)
    assert not got["Date"].is_monotonic_increasing and got.attrs["notes"] == []


def test_unreadable_file_raises_naming_it(tmp_path: Path) -> None:
    (tmp_path / "GOOGL.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(PriceSourceError) as excinfo:
        FileSource(tmp_path).fetch(GOOGL, START, END)
    assert "GOOGL" in str(excinfo.value) and "GOOGL.parquet" in str(excinfo.value)


def test_bad_values_reach_validation_instead_of_being_dropped(
    tmp_path: Path, googl: pd.DataFrame
) -> None:
    raw = googl.drop(columns="Ticker").astype({"Close": object})
    raw.loc[3, "Close"] = "n/a"
    raw.to_csv(tmp_path / "GOOGL.csv", index=False)
    got = FileSource(tmp_path).fetch(GOOGL, START, END)
    assert len(got) == len(googl)
    assert got["Close"].isna().sum() == 1 and np.isnan(got.loc[3, "Close"])


def test_a_header_of_many_long_strange_names_is_listed_bounded(tmp_path: Path) -> None:
    names = [f"col{i}\x1b[31m" + "x" * 200 for i in range(500)]
    (tmp_path / "GOOGL.csv").write_text(",".join(names) + "\n" + ",".join("1" * 500) + "\n")
    with pytest.raises(PriceSourceError) as excinfo:
        FileSource(tmp_path).fetch(GOOGL, START, END)
    message = str(excinfo.value)
    assert "GOOGL.csv" in message and "no date column" in message
    assert "... 488 more]" in message and "(210 characters)" in message
    assert "\x1b" not in message and "x" * 100 not in message
    assert len(message) < 1500


# --- files: only regular files inside the folder, of a bounded size --------------------------------


def test_a_link_to_a_file_inside_the_folder_is_read(tmp_path: Path, googl: pd.DataFrame) -> None:
    (tmp_path / "vendor").mkdir()
    googl.drop(columns="Ticker").to_csv(tmp_path / "vendor" / "googl-2024.csv", index=False)
    (tmp_path / "GOOGL.csv").symlink_to(Path("vendor") / "googl-2024.csv")
    pd.testing.assert_frame_equal(FileSource(tmp_path).fetch(GOOGL, START, END), googl)


def test_a_link_out_of_the_folder_is_refused_unread(tmp_path: Path, googl: pd.DataFrame) -> None:
    folder, outside = tmp_path / "files", tmp_path / "elsewhere.csv"
    folder.mkdir()
    googl.drop(columns="Ticker").rename(columns={"Open": "SECRET_COLUMN"}).to_csv(outside)
    (folder / "GOOGL.csv").symlink_to(outside)
    with pytest.raises(PriceSourceError) as excinfo:
        FileSource(folder).fetch(GOOGL, START, END)
    message = str(excinfo.value)
    assert message == (
        "GOOGL: GOOGL.csv in PRICE_FILES_DIR links to a file outside that folder: not read; "
        "copy the file itself into PRICE_FILES_DIR"
    )


@pytest.mark.timeout(30)  # opening a FIFO for reading would block until a writer comes
def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "GOOGL.csv")
    with pytest.raises(PriceSourceError, match=r"GOOGL.csv in PRICE_FILES_DIR is a named pipe"):
        FileSource(tmp_path).fetch(GOOGL, START, END)


def test_a_folder_and_a_broken_link_are_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "GOOGL.csv").mkdir()
    (tmp_path / "EURUSD_X.csv").symlink_to(tmp_path / "gone.csv")
    with pytest.raises(PriceSourceError, match=r"GOOGL.csv in PRICE_FILES_DIR is a folder"):
        FileSource(tmp_path).fetch(GOOGL, START, END)
    with pytest.raises(PriceSourceError, match=r"EURUSD_X.csv in PRICE_FILES_DIR is a link to"):
        FileSource(tmp_path).fetch(EURUSD, START, END)


SYSTEM_FILES = ["/proc/self/environ", "/etc/os-release"]


@pytest.mark.parametrize("target", SYSTEM_FILES)
def test_a_link_to_a_system_file_echoes_none_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    if not Path(target).exists():
        pytest.skip(f"{target} does not exist here")
    marker = "issue27-marker-3f9c1d"
    monkeypatch.setenv("PRICE_TEST_MARKER", marker)
    (tmp_path / "GOOGL.csv").symlink_to(target)
    with pytest.raises(PriceSourceError) as excinfo:
        FileSource(tmp_path).fetch(GOOGL, START, END)
    message = str(excinfo.value)
    assert "outside that folder" in message
    assert marker not in message and "PRICE_TEST_MARKER" not in message
    assert "NAME=" not in message and "ID=" not in message  # os-release's lines


def test_the_environment_stays_out_of_every_output_of_an_ingest(tmp_path: Path) -> None:
    """`python -m ml ingest` with SPY.csv -> /proc/self/environ: the ticker fails, and the
    environment's values appear in no output and no file the run writes."""
    marker = "issue27-marker-b71e04"
    files, data = tmp_path / "files", tmp_path / "data"
    files.mkdir()
    (files / "SPY.csv").symlink_to("/proc/self/environ")
    env = {
        **without_pipeline_env(os.environ),
        "PYTHONPATH": str(REPO),
        "PRICE_SOURCE": "files",
        "PRICE_FILES_DIR": str(files),
        "DATA_DIR": str(data),
        "PRICE_TEST_MARKER": marker,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "ml", "ingest", "--date", "2024-06-28", "--tickers", "SPY"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "SPY.csv in PRICE_FILES_DIR links to a file outside that folder" in proc.stdout
    written = [p for p in data.rglob("*") if p.is_file()] if data.exists() else []
    for text in (proc.stdout, proc.stderr, *(p.read_bytes().decode("latin-1") for p in written)):
        assert marker not in text
        assert env["PATH"] not in text


def test_a_file_over_the_size_bound_is_refused_before_it_is_read(
    tmp_path: Path, googl: pd.DataFrame, settings: Settings
) -> None:
    googl.drop(columns="Ticker").to_csv(tmp_path / "GOOGL.csv", index=False)
    size = (tmp_path / "GOOGL.csv").stat().st_size
    source = get_source(
        replace(settings, price_source="files", price_files_dir=tmp_path, price_file_max_bytes=1000)
    )
    with pytest.raises(PriceSourceError) as excinfo:
        source.fetch(GOOGL, START, END)
    assert str(excinfo.value) == (
        f"GOOGL: GOOGL.csv in PRICE_FILES_DIR has {size:,} bytes, more than "
        "PRICE_FILE_MAX_BYTES (1,000): not read; keep one ticker's daily bars in it, or raise "
        "PRICE_FILE_MAX_BYTES"
    )
    # At the bound the file is read.
    got = FileSource(tmp_path, max_bytes=size).fetch(GOOGL, START, END)
    pd.testing.assert_frame_equal(got, googl)


# --- source selection ----------------------------------------------------------------------------


def test_get_source_returns_the_named_source(settings: Settings, tmp_path: Path) -> None:
    assert isinstance(get_source(settings), SyntheticSource)
    yahoo = get_source(replace(settings, price_source="yahoo", yahoo_max_retries=2))
    assert isinstance(yahoo, YahooSource) and yahoo.max_retries == 2
    files = get_source(replace(settings, price_source="files", price_files_dir=tmp_path))
    assert isinstance(files, FileSource) and files.directory == tmp_path


def test_files_with_a_missing_folder_raise_instead_of_falling_back(
    settings: Settings, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-folder"
    source = get_source(replace(settings, price_source="files", price_files_dir=missing))
    assert not isinstance(source, SyntheticSource)
    with pytest.raises(PriceSourceError) as excinfo:
        source.fetch(GOOGL, START, END)
    assert str(missing) in str(excinfo.value)
