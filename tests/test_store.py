"""Tests of `ml.data.store`: atomic writes, idempotent upsert, point-in-time loads, fingerprints."""

from __future__ import annotations

import hashlib
import json
from datetime import date
from pathlib import Path

import pandas as pd
import pytest

from ml.data.schema import OUTPUT_COLUMNS
from ml.data.sources import SyntheticSource
from ml.data.store import PriceStore, atomic_write, atomic_write_text, data_fingerprint
from ml.universe import Instrument

GOOGL = Instrument("GOOGL", "stock")
EURUSD = Instrument("EURUSD=X", "forex")
AS_OF = date(2024, 6, 28)
REPORT = json.dumps({"success": True})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bars(instrument: Instrument = GOOGL, start: date = date(2024, 1, 2), end: date = AS_OF):
    return SyntheticSource().fetch(instrument, start, end)


@pytest.fixture
def store(data_dir: Path) -> PriceStore:
    return PriceStore(data_dir)


# --- atomic writes -------------------------------------------------------------------------------


class WriterDied(Exception):
    pass


@pytest.mark.parametrize("error", [WriterDied, KeyboardInterrupt])
def test_atomic_write_keeps_the_old_file_when_the_writer_fails(
    tmp_path: Path, error: type[BaseException]
) -> None:
    path = tmp_path / "prices" / "GOOGL.parquet"
    atomic_write_text(path, "old content")

    def half_write(tmp: Path) -> None:
        tmp.write_text("half of the new")
        raise error("killed")

    with pytest.raises(error):
        atomic_write(path, half_write)
    assert path.read_text() == "old content"
    assert list(path.parent.iterdir()) == [path]


def test_atomic_write_replaces_the_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "folder" / "report.json"
    atomic_write_text(path, "one")
    atomic_write(path, lambda tmp: tmp.write_text("two"))
    assert path.read_text() == "two"
    assert list(path.parent.iterdir()) == [path]


# --- publish -------------------------------------------------------------------------------------


def test_a_temp_file_left_by_a_killed_writer_is_removed_by_the_next_write(
    tmp_path: Path,
) -> None:
    """A SIGKILL between mkstemp and rename leaves `.<name>.<random>.tmp`; the next write of the
    same file removes it once it is old enough to belong to no live writer."""
    import os
    import subprocess
    import sys
    import time

    from ml.data.store import STALE_TEMP_SECONDS

    target = tmp_path / "prices.parquet"
    # A real writer killed by SIGKILL while its temp file is open (never renamed).
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from ml.data.store import atomic_write\n"
            "def slow(tmp):\n    tmp.write_text('half'); print('writing', flush=True); "
            "time.sleep(60)\n"
            f"atomic_write(Path({str(target)!r}), slow)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "writing"
    child.kill()
    child.wait(timeout=30)
    [left] = list(tmp_path.glob(".prices.parquet.*.tmp"))
    assert not target.exists()

    fresh = tmp_path / ".prices.parquet.live.tmp"
    fresh.write_text("a writer still running")
    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(left, (old, old))
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert not left.exists() and fresh.exists()


def test_paths_use_the_slug_inside_the_root(store: PriceStore) -> None:
    assert store.history_path(EURUSD) == store.root / "prices" / "EURUSD_X.parquet"
    assert store.staging_path(EURUSD, AS_OF) == store.root / "staging/EURUSD_X/2024-06-28.parquet"
    assert store.quarantine_dir(EURUSD, AS_OF) == store.root / "quarantine/EURUSD_X/2024-06-28"
    assert store.report_path(EURUSD, AS_OF) == store.root / "validation/EURUSD_X/2024-06-28.json"


def test_empty_store_loads_an_empty_frame_with_the_standard_columns(store: PriceStore) -> None:
    frame = store.load(GOOGL)
    assert frame.empty and list(frame.columns) == OUTPUT_COLUMNS
    assert str(frame["Date"].dtype) == "datetime64[ns]"
    assert store.last_date(GOOGL) is None


def test_first_publish_writes_the_history(store: PriceStore) -> None:
    batch = bars()
    store.stage(GOOGL, batch, AS_OF)
    result = store.publish(GOOGL, batch, AS_OF, REPORT)
    assert (result.rows_added, result.rows_updated, result.total_rows) == (
        len(batch),
        0,
        len(batch),
    )
    assert result.last_date == AS_OF and result.changed
    pd.testing.assert_frame_equal(store.load(GOOGL), batch)
    assert store.report_path(GOOGL, AS_OF).read_text() == REPORT
    assert not store.staging_path(GOOGL, AS_OF).exists()


def test_publishing_the_same_batch_twice_changes_nothing(store: PriceStore) -> None:
    batch = bars()
    store.publish(GOOGL, batch, AS_OF, REPORT)
    path = store.history_path(GOOGL)
    digest, mtime = sha256(path), path.stat().st_mtime_ns
    report_mtime = store.report_path(GOOGL, AS_OF).stat().st_mtime_ns

    again = store.publish(GOOGL, bars(), AS_OF, REPORT)
    assert (again.rows_added, again.rows_updated, again.total_rows) == (0, 0, len(batch))
    assert not again.changed
    assert sha256(path) == digest
    assert path.stat().st_mtime_ns == mtime
    assert store.report_path(GOOGL, AS_OF).stat().st_mtime_ns == report_mtime
    assert sorted(p.name for p in path.parent.iterdir()) == ["GOOGL.parquet"]


def test_a_trailing_batch_with_new_bars_adds_only_those(store: PriceStore) -> None:
    store.publish(GOOGL, bars(end=date(2024, 6, 25)), date(2024, 6, 25), REPORT)
    trailing = bars(start=date(2024, 6, 17))
    result = store.publish(GOOGL, trailing, AS_OF, REPORT)
    assert (result.rows_added, result.rows_updated) == (3, 0)  # 26th, 27th, 28th
    pd.testing.assert_frame_equal(store.load(GOOGL), bars())


def test_a_revised_bar_counts_as_updated_and_replaces_the_value(store: PriceStore) -> None:
    store.publish(GOOGL, bars(), AS_OF, REPORT)
    revised = bars(start=date(2024, 6, 17))
    day = pd.Timestamp(2024, 6, 26)
    old_close = float(revised.loc[revised["Date"] == day, "Close"].iloc[0])
    revised.loc[revised["Date"] == day, ["Close", "Adj Close"]] = [old_close * 1.01] * 2
    before = store.load(GOOGL)

    result = store.publish(GOOGL, revised, AS_OF, REPORT)
    assert (result.rows_added, result.rows_updated, result.total_rows) == (0, 1, len(before))
    after = store.load(GOOGL)
    assert after.loc[after["Date"] == day, "Close"].iloc[0] == pytest.approx(old_close * 1.01)
    unchanged = after["Date"] != day
    pd.testing.assert_frame_equal(after[unchanged], before[unchanged])


def test_the_history_stays_sorted_when_an_older_batch_arrives_late(store: PriceStore) -> None:
    store.publish(GOOGL, bars(start=date(2024, 4, 1)), AS_OF, REPORT)
    result = store.publish(GOOGL, bars(end=date(2024, 4, 5)), date(2024, 4, 5), REPORT)
    assert result.rows_added == len(bars(end=date(2024, 3, 31)))
    loaded = store.load(GOOGL)
    assert loaded["Date"].is_monotonic_increasing and loaded["Date"].is_unique
    pd.testing.assert_frame_equal(loaded, bars())


def test_quarantine_moves_the_staged_batch_with_its_report(store: PriceStore) -> None:
    batch = bars()
    store.stage(GOOGL, batch, AS_OF)
    target = store.quarantine(GOOGL, AS_OF, json.dumps({"success": False}))
    assert target == store.quarantine_dir(GOOGL, AS_OF)
    pd.testing.assert_frame_equal(pd.read_parquet(target / "batch.parquet"), batch)
    assert json.loads((target / "validation.json").read_text()) == {"success": False}
    assert not store.staging_path(GOOGL, AS_OF).exists()
    assert not store.history_path(GOOGL).exists()


# --- point in time -------------------------------------------------------------------------------


def test_load_until_returns_no_bar_after_the_date(store: PriceStore) -> None:
    store.publish(GOOGL, bars(), AS_OF, REPORT)
    until = date(2024, 3, 15)
    frame = store.load(GOOGL, until=until)
    assert frame["Date"].max() == pd.Timestamp(until)
    assert (frame["Date"] <= pd.Timestamp(until)).all()
    pd.testing.assert_frame_equal(frame, bars(end=until))
    # A weekend date: the Friday is the last bar.
    assert store.load(GOOGL, until=date(2024, 3, 17))["Date"].max() == pd.Timestamp(until)
    assert store.load(GOOGL, until=date(2023, 12, 31)).empty


# --- fingerprints --------------------------------------------------------------------------------


def test_data_fingerprint_is_equal_for_equal_data_and_changes_with_one_value(
    store: PriceStore,
) -> None:
    batch = bars()
    store.publish(GOOGL, batch, AS_OF, REPORT)
    fp = data_fingerprint(batch)
    assert fp == data_fingerprint(bars())
    assert fp == data_fingerprint(store.load(GOOGL))
    assert fp == data_fingerprint(batch.set_index(batch.index + 100))

    for col, row in (("Close", 10), ("Volume", 0), ("High", -1)):
        changed = batch.copy()
        changed.loc[changed.index[row], col] *= 1.000001
        assert data_fingerprint(changed) != fp, col
    shifted = batch.copy()
    shifted.loc[shifted.index[-1], "Date"] = pd.Timestamp(2024, 7, 1)
    assert data_fingerprint(shifted) != fp
    assert data_fingerprint(batch.iloc[:-1]) != fp
