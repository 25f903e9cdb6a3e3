"""Corporate actions and vendor revisions (`ml.data.revisions`, the heal in `ml.data.ingest`).

A vendor file is served before an event, then the vendor's series after it (every earlier bar
re-adjusted), through the real files source, stage, Great Expectations suite and store. After the
next daily run the published history must equal a fresh full fetch, show no jump beyond the
suite's bound, name the event, keep the superseded file, and a re-run of the date must change
nothing. The same through yfinance with replayed chart answers is in tests/test_yahoo.py.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ml.config import Settings, get_settings
from ml.data.ingest import stage_ticker
from ml.data.revisions import (
    classify_revision,
    max_relative_difference,
    split_ratio,
    vendor_disagreement,
)
from ml.data.sources import FileSource, SyntheticSource
from ml.data.store import PriceStore
from ml.quality.publish import HistoryRevisionError, publish_staged
from ml.quality.suite import rules_for
from ml.steps.data import validate_all
from ml.universe import Instrument, load_universe

REPO = Path(__file__).resolve().parent.parent
UNIVERSE = load_universe(REPO / "universe.csv")
START = date(2023, 1, 2)
PRICES = ["Open", "High", "Low", "Close", "Adj Close"]


def synthetic(ticker: str, end: date) -> pd.DataFrame:
    return SyntheticSource().fetch(UNIVERSE.get(ticker), START, end).drop(columns="Ticker")


# --- classification ------------------------------------------------------------------------------


def _scaled(frame: pd.DataFrame, before: str, prices: float, adj: float | None = None):
    out = frame.copy()
    early = out["Date"] < pd.Timestamp(before)
    out.loc[early, PRICES[:4]] *= prices
    out.loc[early, "Adj Close"] *= prices if adj is None else adj
    out.loc[early, "Volume"] /= prices
    return out


def test_classification_of_each_kind() -> None:
    published = synthetic("NVDA", date(2024, 6, 21))
    window = synthetic("NVDA", date(2024, 6, 24)).tail(10).reset_index(drop=True)
    assert classify_revision(published, window).kind == "identical"

    split = classify_revision(published, _scaled(window, "2024-06-24", 0.5))
    assert (split.kind, split.date, split.factor) == ("split", "2024-06-24", 0.5)
    assert split.describe() == "split 2:1 on 2024-06-24" and split.needs_refetch
    reverse = classify_revision(published, _scaled(window, "2024-06-24", 10.0))
    assert reverse.describe() == "split 1:10 on 2024-06-24"

    dividend = classify_revision(published, _scaled(window, "2024-06-24", 1.0, adj=0.99))
    assert (dividend.kind, dividend.date) == ("dividend", "2024-06-24")
    assert dividend.factor == pytest.approx(0.99)

    newest = window.copy()
    newest.loc[newest.index[-2], "Volume"] *= 1.1  # the last published bar's final print
    assert classify_revision(published, newest).kind == "newest"

    corrected = window.copy()
    corrected.loc[2, "Volume"] *= 1.5
    found = classify_revision(published, corrected)
    assert (found.kind, found.changed, found.date) == (
        "correction",
        1,
        str(window["Date"][2].date()),
    )

    assert classify_revision(published, pd.concat([window, window.tail(1)])).kind == "unchecked"


def test_a_vendor_split_event_without_re_adjusted_bars_is_a_correction() -> None:
    published = synthetic("NVDA", date(2024, 6, 21))
    window = synthetic("NVDA", date(2024, 6, 24)).tail(10).reset_index(drop=True)
    events = [{"date": "2024-06-24", "split": 2.0}]
    found = classify_revision(published, window, events)
    assert (found.kind, found.changed) == ("correction", 0)
    assert found.vendor_event == "2024-06-24: split 2:1" and found.needs_refetch


def test_split_ratios_read_as_shares_after_to_before() -> None:
    assert [split_ratio(f) for f in (0.5, 10.0, 1 / 3, 2 / 3, 0.1)] == [
        "2:1",
        "1:10",
        "3:1",
        "3:2",
        "10:1",
    ]


def test_vendor_disagreement_names_the_date_and_column() -> None:
    full = synthetic("AMD", date(2024, 6, 24))
    window = full.tail(8).reset_index(drop=True)
    assert vendor_disagreement(window, full) is None
    other = full.copy()
    other.loc[other.index[-4], "Close"] *= 1.01
    found = vendor_disagreement(window, other)
    assert found is not None and str(other["Date"].iloc[-4].date()) in found and "Close" in found


# --- the heal through the files source ----------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """The vendor's series before an event (served up to `d0`) and after it (to `d1`)."""

    name: str
    vendor: Callable[[pd.DataFrame], tuple[pd.DataFrame, pd.DataFrame]]
    d0: date
    d1: date
    described: str  # what the run says, as the start of the revision message


def _split(ratio: float, effective: str) -> Callable:
    """The traded price drops by `ratio` at `effective`: before it the vendor served every bar
    `ratio` times higher than it serves them now (Volume the other way)."""

    def vendor(bars: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        before = bars.copy()
        before[PRICES] *= ratio
        before["Volume"] /= ratio
        return before, bars

    return vendor


def _dividend(factor: float, ex_date: str) -> Callable:
    def vendor(bars: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        after = bars.copy()
        after.loc[after["Date"] < pd.Timestamp(ex_date), "Adj Close"] *= factor
        return bars, after

    return vendor


def _corrected(day: str) -> Callable:
    def vendor(bars: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        after = bars.copy()
        row = after["Date"] == pd.Timestamp(day)
        after.loc[row, "Open"] = (after.loc[row, "High"] + after.loc[row, "Low"]) / 2
        after.loc[row, "Volume"] *= 1.5
        return bars, after

    return vendor


def _holiday_split(ratio: float, holiday: str) -> Callable:
    """A split dated on a market holiday (no bar that day): it shows from the next session."""

    def vendor(bars: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        bars = bars.loc[bars["Date"] != pd.Timestamp(holiday)].reset_index(drop=True)
        return _split(ratio, holiday)(bars)

    return vendor


SCENARIOS = [
    Scenario("split-2-1", _split(2.0, "2024-06-24"), date(2024, 6, 21), date(2024, 6, 24),
             "split 2:1 on 2024-06-24"),
    Scenario("reverse-split-1-10", _split(0.1, "2024-06-24"), date(2024, 6, 21),
             date(2024, 6, 24), "split 1:10 on 2024-06-24"),
    Scenario("dividend-1pct", _dividend(0.99, "2024-06-24"), date(2024, 6, 21),
             date(2024, 6, 24), "dividend on 2024-06-24 (Adj Close of earlier bars x0.99)"),
    Scenario("old-bar-corrected", _corrected("2024-06-17"), date(2024, 6, 21),
             date(2024, 6, 24), "vendor correction of 1 published bar(s) from 2024-06-17"),
    Scenario("split-on-a-holiday", _holiday_split(2.0, "2024-07-04"), date(2024, 7, 3),
             date(2024, 7, 5), "split 2:1 on 2024-07-05"),
]  # fmt: skip


class CountingSource(FileSource):
    """The files source, counting the fetches per ticker and whether each was the full history."""

    calls: list

    def fetch(self, instrument: Instrument, start: date, end: date) -> pd.DataFrame:
        self.calls.append((instrument.ticker, start, end))
        return super().fetch(instrument, start, end)


def _source(files: Path) -> CountingSource:
    source = CountingSource(files)
    object.__setattr__(source, "calls", [])
    return source


def _serve(files: Path, ticker: str, bars: pd.DataFrame, until: date) -> None:
    bars.loc[bars["Date"] <= pd.Timestamp(until)].to_csv(files / f"{ticker}.csv", index=False)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for folder in ("prices", "validation", "quarantine")
        for p in sorted((root / folder).rglob("*"))
        if p.is_file()
    }


def _day(settings: Settings, files: Path, tickers: list[str], as_of: date) -> dict:
    source = _source(files)
    staged = {t: stage_ticker(UNIVERSE.get(t), as_of, settings, source) for t in tickers}
    published = {t: publish_staged(UNIVERSE.get(t), as_of, settings) for t in tickers}
    return {"staged": staged, "published": published, "calls": source.calls}


@pytest.fixture
def files_settings(tmp_path: Path) -> Settings:
    files = tmp_path / "files"
    files.mkdir()
    return replace(
        get_settings({}),
        data_dir=tmp_path / "data",
        history_start=START,
        price_source="files",
        price_files_dir=files,
    )


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_after_an_event_the_store_equals_a_full_fetch(
    scenario: Scenario, files_settings: Settings
) -> None:
    settings, files = files_settings, files_settings.price_files_dir
    before, after = scenario.vendor(synthetic("NVDA", scenario.d1))
    neighbour = synthetic("AMD", scenario.d1)  # no event: it must not be refetched
    _serve(files, "NVDA", before, scenario.d0)
    _serve(files, "AMD", neighbour, scenario.d0)
    _day(settings, files, ["NVDA", "AMD"], scenario.d0)

    _serve(files, "NVDA", after, scenario.d1)
    _serve(files, "AMD", neighbour, scenario.d1)
    day = _day(settings, files, ["NVDA", "AMD"], scenario.d1)

    store = PriceStore(settings.data_dir)
    nvda = UNIVERSE.get("NVDA")
    published = store.load(nvda)
    fresh = FileSource(files).fetch(nvda, START, scenario.d1)
    assert max_relative_difference(fresh, published) < 1e-6
    returns = np.log(published[PRICES].to_numpy()).astype(float)
    assert np.abs(np.diff(returns, axis=0)).max() <= rules_for(nvda).max_abs_log_return
    if scenario.name.startswith("split"):
        # No fake crash: the seam's return is an ordinary day's, not the split's factor.
        assert np.abs(np.diff(np.log(published["Close"]))).max() < 0.3

    message = day["published"]["NVDA"]["revision"]
    assert message.startswith(scenario.described), message
    assert f"history re-adjusted, {len(published):,} bars" in message
    report = json.loads(store.report_path(nvda, scenario.d1).read_text())
    assert report["success"] and report["meta"]["revision"]["message"] == message
    superseded = list((settings.data_dir / "quarantine" / nvda.slug).glob("superseded-*/*.parquet"))
    assert len(superseded) == 1 and len(pd.read_parquet(superseded[0])) == len(published) - 1

    # The ticker with the event: the window, then the full history; its neighbour: the window.
    nvda_calls = [c for c in day["calls"] if c[0] == "NVDA"]
    assert [c[1] for c in nvda_calls] == [nvda_calls[0][1], START] and nvda_calls[0][1] > START
    assert [c for c in day["calls"] if c[0] == "AMD"] == [("AMD", nvda_calls[0][1], scenario.d1)]
    assert day["staged"]["AMD"].revision is None and day["staged"]["AMD"].incremental
    assert "revision" not in day["published"]["AMD"]
    amd = store.load(UNIVERSE.get("AMD"))
    assert (
        max_relative_difference(
            FileSource(files).fetch(UNIVERSE.get("AMD"), START, scenario.d1), amd
        )
        == 0
    )

    # A re-run of the date changes nothing, and still names the event.
    files_before = _digests(settings.data_dir)
    again = _day(settings, files, ["NVDA", "AMD"], scenario.d1)
    assert _digests(settings.data_dir) == files_before
    assert again["published"]["NVDA"]["revision"] == message
    assert (
        again["published"]["NVDA"]["rows_added"],
        again["published"]["NVDA"]["rows_updated"],
    ) == (0, 0)
    assert len([c for c in again["calls"] if c[0] == "NVDA"]) == 1  # no second full fetch


def test_the_event_is_the_reason_to_retrain(files_settings: Settings) -> None:
    """validate_all lists the ticker for training once, naming the event; not on a re-run."""
    settings, files = files_settings, files_settings.price_files_dir
    before, after = _split(2.0, "2024-06-24")(synthetic("NVDA", date(2024, 6, 24)))
    _serve(files, "NVDA", before, date(2024, 6, 21))
    _day(settings, files, ["NVDA"], date(2024, 6, 21))
    _serve(files, "NVDA", after, date(2024, 6, 24))
    stage_ticker(UNIVERSE.get("NVDA"), date(2024, 6, 24), settings, FileSource(files))
    first = validate_all(["NVDA"], date(2024, 6, 24), settings, check_registry=False)
    assert first["train"] == ["NVDA"]
    assert first["tickers"]["NVDA"]["train_reason"].startswith("split 2:1 on 2024-06-24")
    stage_ticker(UNIVERSE.get("NVDA"), date(2024, 6, 24), settings, FileSource(files))
    again = validate_all(["NVDA"], date(2024, 6, 24), settings, check_registry=False)
    assert again["train"] == [] and "train_reason" not in again["tickers"]["NVDA"]


class DisagreeingSource(FileSource):
    """A vendor whose full history does not match the window it served a moment before: its
    old bars come back un-adjusted while the window shows the split."""

    stale: pd.DataFrame

    def fetch(self, instrument: Instrument, start: date, end: date) -> pd.DataFrame:
        frame = super().fetch(instrument, start, end)
        if start <= START:  # the full history: the pre-split scale up to the event
            old = self.stale.loc[self.stale["Date"] < pd.Timestamp("2024-06-24")]
            frame = frame.set_index("Date")
            frame.loc[old["Date"], PRICES] = old.set_index("Date")[PRICES].to_numpy()
            frame = frame.reset_index()
        return frame


def _published_before_a_split(settings: Settings) -> tuple[pd.DataFrame, pd.DataFrame, bytes]:
    """NVDA published up to the Friday before a 2:1 split: the vendor's series before and after
    the split, and the published file's bytes."""
    before, after = _split(2.0, "2024-06-24")(synthetic("NVDA", date(2024, 6, 24)))
    _serve(settings.price_files_dir, "NVDA", before, date(2024, 6, 21))
    _day(settings, settings.price_files_dir, ["NVDA"], date(2024, 6, 21))
    path = PriceStore(settings.data_dir).history_path(UNIVERSE.get("NVDA"))
    return before, after, path.read_bytes()


def test_a_vendor_that_contradicts_itself_is_quarantined_and_nothing_changes(
    files_settings: Settings,
) -> None:
    settings, files = files_settings, files_settings.price_files_dir
    nvda, store = UNIVERSE.get("NVDA"), PriceStore(files_settings.data_dir)
    before, after, prices_before = _published_before_a_split(settings)
    _serve(files, "NVDA", after, date(2024, 6, 24))
    source = DisagreeingSource(files)
    object.__setattr__(source, "stale", before)
    staged = stage_ticker(nvda, date(2024, 6, 24), settings, source)
    assert staged.revision["inconsistent"]
    with pytest.raises(HistoryRevisionError) as excinfo:
        publish_staged(nvda, date(2024, 6, 24), settings)
    message = str(excinfo.value)
    assert message.startswith("NVDA: split 2:1 on 2024-06-24:"), message
    assert "not consistent" in message and "--full-refresh --tickers NVDA" in message
    assert store.history_path(nvda).read_bytes() == prices_before
    quarantined = store.quarantine_dir(nvda, date(2024, 6, 24))
    report = json.loads((quarantined / "validation.json").read_text())
    assert report["success"] is False and report["meta"]["revision"]["kind"] == "split"
    assert not list((settings.data_dir / "quarantine" / nvda.slug).glob("superseded-*"))


def test_a_re_adjusted_history_that_fails_its_suite_is_quarantined(
    files_settings: Settings,
) -> None:
    """The full history is validated whole: a bad bar far before the window stops the heal."""
    settings, files = files_settings, files_settings.price_files_dir
    nvda, store = UNIVERSE.get("NVDA"), PriceStore(files_settings.data_dir)
    _, after, prices_before = _published_before_a_split(settings)
    broken = after.copy()
    broken.loc[10, "High"] = broken.loc[10, "Low"] / 2  # High < Low in 2023
    _serve(files, "NVDA", broken, date(2024, 6, 24))
    stage_ticker(nvda, date(2024, 6, 24), settings, FileSource(files))
    with pytest.raises(HistoryRevisionError) as excinfo:
        publish_staged(nvda, date(2024, 6, 24), settings)
    assert "failed validation" in str(excinfo.value) and "[high_ge_low]" in str(excinfo.value)
    assert store.history_path(nvda).read_bytes() == prices_before


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    import os

    from ml.config import without_pipeline_env

    env = without_pipeline_env(os.environ)
    env.update(
        PYTHONPATH=str(REPO),
        PRICE_SOURCE="files",
        PRICE_FILES_DIR=str(settings.price_files_dir),
        DATA_DIR=str(settings.data_dir),
        HISTORY_START=START.isoformat(),
    )
    return subprocess.run(
        [sys.executable, "-m", "ml", "ingest", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_full_refresh_republishes_a_correction_older_than_the_window(
    files_settings: Settings,
) -> None:
    settings, files = files_settings, files_settings.price_files_dir
    nvda = UNIVERSE.get("NVDA")
    bars = synthetic("NVDA", date(2024, 6, 24))
    _serve(files, "NVDA", bars, date(2024, 6, 24))
    first = _cli(settings, "--date", "2024-06-24", "--tickers", "NVDA")
    assert first.returncode == 0, first.stdout + first.stderr
    fixed = bars.copy()
    fixed.loc[fixed["Date"] == pd.Timestamp("2024-02-01"), "Volume"] *= 2  # months old
    _serve(files, "NVDA", fixed, date(2024, 6, 24))

    daily = _cli(settings, "--date", "2024-06-24", "--tickers", "NVDA")
    assert daily.returncode == 0 and "revision" not in daily.stdout, daily.stdout
    store = PriceStore(settings.data_dir)
    assert max_relative_difference(fixed, store.load(nvda).drop(columns="Ticker")) > 0

    refresh = _cli(settings, "--date", "2024-06-24", "--tickers", "NVDA", "--full-refresh")
    assert refresh.returncode == 0, refresh.stdout + refresh.stderr
    assert (
        "revision: vendor correction of 1 published bar(s) from 2024-02-01: history "
        "re-adjusted" in refresh.stdout
    ), refresh.stdout
    assert max_relative_difference(fixed, store.load(nvda).drop(columns="Ticker")) == 0
    files_after = _digests(settings.data_dir)
    same = _cli(settings, "--date", "2024-06-24", "--tickers", "NVDA", "--full-refresh")
    assert same.returncode == 0 and _digests(settings.data_dir) == files_after
