"""Corrupt files (issue 11, item 5): a clear error naming the file and the way out.

The corruptions, written over a real file of the store: `garbage` (the file replaced by bytes
that are not the format at all), `truncated` (the first half of the file: a copy or a write cut
short), `garbled` (one price's 8 bytes inside the Close column's page overwritten: a bad sector,
a partial overwrite; the file keeps its head and its footer). Garbled Parquet is the dangerous
one: in a sweep of 64-byte overwrites over a published price file, pyarrow read about a third of
the results without any error and returned other values. The store now writes a CRC32 per
Parquet page and verifies it on every read (`ml.data.store._write_parquet`, `_read_parquet`). The
footer (schema, offsets, statistics) has no checksum: a garbled footer mostly fails to parse, and
one that parses still points at checksummed pages.

Scenarios (fault, injection, what must hold):

1. A corrupt staged batch (a fetched batch waiting in `staging/<slug>/<date>.parquet`).
   Injection: the staged file of one of two tickers is corrupted between `ingest_all` and
   `validate_all` (the DAG's two tasks). Must hold: that ticker fails validation with an error
   naming the file and the way out (run ingest for the date again); the file is quarantined like
   a batch that failed its suite (`quarantine/<slug>/<date>/batch.parquet` and a
   `validation.json` saying why), so a retry of the validate task says so again and the next
   ingest stages a fresh batch; nothing is published for it; the other ticker publishes. Why
   quarantine rather than an error that leaves the file: a staged file is only a fetched batch,
   re-fetching it is the only cure and the next ingest does that anyway; quarantining keeps the
   evidence where failed batches already go, and a retry does not read the same garbage again.

2. A corrupt published price file (`prices/<slug>.parquet`). Already covered in process:
   `tests/test_ingest.py::test_a_corrupt_price_file_is_quarantined_and_the_history_refetched`
   (load raises CorruptPriceFile naming the file, moves it to `quarantine/<slug>/corrupt-<stamp>/`
   and the same ingest fetches the full history). Here end to end: `python -m ml ingest` in a
   child process on the corrupted store. Must hold: exit status 0 (the run recovers by itself),
   a warning naming the file and where it was moved, the ticker fetched as "full history" in the
   same run, and the published prices byte-identical to those of a store that was never
   corrupted. A variant: the file turns corrupt after the trailing window was staged (detected
   by the validate task); the staged window must go to quarantine with it, else a retry of the
   validate task publishes those ten bars as the whole history (it did, before this suite).

3. A corrupt ledger database (`DATA_DIR/ledger.db`, SQLite). Injection: the file is corrupted,
   then `python -m ml forecast` runs in a child process (with a real MLflow server). Must hold:
   the step fails with CorruptLedger naming the file and the way out (restore it from a backup,
   or move it aside); the file is not recreated or touched, nor is any other file of the store.
   The ledger is the store of record of the forecasts, so it is never recreated silently. The
   forecasts CSV is an export and stays one: nothing reads it back into a ledger (the message
   says so). Moving the file aside is then shown to work. Not detected: a ledger truncated to 0
   bytes, which SQLite takes for a new, empty database.

4. A corrupt forecasts export (`forecasts/forecasts.csv`) and a corrupt universe file. The export:
   `read_forecasts` and `upsert_forecasts` raise CorruptForecastsFile naming it, pointing at the
   ledger, and never write over it; `python -m ml export` keeps it aside (`.corrupt-<time>`) and
   writes the export again from the ledger, byte-identical to the one the steps wrote. The
   universe: `python -m ml ingest` exits 2 with `error: <file>: ...` and writes nothing. A file
   cut exactly at a line end (fewer rows or tickers) cannot be told from a shorter file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from datetime import date
from pathlib import Path

import pytest

from ml.config import Settings, get_settings
from ml.data.store import PriceStore
from ml.steps.data import ingest_all, validate_all
from ml.universe import load_universe
from tests.conftest import names_read_by_settings

REPO = Path(__file__).resolve().parents[2]
UNIVERSE = load_universe(REPO / "universe.csv")
TICKERS = ["GOOGL", "EURUSD=X"]
GOOGL = UNIVERSE.get("GOOGL")
D1 = date(2024, 6, 27)  # a Thursday
D2 = date(2024, 6, 28)
HISTORY_START = date(2023, 1, 2)


def garbage(good: bytes) -> bytes:
    return (b"\xff\xfe\x00 this is not what the file held " * (len(good) // 36 + 1))[: len(good)]


def truncated(good: bytes) -> bytes:
    return good[: len(good) // 2]


def garbled(good: bytes) -> bytes:
    """8 bytes (one price) in the middle of the Close column's dictionary page overwritten; the
    footer that says where the pages are stays intact. Without page checksums pyarrow reads the
    staged batch garbled this way without an error, with two other Close prices."""
    import io

    import pyarrow.parquet as pq

    group = pq.ParquetFile(io.BytesIO(good)).metadata.row_group(0)
    columns = (group.column(i) for i in range(group.num_columns))
    close = next(c for c in columns if c.path_in_schema == "Close")
    start = close.dictionary_page_offset
    middle = start + (close.data_page_offset - start) // 2 - 4
    return good[:middle] + b"\xaa" * 8 + good[middle + 8 :]


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "garbage": garbage,
    "truncated": truncated,
    "garbled": garbled,
}


def corrupt(path: Path, how: str) -> bytes:
    bad = CORRUPTIONS[how](path.read_bytes())
    path.write_bytes(bad)
    return bad


def digests(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under `root`."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def cli(data_dir: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
    """`python -m ml ...` in a child on `data_dir`, synthetic bars, no developer settings."""
    env = {k: v for k, v in os.environ.items() if k not in names_read_by_settings()}
    env.pop("ML_FAULT_KILL_AT", None)
    env.update(
        PYTHONPATH=str(REPO),
        PRICE_SOURCE="synthetic",
        DATA_DIR=str(data_dir),
        HISTORY_START=HISTORY_START.isoformat(),
        MLFLOW_DISABLE_TELEMETRY="true",
        TF_CPP_MIN_LOG_LEVEL="2",
        **extra,
    )
    return subprocess.run(
        [sys.executable, "-m", "ml", *args],
        cwd=data_dir.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def store_settings(data_dir: Path) -> Settings:
    return replace(get_settings({}), data_dir=data_dir, history_start=HISTORY_START)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[date, Path]:
    """Stores never corrupted: after `ingest` of D1, and of D1 then D2 (the CLI, two tickers)."""
    root = tmp_path_factory.mktemp("clean")
    day1 = root / "d1" / "data"
    day1.parent.mkdir()
    proc = cli(day1, "ingest", "--date", D1.isoformat(), "--tickers", *TICKERS)
    assert proc.returncode == 0, explain(proc)
    day2 = root / "d2" / "data"
    shutil.copytree(day1, day2)
    proc = cli(day2, "ingest", "--date", D2.isoformat(), "--tickers", *TICKERS)
    assert proc.returncode == 0, explain(proc)
    return {D1: day1, D2: day2}


def store_of_day1(clean: dict[date, Path], tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(clean[D1], data)
    return data


# --- 1. a corrupt staged batch -------------------------------------------------------------------


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_a_corrupt_staged_batch_is_quarantined_and_the_other_ticker_publishes(
    clean: dict[date, Path], tmp_path: Path, how: str
) -> None:
    settings = store_settings(store_of_day1(clean, tmp_path))
    store = PriceStore(settings.data_dir)
    staged = ingest_all(TICKERS, D2, settings)
    assert sorted(staged["staged"]) == sorted(TICKERS), staged
    path = store.staging_path(GOOGL, D2)
    history = store.history_path(GOOGL).read_bytes()
    bad = corrupt(path, how)

    result = validate_all(TICKERS, D2, settings, check_registry=False)
    error = result["failed"].get("GOOGL")
    assert error, f"validation did not fail on GOOGL's {how} staged batch: {result}"
    assert error.startswith("CorruptStagedFile: GOOGL: the staged batch"), error
    assert str(path) in error, f"the error does not name the file: {error}"
    assert f"Run ingest for {D2} again" in error, f"the error gives no way out: {error}"
    assert "EURUSD=X" not in result["failed"], f"the other ticker failed too: {result['failed']}"
    assert result["tickers"]["EURUSD=X"]["rows_added"] == 1, result["tickers"]
    assert store.history_path(GOOGL).read_bytes() == history, "GOOGL's history changed"
    assert not store.report_path(GOOGL, D2).exists(), "a validation report was written"

    quarantined = store.quarantine_dir(GOOGL, D2)
    assert not path.exists(), "the corrupt staged batch is still in staging"
    assert (quarantined / "batch.parquet").read_bytes() == bad, "not quarantined as it was"
    report = json.loads((quarantined / "validation.json").read_text())
    assert report["success"] is False and report["meta"]["unreadable"] == str(path), report

    retry = validate_all(["GOOGL"], D2, settings, check_registry=False)
    assert "quarantined" in retry["failed"].get("GOOGL", ""), f"a retry of validate: {retry}"

    again = validate_all(
        ingest_all(["GOOGL"], D2, settings)["staged"], D2, settings, check_registry=False
    )
    assert not again["failed"] and again["tickers"]["GOOGL"]["rows_added"] == 1, again
    for ticker in TICKERS:
        name = Path("prices") / f"{UNIVERSE.get(ticker).slug}.parquet"
        assert (settings.data_dir / name).read_bytes() == (clean[D2] / name).read_bytes(), (
            f"{name} differs from the never-corrupted store's after the ingest that re-staged"
        )


# --- 2. a corrupt published price file -----------------------------------------------------------


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_ingest_on_a_corrupt_price_file_quarantines_it_and_refetches_the_history(
    clean: dict[date, Path], tmp_path: Path, how: str
) -> None:
    data = store_of_day1(clean, tmp_path)
    path = data / "prices" / f"{GOOGL.slug}.parquet"
    bad = corrupt(path, how)

    proc = cli(data, "ingest", "--date", D2.isoformat(), "--tickers", *TICKERS)
    assert proc.returncode == 0, f"ingest did not recover from a {how} price file:\n{explain(proc)}"
    [moved] = list((data / "quarantine" / GOOGL.slug).glob("corrupt-*/GOOGL.parquet"))
    assert moved.read_bytes() == bad, "the quarantined file is not the corrupt file as it was"
    warning = f"GOOGL: the published price file {path} is unreadable"
    assert warning in proc.stderr, f"no warning naming the file:\n{explain(proc)}"
    assert f"it was moved to {moved}" in proc.stderr, f"the warning does not say where:\n{proc}"
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    assert "(full history, synthetic)" in lines["GOOGL"], f"not refetched:\n{explain(proc)}"
    assert "(incremental, synthetic)" in lines["EURUSD=X"], explain(proc)

    for name in sorted(p.name for p in (clean[D2] / "prices").iterdir()):
        assert (data / "prices" / name).read_bytes() == (
            clean[D2] / "prices" / name
        ).read_bytes(), f"prices/{name} differs from the never-corrupted store's"
    assert not list((data / "staging").rglob("*.parquet")), "a staged batch was left"


def test_a_price_file_corrupted_after_staging_takes_the_staged_window_to_quarantine(
    clean: dict[date, Path], tmp_path: Path
) -> None:
    """The trailing window staged over a history that then turns out corrupt must not be
    published as the whole history by a retry of the validate task."""
    settings = store_settings(store_of_day1(clean, tmp_path))
    store = PriceStore(settings.data_dir)
    staged = ingest_all(["GOOGL"], D2, settings)
    assert staged["staged"]["GOOGL"]["incremental"] is True, staged
    path = store.history_path(GOOGL)
    corrupt(path, "garbled")

    first = validate_all(["GOOGL"], D2, settings, check_registry=False)
    error = first["failed"].get("GOOGL", "")
    assert error.startswith("CorruptPriceFile:") and str(path) in error, first
    [window] = list((store.root / "quarantine" / GOOGL.slug).glob("corrupt-*/staging/*.parquet"))
    assert window.name == f"{D2}.parquet", window
    assert not store.staging_path(GOOGL, D2).exists(), "the staged window stayed in staging"

    retry = validate_all(["GOOGL"], D2, settings, check_registry=False)
    assert "run ingest first" in retry["failed"].get("GOOGL", ""), retry
    assert not path.exists(), (
        f"a retry of validate published {store.load(GOOGL).shape[0]} bars as the whole history"
    )

    proc = cli(settings.data_dir, "ingest", "--date", D2.isoformat(), "--tickers", "GOOGL")
    assert proc.returncode == 0 and "(full history, synthetic)" in proc.stdout, explain(proc)
    name = Path("prices") / f"{GOOGL.slug}.parquet"
    assert (settings.data_dir / name).read_bytes() == (clean[D2] / name).read_bytes(), (
        f"{name} differs from the never-corrupted store's after the full refetch"
    )


# --- 3. a corrupt ledger -------------------------------------------------------------------------


# Made-up tickers for the ledger's forecasts: no test registers a model for them on the shared
# MLflow server, so the forecast after the way out finds no champion and writes no forecast.
LEDGER_TICKERS = ["ZLEDGERA", "ZLEDGERB"]


def forecast_row(ticker: str, day: date) -> dict:
    return {
        "ticker": ticker,
        "logical_date": day.isoformat(),
        "last_bar_date": day.isoformat(),
        "last_close": 100.0,
        "pred_high": 101.0,
        "pred_low": 99.0,
        "pred_close": 100.5,
        "pred_adj_close": 100.0,
        "model_name": f"price-forecast-{ticker}",
        "model_version": "1",
        "source": "synthetic",
    }


def garbled_page(good: bytes) -> bytes:
    """Page 2 of the SQLite file (4 kB pages) overwritten: the header still says SQLite."""
    return good[:4096] + b"\xaa" * 4096 + good[8192:]


@pytest.mark.parametrize("how", ["garbage", "truncated", "garbled-page"])
def test_forecast_on_a_corrupt_ledger_fails_naming_it_and_changes_nothing(
    clean: dict[date, Path], tmp_path: Path, mlflow_server, how: str
) -> None:
    from ml.forecasts.export import upsert_forecasts
    from ml.forecasts.ledger import record_forecasts

    settings = store_settings(store_of_day1(clean, tmp_path))
    universe = tmp_path / "universe.csv"
    universe.write_text(
        "ticker,asset_class,name\n" + "".join(f"{t},stock,{t}\n" for t in LEDGER_TICKERS)
    )
    rows = [forecast_row(t, date(2024, 6, day)) for t in LEDGER_TICKERS for day in range(3, 27)]
    record_forecasts(settings, rows)
    upsert_forecasts(settings, rows)
    ledger = settings.data_dir / "ledger.db"
    assert ledger.stat().st_size > 8192
    if how == "garbled-page":
        ledger.write_bytes(garbled_page(ledger.read_bytes()))
    else:
        corrupt(ledger, how)
    before = digests(settings.data_dir)

    env = {"MLFLOW_TRACKING_URI": mlflow_server.uri, "UNIVERSE_FILE": str(universe)}
    forecast = ("forecast", "--date", D1.isoformat())
    proc = cli(settings.data_dir, *forecast, **env)
    assert proc.returncode == 1, f"forecast ran on a {how} ledger:\n{explain(proc)}"
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the forecast ledger {ledger} is not"), last
    for way_out in ("restore it from a backup", f"mv {ledger} {ledger}.corrupt", "not a backup"):
        assert way_out in last, f"the error lacks {way_out!r}: {last}"
    assert digests(settings.data_dir) == before, "a file of the store changed or appeared"

    ledger.rename(ledger.with_name("ledger.db.corrupt"))  # the way out the message offers
    proc = cli(settings.data_dir, *forecast, **env)
    assert proc.returncode == 0, f"forecast after moving the ledger aside:\n{explain(proc)}"
    assert proc.stdout.count("no champion yet") == len(LEDGER_TICKERS), explain(proc)
    assert ledger.is_file(), "no new ledger"
    after = digests(settings.data_dir)
    assert after["ledger.db.corrupt"][0] == before["ledger.db"][0]
    assert after["forecasts/forecasts.csv"] == before["forecasts/forecasts.csv"]


# --- 4. a corrupt forecasts export and a corrupt universe file -----------------------------------

CSV_CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "garbage": garbage,
    "truncated": lambda good: good[: good.rindex(b",")],  # the last row cut short
    "not-a-number": lambda good: good.replace(b"100.500000", b"1OO.5", 1),
    "no-header": lambda good: good[good.index(b"\n") + 1 :],
}


@pytest.mark.parametrize("how", list(CSV_CORRUPTIONS))
def test_a_corrupt_forecasts_export_is_named_never_written_over_and_rebuilt_from_the_ledger(
    settings: Settings, how: str
) -> None:
    from ml.forecasts.export import (
        CorruptForecastsFile,
        forecasts_path,
        read_forecasts,
        upsert_forecasts,
    )
    from ml.forecasts.ledger import record_forecasts

    rows = [forecast_row(t, day) for t in TICKERS for day in (D1, D2)]
    record_forecasts(settings, rows)  # the store of record, as the forecast step writes it
    upsert_forecasts(settings, rows)
    path = forecasts_path(settings)
    good = path.read_bytes()
    bad = CSV_CORRUPTIONS[how](good)
    path.write_bytes(bad)

    for attempt in (lambda: read_forecasts(settings), lambda: upsert_forecasts(settings, [])):
        with pytest.raises(CorruptForecastsFile) as excinfo:
            attempt()
        message = str(excinfo.value)
        assert message.startswith(f"the forecasts export {path} is not a readable"), message
        assert str(settings.data_dir / "ledger.db") in message, message
        assert "python -m ml export" in message, message
    assert path.read_bytes() == bad, "the corrupt export was written over"
    assert not list(path.parent.glob(".forecasts.csv.*.tmp")), "a temp file was left"

    proc = cli(settings.data_dir, "export")  # the way out the message offers
    assert proc.returncode == 0, explain(proc)
    (moved,) = path.parent.glob("forecasts.csv.corrupt-*")
    assert moved.read_bytes() == bad, "the unreadable export was not kept aside"
    assert f"moved to {moved}" in proc.stdout and f"{len(rows)} forecasts" in proc.stdout
    assert path.read_bytes() == good, "the rebuilt export differs from the one the steps wrote"


UNIVERSE_CORRUPTIONS = {
    "garbage": (b"\x89PNG\r\n\x1a\n\xff\xfe" * 40, "not a readable universe file"),
    "text-garbage": (b"lorem ipsum\ndolor sit amet\n", "missing column(s) asset_class, ticker"),
    "truncated": (b"ticker,asset_class,name\nGOOGL,stock,Alphabet\nAMD,st", "line 3"),
}


@pytest.mark.parametrize("how", list(UNIVERSE_CORRUPTIONS))
def test_a_corrupt_universe_file_is_named_and_nothing_is_written(tmp_path: Path, how: str) -> None:
    content, says = UNIVERSE_CORRUPTIONS[how]
    universe = tmp_path / "universe.csv"
    universe.write_bytes(content)
    data = tmp_path / "data"
    proc = cli(data, "ingest", "--date", D1.isoformat(), UNIVERSE_FILE=str(universe))
    assert proc.returncode == 2, explain(proc)
    assert proc.stderr.startswith(f"error: {universe}"), f"the file is not named:\n{proc.stderr}"
    assert says in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not data.exists(), "the store was written although the universe was unreadable"
