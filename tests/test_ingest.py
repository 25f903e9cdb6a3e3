"""Tests of ingestion: the command line over the whole universe, incremental runs, and bad input
through the real stage -> validate (Great Expectations) -> publish/quarantine path."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date, timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from ml.config import Settings, get_settings, without_pipeline_env
from ml.data.ingest import stage_ticker
from ml.data.sources import PRICE_COLUMNS, FileSource, PriceSourceError, SyntheticSource
from ml.data.store import PriceStore
from ml.quality.publish import publish_staged
from ml.quality.validation import PriceValidationError
from ml.steps.data import ingest_step, publish_step
from ml.universe import Instrument, load_universe

REPO = Path(__file__).resolve().parent.parent
UNIVERSE = load_universe(REPO / "universe.csv")
HISTORY_START = date(2023, 1, 2)
AS_OF = date(2024, 6, 28)  # a Friday
NEXT_DAY = date(2024, 7, 1)  # the Monday after


def ingest_ticker(instrument, as_of, settings, source) -> SimpleNamespace:
    """Stage then validate and publish one ticker (the data phase's two steps), as one result."""
    staged = stage_ticker(instrument, as_of, settings, source)
    published = publish_staged(instrument, as_of, settings)
    return SimpleNamespace(
        rows_fetched=staged.rows_fetched, incremental=staged.incremental, **published
    )


def cli_env(data_dir: Path) -> dict[str, str]:
    env = without_pipeline_env(os.environ)
    env.update(
        PYTHONPATH=str(REPO),
        PRICE_SOURCE="synthetic",
        DATA_DIR=str(data_dir),
        HISTORY_START=HISTORY_START.isoformat(),
    )
    return env


def run_ingest(data_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ml", "ingest", *args],
        cwd=cwd,
        env=cli_env(data_dir),
        capture_output=True,
        text=True,
        timeout=300,
    )


def digests(root: Path, *folders: str) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under `folders` of `root`."""
    out = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file():
                out[str(path.relative_to(root))] = (
                    hashlib.sha256(path.read_bytes()).hexdigest(),
                    path.stat().st_mtime_ns,
                )
    return out


def only_sha(d: dict[str, tuple[str, int]]) -> dict[str, str]:
    return {k: v[0] for k, v in d.items()}


# --- the command line over the whole universe ----------------------------------------------------


@dataclass
class CliRun:
    data_dir: Path
    proc: subprocess.CompletedProcess
    files: dict[str, tuple[str, int]]


@pytest.fixture(scope="module")
def first_ingest(tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    tmp = tmp_path_factory.mktemp("cli-ingest")
    data_dir = tmp / "data"
    proc = run_ingest(data_dir, tmp, "--date", AS_OF.isoformat())
    return CliRun(data_dir, proc, digests(data_dir, "prices", "validation"))


@pytest.fixture(scope="module")
def second_ingest(first_ingest: CliRun) -> CliRun:
    data_dir = first_ingest.data_dir
    proc = run_ingest(data_dir, data_dir.parent, "--date", AS_OF.isoformat())
    return CliRun(data_dir, proc, digests(data_dir, "prices", "validation"))


def test_cli_ingest_publishes_every_ticker(first_ingest: CliRun) -> None:
    proc, data_dir = first_ingest.proc, first_ingest.data_dir
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 31
    for instrument, line in zip(UNIVERSE, lines, strict=True):
        assert line.split()[0] == instrument.ticker
        assert "full history, synthetic" in line and "validation passed" in line, line
        assert line.endswith(f"to {AS_OF.isoformat()}"), line

    prices = sorted(p.name for p in (data_dir / "prices").iterdir())
    assert prices == sorted(f"{i.slug}.parquet" for i in UNIVERSE)
    store = PriceStore(data_dir)
    source = SyntheticSource()
    for instrument in UNIVERSE:
        history = store.load(instrument)
        pd.testing.assert_frame_equal(history, source.fetch(instrument, HISTORY_START, AS_OF))
        report = json.loads(store.report_path(instrument, AS_OF).read_text())
        assert report["success"] is True and report["ticker"] == instrument.ticker
    assert not [p for p in (data_dir / "staging").rglob("*") if p.is_file()]
    assert not (data_dir / "quarantine").exists()


def test_rerunning_the_same_date_leaves_prices_byte_identical(
    first_ingest: CliRun, second_ingest: CliRun
) -> None:
    assert second_ingest.proc.returncode == 0, second_ingest.proc.stderr
    lines = second_ingest.proc.stdout.strip().splitlines()
    assert len(lines) == 31
    for line in lines:
        assert "incremental" in line and "added     0  updated   0" in line, line
    prices = {k: v for k, v in first_ingest.files.items() if k.startswith("prices/")}
    assert len(prices) == 31
    assert {k: v for k, v in second_ingest.files.items() if k.startswith("prices/")} == prices


def test_rerunning_the_same_date_leaves_validation_reports_byte_identical(
    first_ingest: CliRun, second_ingest: CliRun
) -> None:
    assert second_ingest.proc.returncode == 0
    reports = {k: v for k, v in only_sha(first_ingest.files).items() if k.startswith("validation/")}
    assert len(reports) == 31
    assert {
        k: v for k, v in only_sha(second_ingest.files).items() if k.startswith("validation/")
    } == reports


def test_next_day_fetches_only_the_trailing_window(
    first_ingest: CliRun, settings: Settings, tmp_path: Path
) -> None:
    assert first_ingest.proc.returncode == 0
    data_dir = tmp_path / "next-day"
    shutil.copytree(first_ingest.data_dir, data_dir)
    settings = replace(settings, data_dir=data_dir, history_start=HISTORY_START)
    store = PriceStore(data_dir)
    amd_before = (data_dir / "prices" / "AMD.parquet").read_bytes()

    # Friday -> Monday: one new bar for weekday classes, three (Sat, Sun, Mon) for crypto.
    for ticker, new_bars in (("GOOGL", 1), ("EURUSD=X", 1), ("ZB=F", 1), ("SOL-USD", 3)):
        instrument = UNIVERSE.get(ticker)
        before = store.load(instrument)
        staged = ingest_step(ticker, NEXT_DAY, settings)
        assert staged["incremental"] is True
        # The trailing window is counted in calendar days back from the last published bar.
        assert date.fromisoformat(staged["start"]) == AS_OF - timedelta(settings.trailing_days)
        if instrument.asset_class == "stock":
            assert staged["rows_fetched"] <= settings.trailing_days + 1
        assert staged["rows_fetched"] <= (NEXT_DAY - AS_OF).days + settings.trailing_days + 1
        published = publish_step(ticker, NEXT_DAY, settings)
        assert (published["rows_added"], published["rows_updated"]) == (new_bars, 0), ticker
        after = store.load(instrument)
        assert len(after) == len(before) + new_bars
        pd.testing.assert_frame_equal(after.iloc[: len(before)], before)
        expected = SyntheticSource().fetch(instrument, AS_OF + timedelta(1), NEXT_DAY)
        pd.testing.assert_frame_equal(after.iloc[len(before) :].reset_index(drop=True), expected)
    assert (data_dir / "prices" / "AMD.parquet").read_bytes() == amd_before


# --- bad input through the real pipeline ---------------------------------------------------------

GOOD_AS_OF = date(2024, 6, 27)
REPLAY_START = date(2024, 1, 2)


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of good CSVs (to AS_OF) and a store after a good ingest of GOOD_AS_OF."""
    root = tmp_path_factory.mktemp("replay")
    files = root / "files"
    files.mkdir()
    settings = replace(
        get_settings({}),
        data_dir=root / "data",
        history_start=REPLAY_START,
        price_source="files",
        price_files_dir=files,
    )
    for ticker in ("GOOGL", "EURUSD=X"):
        instrument = UNIVERSE.get(ticker)
        bars = SyntheticSource().fetch(instrument, REPLAY_START, AS_OF)
        bars.drop(columns="Ticker").to_csv(files / f"{ticker}.csv", index=False)
        result = ingest_ticker(instrument, GOOD_AS_OF, settings, FileSource(files))
        assert result.rows_added == len(bars) - 1 and result.last_date == "2024-06-27"
    return root


@dataclass
class Case:
    settings: Settings
    files: Path
    store: PriceStore

    def csv(self, ticker: str) -> Path:
        return self.files / f"{ticker}.csv"

    def rewrite(self, ticker: str, change: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
        path = self.csv(ticker)
        change(pd.read_csv(path)).to_csv(path, index=False)


@pytest.fixture
def case(replay: Path, tmp_path: Path) -> Case:
    root = tmp_path / "case"
    shutil.copytree(replay, root)
    settings = replace(
        get_settings({}),
        data_dir=root / "data",
        history_start=REPLAY_START,
        price_source="files",
        price_files_dir=root / "files",
    )
    return Case(settings, root / "files", PriceStore(root / "data"))


def run_pipeline(case: Case, instrument: Instrument, as_of: date) -> None:
    source = FileSource(case.files)
    stage_ticker(instrument, as_of, case.settings, source)
    publish_staged(instrument, as_of, case.settings)


def on_last_row(**values: float) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def change(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.copy()
        for col, value in values.items():
            frame.loc[frame.index[-1], col] = value
        return frame

    return change


def high_below_low(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    last = frame.index[-1]
    high, low = float(frame.loc[last, "High"]), float(frame.loc[last, "Low"])
    frame.loc[last, "High"], frame.loc[last, "Low"] = low, high
    return frame


def spike_100x(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame.loc[frame.index[-1], PRICE_COLUMNS[1:6]] *= 100
    return frame


def duplicate_last(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([frame, frame.iloc[[-1]]], ignore_index=True)


def swap_two_dates(frame: pd.DataFrame) -> pd.DataFrame:
    order = [*range(len(frame) - 3), len(frame) - 2, len(frame) - 3, len(frame) - 1]
    return frame.iloc[order].reset_index(drop=True)


def header_only(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.iloc[0:0]


def nothing_in_range(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.loc[frame["Date"] < "2024-05-31"]


def gap_of_two_weeks(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.loc[(frame["Date"] < "2024-06-18") | (frame["Date"] > "2024-06-26")]


def weekend_bar(frame: pd.DataFrame) -> pd.DataFrame:
    saturday = frame.loc[frame["Date"] == "2024-06-21"].assign(Date="2024-06-22")
    return pd.concat([frame, saturday]).sort_values("Date", kind="stable")


def unchanged(frame: pd.DataFrame) -> pd.DataFrame:
    return frame


def published_only(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.loc[frame["Date"] <= GOOD_AS_OF.isoformat()]


def published_with_a_date_twice(frame: pd.DataFrame) -> pd.DataFrame:
    """Nothing new but the last published bar twice: not taken for a no-new-data day."""
    return duplicate_last(published_only(frame))


BAD_BATCHES = [
    ("nan-close", "GOOGL", on_last_row(Close=np.nan), AS_OF, "Close_not_null"),
    ("nan-close-forex", "EURUSD=X", on_last_row(Close=np.nan), AS_OF, "Close_not_null"),
    ("high-below-low", "GOOGL", high_below_low, AS_OF, "high_ge_low"),
    ("zero-low", "GOOGL", on_last_row(Low=0.0), AS_OF, "Low_positive"),
    (
        "negative-adj-close",
        "GOOGL",
        on_last_row(**{"Adj Close": -1.0}),
        AS_OF,
        "Adj Close_positive",
    ),
    ("duplicate-date", "GOOGL", duplicate_last, AS_OF, "dates_unique"),
    ("unordered-dates", "GOOGL", swap_two_dates, AS_OF, "dates_increasing"),
    ("spike-100x", "GOOGL", spike_100x, AS_OF, "close_jump"),
    ("header-only", "GOOGL", header_only, AS_OF, "rows"),
    ("no-rows-in-range", "GOOGL", nothing_in_range, AS_OF, "rows"),
    ("gap", "GOOGL", gap_of_two_weeks, AS_OF, "max_gap"),
    ("weekend-bar", "GOOGL", weekend_bar, AS_OF, "no_weekend"),
    ("stale", "GOOGL", unchanged, AS_OF + timedelta(days=30), "fresh"),
    # Only bars that are already published: the unchanged path still checks freshness.
    ("stale-repeat", "GOOGL", published_only, GOOD_AS_OF + timedelta(days=30), "fresh"),
    (
        "duplicate-published-date",
        "GOOGL",
        published_with_a_date_twice,
        GOOD_AS_OF + timedelta(days=4),
        "dates_unique",
    ),
]


@pytest.mark.parametrize(
    ("ticker", "corrupt", "as_of", "check"),
    [b[1:] for b in BAD_BATCHES],
    ids=[b[0] for b in BAD_BATCHES],
)
def test_bad_batch_is_quarantined_and_nothing_is_published(
    case: Case,
    ticker: str,
    corrupt: Callable[[pd.DataFrame], pd.DataFrame],
    as_of: date,
    check: str,
) -> None:
    instrument = UNIVERSE.get(ticker)
    prices_before = digests(case.store.root, "prices")
    history_before = case.store.load(instrument)
    case.rewrite(ticker, corrupt)

    with pytest.raises(PriceValidationError) as excinfo:
        run_pipeline(case, instrument, as_of)
    err = excinfo.value
    message = str(err)
    assert err.ticker == ticker
    assert message.splitlines()[0].startswith(f"{ticker}: price validation failed"), message
    assert f"[{check}]" in message, message
    assert check in {f["check"] for f in err.failures}

    assert digests(case.store.root, "prices") == prices_before
    pd.testing.assert_frame_equal(case.store.load(instrument), history_before)
    quarantine = case.store.quarantine_dir(instrument, as_of)
    assert quarantine == case.store.root / "quarantine" / instrument.slug / as_of.isoformat()
    batch = pd.read_parquet(quarantine / "batch.parquet")
    report = json.loads((quarantine / "validation.json").read_text())
    assert report["success"] is False and report["ticker"] == ticker
    failed = {
        r["expectation_config"]["meta"]["check"] for r in report["results"] if not r["success"]
    }
    assert check in failed
    assert report["meta"]["rows"] == len(batch)
    if check != "rows":
        assert len(batch) > 0
    assert not case.store.staging_path(instrument, as_of).exists()
    assert not case.store.report_path(instrument, as_of).exists()


HOSTILE_VALUES = [
    (column, value)
    for column in ("Open", "High", "Low", "Close", "Adj Close")
    for value in (np.inf, -np.inf, 1e308, 1e-300)
] + [("Volume", v) for v in (np.inf, -np.inf, 1e308)]


def _shown(value: float) -> str:
    """How the quarantine report shows a value: strict JSON, infinities as text."""
    return json.dumps("inf" if value == np.inf else "-inf" if value == -np.inf else value)


@pytest.mark.parametrize(
    ("column", "value"), HOSTILE_VALUES, ids=[f"{c}={v:g}" for c, v in HOSTILE_VALUES]
)
def test_a_non_finite_or_absurd_value_in_any_column_is_never_published(
    case: Case, column: str, value: float
) -> None:
    instrument = UNIVERSE.get("GOOGL")
    prices_before = digests(case.store.root, "prices")
    case.rewrite("GOOGL", on_last_row(**{column: value}))
    with pytest.raises(PriceValidationError) as excinfo:
        run_pipeline(case, instrument, AS_OF)
    assert digests(case.store.root, "prices") == prices_before
    quarantine = case.store.quarantine_dir(instrument, AS_OF)
    report = (quarantine / "validation.json").read_text()
    assert json.loads(report)["success"] is False
    assert _shown(value) in report, f"{column}={value} not shown in the report"
    assert str(excinfo.value).startswith("GOOGL: price validation failed")


def test_open_and_high_both_infinite_are_refused(case: Case) -> None:
    instrument = UNIVERSE.get("GOOGL")
    case.rewrite("GOOGL", on_last_row(Open=np.inf, High=np.inf))
    with pytest.raises(PriceValidationError) as excinfo:
        run_pipeline(case, instrument, AS_OF)
    assert {"Open_positive", "High_positive"} <= {f["check"] for f in excinfo.value.failures}
    assert "Open=inf" in str(excinfo.value) and "High=inf" in str(excinfo.value)


def test_missing_column_fails_before_staging_and_publishes_nothing(case: Case) -> None:
    instrument = UNIVERSE.get("GOOGL")
    prices_before = digests(case.store.root, "prices")
    case.rewrite("GOOGL", lambda f: f.drop(columns="Volume"))
    with pytest.raises(PriceSourceError) as excinfo:
        run_pipeline(case, instrument, AS_OF)
    assert "GOOGL" in str(excinfo.value) and "'Volume'" in str(excinfo.value)
    assert digests(case.store.root, "prices") == prices_before
    assert not case.store.staging_path(instrument, AS_OF).exists()
    assert not (case.store.root / "quarantine").exists()


def test_a_fixed_file_publishes_after_a_quarantined_batch(case: Case) -> None:
    instrument = UNIVERSE.get("GOOGL")
    good = case.csv("GOOGL").read_bytes()
    case.rewrite("GOOGL", on_last_row(Close=np.nan))
    with pytest.raises(PriceValidationError):
        run_pipeline(case, instrument, AS_OF)

    case.csv("GOOGL").write_bytes(good)
    result = ingest_ticker(instrument, AS_OF, case.settings, FileSource(case.files))
    assert (result.rows_added, result.rows_updated, result.last_date) == (1, 0, "2024-06-28")
    assert result.incremental and result.validation == "passed"
    assert (case.store.quarantine_dir(instrument, AS_OF) / "batch.parquet").is_file()
    assert json.loads(case.store.report_path(instrument, AS_OF).read_text())["success"] is True


def test_a_batch_of_published_bars_skips_the_suite_and_changes_no_file(case: Case) -> None:
    """A no-new-data day: the trailing window repeats published bars. Only the as-of checks run
    again (no GX suite); the first run for the date writes a report saying so, a re-run nothing."""
    instrument = UNIVERSE.get("GOOGL")
    case.rewrite("GOOGL", published_only)
    next_monday = GOOD_AS_OF + timedelta(days=4)  # no bar after Thursday's: a holiday week-end
    before = digests(case.store.root, "prices")

    result = ingest_ticker(instrument, next_monday, case.settings, FileSource(case.files))
    assert (result.rows_added, result.rows_updated, result.last_date) == (0, 0, "2024-06-27")
    assert result.rows_fetched > 1
    report = json.loads(case.store.report_path(instrument, next_monday).read_text())
    assert report["success"] is True and "unchanged" in report["meta"]
    assert report["meta"]["rows"] == result.rows_fetched
    checks = [r["expectation_config"]["meta"]["check"] for r in report["results"]]
    assert checks == ["not_after_as_of", "fresh"]
    assert report["results"][1]["result"]["observed_value"] == 4
    assert digests(case.store.root, "prices") == before
    assert not case.store.staging_path(instrument, next_monday).exists()

    reports = digests(case.store.root, "validation")
    ingest_ticker(instrument, next_monday, case.settings, FileSource(case.files))
    assert digests(case.store.root, "validation") == reports  # sha and mtime: nothing rewritten

    # One revised bar in the window: the full suite runs again.
    case.rewrite("GOOGL", on_last_row(Volume=123.0))
    revised = ingest_ticker(instrument, next_monday, case.settings, FileSource(case.files))
    assert (revised.rows_added, revised.rows_updated) == (0, 1)
    report = json.loads(case.store.report_path(instrument, next_monday).read_text())
    assert "unchanged" not in report["meta"] and len(report["results"]) > 2


def test_a_corrupt_price_file_is_quarantined_and_the_history_refetched(case: Case) -> None:
    """A published Parquet file overwritten with garbage: reading it names the file and the way
    out and moves it to quarantine; the same ingest then fetches the full history again."""
    from ml.data.store import CorruptPriceFile

    instrument = UNIVERSE.get("GOOGL")
    path = case.store.history_path(instrument)
    good = case.store.load(instrument)
    path.write_bytes(b"PAR1 garbage, not a parquet file")

    with pytest.raises(CorruptPriceFile) as excinfo:
        case.store.load(instrument)
    message = str(excinfo.value)
    assert str(path) in message and "quarantine" in message and "full history" in message
    assert not path.exists()
    [moved] = list((case.store.root / "quarantine" / instrument.slug).glob("corrupt-*/*.parquet"))
    assert moved.read_bytes() == b"PAR1 garbage, not a parquet file"

    path.write_bytes(b"garbage again")  # the next ingest meets it: full history, same run
    result = ingest_ticker(instrument, AS_OF, case.settings, FileSource(case.files))
    assert result.incremental is False and result.validation == "passed"
    pd.testing.assert_frame_equal(
        case.store.load(instrument, until=GOOD_AS_OF), good, check_like=True
    )
