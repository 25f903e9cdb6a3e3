"""Disk full during a write (issue 11, item 6): the old file stays intact.

Fault: a write of the store fails part-way because no more bytes can be written.

Injection: a child process (`python -c`, calling `child_main` below, which runs the real code:
`PriceStore.publish`, `ml.forecasts.export.upsert_forecasts`, `ml.forecasts.ledger.record_forecasts`) ignores
SIGXFSZ and sets `resource.setrlimit(RLIMIT_FSIZE, (N, N))` with N above the old file's size and
below the new file's, right before the write. The kernel then fails the write() that would pass N
bytes with EFBIG ("File too large") instead of killing the process with SIGXFSZ.

What that simulates, and what it does not: a write that runs out of room part-way, after the
temp file was created and partly written. A real full disk differs: it fails with ENOSPC, for
every process writing to that file system, and can fail later than write() (at fsync, with
delayed allocation) or earlier (creating the temp file); RLIMIT_FSIZE fails only this process's
writes past N bytes, and only at write(). The store's writes all go to a temp file that is
renamed into place only once written and fsynced (`ml.data.store.atomic_write`), so any of these
failures leaves the old file; this suite checks the write() one. SQLite maps EFBIG to
SQLITE_IOERR_WRITE ("disk I/O error") and ENOSPC to SQLITE_FULL ("database or disk is full");
`ml.forecasts.ledger` reports either as `LedgerWriteError` (an OSError) naming the file. Only the SQLite
ledger is covered (the default; PostgreSQL's disk is the server's).

What must hold, per file: the child fails with that error (OSError errno EFBIG for the Parquet
and CSV writes), the old file is byte-identical, no temp file (`.<name>.*.tmp`, or SQLite's
`-journal`) is left beside it, and the same write in a child without the limit succeeds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import pandas as pd

from ml.config import Settings, get_settings
from ml.universe import load_universe

REPO = Path(__file__).resolve().parents[2]
INSTRUMENT = load_universe(REPO / "universe.csv").get("GOOGL")
AS_OF = date(2024, 6, 28)
BIG_START = date(2015, 1, 2)  # about 2,470 bars: a Parquet file of ~150 kB
RESULT = "RESULT "  # the child's last line: RESULT {json}


def child_main(argv: list[str]) -> None:
    """In the child: `kind data_dir limit input`; run the write of `kind` with the file size
    limited to `limit` bytes (0: no limit) and print RESULT {"ok": ...} or {"error": ...}."""
    import resource
    import signal

    kind, data_dir, limit, source = argv[0], Path(argv[1]), int(argv[2]), Path(argv[3])
    settings = replace(get_settings({}), data_dir=data_dir)
    if kind == "publish":
        from ml.data.store import PriceStore

        batch = pd.read_parquet(source)

        def write() -> None:
            PriceStore(data_dir).publish(INSTRUMENT, batch, AS_OF, '{"success": true}')

    elif kind == "forecasts":
        from ml.forecasts.export import upsert_forecasts

        rows = json.loads(source.read_text())

        def write() -> None:
            upsert_forecasts(settings, rows)

    else:
        from ml.forecasts.ledger import record_forecasts

        rows = json.loads(source.read_text())

        def write() -> None:
            record_forecasts(settings, rows)

    if limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death by SIGXFSZ
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        write()
    except Exception as exc:
        error = {"type": type(exc).__name__, "errno": getattr(exc, "errno", None)}
        print(RESULT + json.dumps({**error, "message": str(exc)}), flush=True)
        raise SystemExit(3) from None
    print(RESULT + json.dumps({"ok": True}), flush=True)


def run_child(kind: str, data_dir: Path, limit: int, source: Path) -> tuple[int, dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "LEDGER_DB_URL")}
    env["PYTHONPATH"] = str(REPO)
    code = (
        "import sys; from tests.faults.test_disk_full import child_main; child_main(sys.argv[1:])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, kind, str(data_dir), str(limit), str(source)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    assert lines, f"the child printed no result (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc.returncode, json.loads(lines[-1][len(RESULT) :])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(path: Path) -> list[str]:
    """Temp files of `path` (atomic_write's `.<name>.*.tmp`) and SQLite's journal beside it."""
    found = list(path.parent.glob(f".{path.name}.*.tmp"))
    found += [p for p in path.parent.glob(f"{path.name}-*") if p.suffix != ".corrupt"]
    return sorted(p.name for p in found)


def assert_failed_with_efbig(status: int, result: dict[str, Any], what: str) -> None:
    assert status == 3, f"{what}: the write under RLIMIT_FSIZE did not fail: {result}"
    assert result["errno"] == errno.EFBIG, (
        f"{what}: expected OSError EFBIG (File too large), got {result}"
    )
    assert "File too large" in result["message"], result


def forecast_rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    days = pd.bdate_range("2015-01-02", periods=start + n)[start:]
    return [
        {
            "ticker": "GOOGL",
            "logical_date": day.date().isoformat(),
            "last_bar_date": day.date().isoformat(),
            "last_close": 100.0 + i,
            "pred_high": 101.0 + i,
            "pred_low": 99.0 + i,
            "pred_close": 100.5 + i,
            "pred_adj_close": 100.0 + i,
            "model_name": "price-forecast-GOOGL",
            "model_version": "1",
            "source": "synthetic",
        }
        for i, day in enumerate(days)
    ]


def test_publishing_a_history_bigger_than_the_room_left_keeps_the_old_file(
    settings: Settings, tmp_path: Path
) -> None:
    """`PriceStore.publish` of a batch whose merged history (the published Parquet file) does
    not fit: the old history file is left as it was."""
    from ml.data.sources import SyntheticSource
    from ml.data.store import PriceStore

    store = PriceStore(settings.data_dir)
    bars = SyntheticSource().fetch(INSTRUMENT, BIG_START, AS_OF)
    store.publish(INSTRUMENT, bars.tail(20), AS_OF, '{"success": true}')
    path = store.history_path(INSTRUMENT)
    old = sha(path)
    old_size = path.stat().st_size
    batch = tmp_path / "batch.parquet"  # outside the store: the child only reads it
    bars.to_parquet(batch, index=False)
    limit = old_size * 4

    status, result = run_child("publish", settings.data_dir, limit, batch)
    assert_failed_with_efbig(status, result, "publish")
    assert sha(path) == old, "the published history changed although its new version did not fit"
    assert leftovers(path) == [], f"temp files left beside {path}: {leftovers(path)}"
    pd.testing.assert_frame_equal(store.load(INSTRUMENT), bars.tail(20).reset_index(drop=True))

    status, result = run_child("publish", settings.data_dir, 0, batch)
    assert (status, result) == (0, {"ok": True}), f"the write without the limit failed: {result}"
    assert path.stat().st_size > limit, "the limit was not below the new file's size"
    assert len(store.load(INSTRUMENT)) == len(bars)
    assert leftovers(path) == []


def test_a_forecasts_export_bigger_than_the_room_left_keeps_the_old_file(
    settings: Settings, tmp_path: Path
) -> None:
    """`upsert_forecasts` rewriting the forecasts CSV with many more rows than fit."""
    from ml.forecasts.export import forecasts_path, read_forecasts, upsert_forecasts

    upsert_forecasts(settings, forecast_rows(3))
    path = forecasts_path(settings)
    old, limit = sha(path), path.stat().st_size * 4
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps(forecast_rows(3000, start=3)))

    status, result = run_child("forecasts", settings.data_dir, limit, rows)
    assert_failed_with_efbig(status, result, "upsert_forecasts")
    assert sha(path) == old, "the forecasts export changed although its new version did not fit"
    assert leftovers(path) == [], f"temp files left beside {path}: {leftovers(path)}"
    assert len(read_forecasts(settings)) == 3

    status, result = run_child("forecasts", settings.data_dir, 0, rows)
    assert (status, result) == (0, {"ok": True}), f"the write without the limit failed: {result}"
    assert path.stat().st_size > limit, "the limit was not below the new file's size"
    assert len(read_forecasts(settings)) == 3003
    assert leftovers(path) == []


def test_a_ledger_transaction_bigger_than_the_room_left_rolls_back(
    settings: Settings, tmp_path: Path
) -> None:
    """`record_forecasts` (one SQLite transaction) growing the ledger past the limit: SQLite
    rolls the transaction back from its journal and `ml.forecasts.ledger` says what happened."""
    from ml.forecasts.ledger import read_table, record_forecasts

    record_forecasts(settings, forecast_rows(3))
    path = settings.data_dir / "ledger.db"
    old, old_size = sha(path), path.stat().st_size
    limit = old_size + 16 * 1024  # room for the journal of a few pages, not for 3000 rows
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps(forecast_rows(3000, start=3)))

    status, result = run_child("ledger", settings.data_dir, limit, rows)
    assert status == 3, f"record_forecasts under RLIMIT_FSIZE did not fail: {result}"
    assert result["type"] == "LedgerWriteError", result
    assert str(path) in result["message"] and "not committed" in result["message"], result
    assert "SQLITE_IOERR" in result["message"] or "SQLITE_FULL" in result["message"], result
    assert sha(path) == old, "the ledger file changed although the transaction failed"
    assert leftovers(path) == [], f"files left beside {path}: {leftovers(path)}"
    assert len(read_table(settings, "forecasts")) == 3

    status, result = run_child("ledger", settings.data_dir, 0, rows)
    assert (status, result) == (0, {"ok": True}), f"the write without the limit failed: {result}"
    assert path.stat().st_size > limit, "the limit was not below the new file's size"
    assert len(read_table(settings, "forecasts")) == 3003
    assert leftovers(path) == []
