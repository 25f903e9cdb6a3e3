"""The price store: per-ticker published history under `DATA_DIR`, staging and quarantine.

Layout (all names are ticker slugs, never raw input):

    prices/<slug>.parquet                 published history, only validated bars
    staging/<slug>/<as_of>.parquet        a fetched batch waiting for validation
    quarantine/<slug>/<as_of>/            a batch that failed: batch.parquet + validation.json
    quarantine/<slug>/superseded-<as_of>-<fingerprint>/
                                          a published history replaced by a re-adjusted one
    validation/<slug>/<as_of>.json        the report of a batch that passed

Every write goes to a temp file in the same folder and is renamed into place, so a killed process
leaves either the old file or the new one. Publishing is an upsert by date under a per-ticker lock;
a batch that changes nothing writes nothing, so re-ingesting a date leaves files byte-identical.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

from ml.data.schema import OUTPUT_COLUMNS, PRICE_COLUMNS, empty_prices
from ml.universe import Instrument

if TYPE_CHECKING:
    import pandas as pd


# A temp file of an atomic write is named `.<name>.<host>.<pid>.<random>.tmp`. The next write of
# the same file removes the temp files of writers that are gone: on this host, a pid that no longer
# runs (SIGKILL, OOM); from another host sharing the folder, only after this many seconds (a live
# writer renames its file within seconds).
STALE_TEMP_SECONDS = 3600.0
_HOST = socket.gethostname().replace(".", "_")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (as any user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs, as another user
        return True
    return True


def _remove_stale_temps(path: Path) -> None:
    import time

    now = time.time()
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        parts = stale.name[len(path.name) + 2 : -len(".tmp")].split(".")
        try:
            if len(parts) == 3 and parts[0] == _HOST and parts[1].isdigit():
                gone = int(parts[1]) != os.getpid() and not pid_alive(int(parts[1]))
            else:
                gone = now - stale.stat().st_mtime > STALE_TEMP_SECONDS
            if gone:
                stale.unlink()
        except FileNotFoundError:
            pass


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temp file beside `path`, fsync it, rename it onto `path` and fsync
    the folder, so the rename itself survives a crash. Temp files of `path` left by a writer that
    was killed (SIGKILL, OOM) are removed first; a write that fails (disk full) removes its own."""
    from ml.faults import checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp", dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        checkpoint(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    """Write `frame` atomically, with a CRC32 per Parquet page: `_read_parquet` then refuses a
    file garbled inside (a bad sector, a partial overwrite) instead of reading wrong prices."""
    atomic_write(
        path,
        lambda tmp: frame.to_parquet(tmp, index=False, engine="pyarrow", write_page_checksum=True),
    )


def _read_parquet(path: Path) -> pd.DataFrame:
    """Read a store Parquet file, verifying its page checksums (files written before they
    existed have none, and read as before)."""
    import pandas as pd

    return pd.read_parquet(path, engine="pyarrow", page_checksum_verification=True)


def data_fingerprint(frame: pd.DataFrame) -> str:
    """A stable hash of the bars (dates and values): equal data give equal fingerprints."""
    import pandas as pd

    values = frame[PRICE_COLUMNS].copy()
    values["Date"] = values["Date"].dt.strftime("%Y-%m-%d")
    digest = hashlib.sha256(pd.util.hash_pandas_object(values, index=False).to_numpy().tobytes())
    return digest.hexdigest()[:16]


def count_changes(history: pd.DataFrame, batch: pd.DataFrame) -> tuple[int, int]:
    """(rows added, rows updated) if `batch` were upserted into `history` by date; NaN == NaN.

    Rows added are the batch's rows beyond the published dates it matches, so a batch that
    repeats a published date twice adds one (and is never taken for "nothing new": the suite
    then refuses the duplicate). In numpy: a no-new-data day calls this twice per ticker.
    """
    import numpy as np
    import pandas as pd

    where = pd.Index(history["Date"]).get_indexer(batch["Date"])  # -1: not published
    found = where >= 0
    columns = list(PRICE_COLUMNS[1:])
    old = history[columns].to_numpy(dtype="float64")[where[found]]
    new = batch[columns].to_numpy(dtype="float64")[found]
    changed = ~((old == new) | (np.isnan(old) & np.isnan(new)))
    return len(batch) - len(np.unique(where[found])), int(changed.any(axis=1).sum())


class CorruptFile(RuntimeError):
    """A file of the store (prices, staging, ledger, forecasts export) could not be read. The
    message names the file and the way out; `path` is the file, `moved_to` where it went (None
    when it was left in place)."""

    def __init__(self, message: str, path: Path, moved_to: Path | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.moved_to = moved_to


class CorruptPriceFile(CorruptFile):
    """A published price file could not be read; it has been moved to quarantine."""


class CorruptStagedFile(CorruptFile):
    """A staged batch could not be read; it has been quarantined like a batch that failed its
    validation, so the next ingest of the date fetches and stages it again."""


# Errors reading a file that say nothing about its content: raised as they are, never quarantined
# (not readable by this user, too big for this process).
_NOT_CORRUPT = (PermissionError, MemoryError)


def _describe(exc: BaseException) -> str:
    """`Type: message` on one line (pyarrow's messages can span several)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


@dataclass(frozen=True)
class PublishResult:
    rows_added: int
    rows_updated: int
    total_rows: int
    last_date: date | None
    # The whole published history after the upsert, so the caller need not read it back.
    history: pd.DataFrame | None = field(default=None, repr=False, compare=False)
    # Where a replaced history file was kept (`replace_locked`), None when nothing was replaced.
    superseded: Path | None = None

    @property
    def changed(self) -> bool:
        return bool(self.rows_added or self.rows_updated)


@dataclass(frozen=True)
class PriceStore:
    root: Path

    def _dir(self, kind: str, instrument: Instrument) -> Path:
        return self.root / kind / instrument.slug

    def history_path(self, instrument: Instrument) -> Path:
        return self.root / "prices" / f"{instrument.slug}.parquet"

    def staging_path(self, instrument: Instrument, as_of: date) -> Path:
        return self._dir("staging", instrument) / f"{as_of.isoformat()}.parquet"

    def quarantine_dir(self, instrument: Instrument, as_of: date) -> Path:
        return self._dir("quarantine", instrument) / as_of.isoformat()

    def report_path(self, instrument: Instrument, as_of: date) -> Path:
        return self._dir("validation", instrument) / f"{as_of.isoformat()}.json"

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """An exclusive lock (flock) on `name`, e.g. a ticker slug while its history is replaced."""
        path = self.root / "locks" / f"{name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def load(self, instrument: Instrument, until: date | None = None) -> pd.DataFrame:
        """Published bars of `instrument`, optionally only those dated <= `until` (point in time)."""
        import pandas as pd

        path = self.history_path(instrument)
        if not path.exists():
            return empty_prices()
        try:
            frame = _read_parquet(path)
        except _NOT_CORRUPT:
            raise
        except Exception as exc:  # truncated, overwritten, not Parquet at all
            raise self._quarantine_corrupt(instrument, path, exc) from exc
        if until is not None:
            frame = frame.loc[frame["Date"] <= pd.Timestamp(until)].reset_index(drop=True)
        return frame

    def _quarantine_corrupt(
        self, instrument: Instrument, path: Path, exc: Exception
    ) -> CorruptPriceFile:
        """Move an unreadable price file aside (so the next ingest refetches the full history)
        and return the error that says so.

        The ticker's staged batches go with it: they were fetched as a trailing window over the
        history that is now gone, and publishing one (a retry of the validate step) would make
        those few bars the whole published history, which later ingests only extend."""
        import time

        stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9:09d}"
        target = self._dir("quarantine", instrument) / f"corrupt-{stamp}"
        target.mkdir(parents=True, exist_ok=True)
        moved = target / path.name
        with contextlib.suppress(FileNotFoundError):  # another reader moved it first
            os.replace(path, moved)
        staged = self._dir("staging", instrument)
        for batch in sorted(staged.glob("*.parquet")) if staged.is_dir() else ():
            (target / "staging").mkdir(exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.replace(batch, target / "staging" / batch.name)
        return CorruptPriceFile(
            f"{instrument.ticker}: the published price file {path} is unreadable "
            f"({_describe(exc)}); it was moved to {moved}. The next ingest of {instrument.ticker} "
            "(this one, if it was fetching) fetches the full history again; to keep the old file "
            "instead, repair it and move it back.",
            path,
            moved,
        )

    def last_date(self, instrument: Instrument) -> date | None:
        """The date of the newest published bar. The whole file is read, every page verified:
        a file garbled in any column is found here, before a trailing window is fetched over
        it (reading the Date column alone would miss a garbled Close page until publish)."""
        frame = self.load(instrument)
        return None if frame.empty else frame["Date"].iloc[-1].date()

    def stage(self, instrument: Instrument, batch: pd.DataFrame, as_of: date) -> Path:
        path = self.staging_path(instrument, as_of)
        _write_parquet(batch.reset_index(drop=True), path)
        return path

    def read_staged(self, instrument: Instrument, as_of: date) -> pd.DataFrame:
        path = self.staging_path(instrument, as_of)
        if not path.exists():
            raise FileNotFoundError(
                f"{instrument.ticker}: no staged batch for {as_of} at {path}; run ingest first"
            )
        try:
            return _read_parquet(path)
        except (FileNotFoundError, *_NOT_CORRUPT):  # FileNotFound: a concurrent publish took it
            raise
        except Exception as exc:  # truncated, overwritten, not Parquet at all
            raise self._quarantine_staged(instrument, as_of, path, exc) from exc

    def _quarantine_staged(
        self, instrument: Instrument, as_of: date, path: Path, exc: Exception
    ) -> CorruptStagedFile:
        """Quarantine an unreadable staged batch as a failed batch (`validation.json` says why)
        and return the error that says so. A staged file is only a fetched batch waiting for
        validation: fetching it again is the way out, and the next ingest of the date does."""
        import json

        error = _describe(exc)
        report = {
            "success": False,
            "ticker": instrument.ticker,
            "as_of": as_of.isoformat(),
            "results": [],
            "meta": {"unreadable": str(path), "error": error},
        }
        target = self.quarantine(
            instrument, as_of, json.dumps(report, indent=2, sort_keys=True) + "\n"
        )
        return CorruptStagedFile(
            f"{instrument.ticker}: the staged batch {path} is unreadable ({error}); it was "
            f"quarantined to {target / 'batch.parquet'} and nothing was published. Run ingest "
            f"for {as_of} again: it fetches and stages the batch again.",
            path,
            target / "batch.parquet",
        )

    def quarantine(self, instrument: Instrument, as_of: date, report_json: str) -> Path:
        """Move the staged batch of `as_of` to quarantine with its validation report."""
        target = self.quarantine_dir(instrument, as_of)
        target.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target / "validation.json", report_json)
        staged = self.staging_path(instrument, as_of)
        if staged.exists():
            os.replace(staged, target / "batch.parquet")
        return target

    def publish(
        self, instrument: Instrument, batch: pd.DataFrame, as_of: date, report_json: str
    ) -> PublishResult:
        """Upsert a validated batch into the published history, atomically and idempotently."""
        with self.lock(instrument.slug):
            return self.publish_locked(instrument, batch, as_of, report_json, self.load(instrument))

    def publish_locked(
        self,
        instrument: Instrument,
        batch: pd.DataFrame,
        as_of: date,
        report_json: str,
        history: pd.DataFrame,
        changes: tuple[int, int] | None = None,
    ) -> PublishResult:
        """`publish`, for a caller that holds the ticker's lock (`lock(instrument.slug)`) and
        has read `history` under it; `changes` are the batch's (rows added, rows updated) when
        the caller counted them already (`count_changes`)."""
        import pandas as pd

        batch = batch[OUTPUT_COLUMNS].reset_index(drop=True)
        rows_added, rows_updated = changes or count_changes(history, batch)
        merged = history  # a batch of published bars (a day without new data) changes nothing
        if rows_added or rows_updated:
            kept = history.loc[~history["Date"].isin(batch["Date"])]
            merged = pd.concat([kept, batch], ignore_index=True) if not kept.empty else batch
            merged = merged.sort_values("Date", kind="stable").reset_index(drop=True)
        return self._commit(instrument, as_of, report_json, merged, rows_added, rows_updated)

    def _commit(
        self,
        instrument: Instrument,
        as_of: date,
        report_json: str,
        history: pd.DataFrame,
        rows_added: int,
        rows_updated: int,
        superseded: Path | None = None,
    ) -> PublishResult:
        """Write the report and the new `history` (when it changed), then remove staging."""
        from ml.faults import checkpoint

        # The report of the batch that last changed this date's data stays: a re-run that
        # changes nothing writes nothing, so every file stays byte-identical. It is written
        # before the history, and staging removed last: a process killed in between leaves
        # the staged batch, and the retry publishes it again to the same files.
        changed = bool(rows_added or rows_updated)
        report_path = self.report_path(instrument, as_of)
        if changed or not report_path.exists():
            atomic_write_text(report_path, report_json)
        checkpoint("publish:report")
        if changed:
            _write_parquet(history[OUTPUT_COLUMNS], self.history_path(instrument))
        checkpoint("published")
        self.staging_path(instrument, as_of).unlink(missing_ok=True)
        last = history["Date"].iloc[-1].date() if len(history) else None
        return PublishResult(rows_added, rows_updated, len(history), last, history, superseded)

    def replace_locked(
        self,
        instrument: Instrument,
        batch: pd.DataFrame,
        as_of: date,
        report_json: str,
        history: pd.DataFrame,
    ) -> PublishResult:
        """Replace the published history with a validated full history (a corporate action
        re-scaled the vendor's earlier bars), for a caller holding the ticker's lock.

        The file being replaced is first kept under
        `quarantine/<slug>/superseded-<as_of>-<its fingerprint>/` for audit; then the new
        history is written in one atomic rename. A history equal to the published one writes
        nothing, so a re-run is byte-identical."""

        batch = batch[OUTPUT_COLUMNS].sort_values("Date", kind="stable").reset_index(drop=True)
        path = self.history_path(instrument)
        added, updated = count_changes(history, batch)
        updated += int((~history["Date"].isin(batch["Date"])).sum())  # bars the vendor dropped
        superseded = None
        if (added or updated) and path.exists():
            folder = f"superseded-{as_of.isoformat()}-{data_fingerprint(history)}"
            superseded = self._dir("quarantine", instrument) / folder / path.name
            data = path.read_bytes()
            atomic_write(superseded, lambda tmp: tmp.write_bytes(data))
        return self._commit(instrument, as_of, report_json, batch, added, updated, superseded)
