"""Price sources: Yahoo Finance (yfinance), an offline synthetic generator, and file replay.

Every source returns the same frame: one row per session, columns `PRICE_COLUMNS` plus `Ticker`,
with `Date` a plain session date (no time, no time zone), sorted ascending, restricted to
`start <= Date <= end`. A source never falls back to another one: an error is raised instead.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ml.config import ConfigError, Settings, excerpt
from ml.data.schema import PRICE_COLUMNS, PriceSourceError, normalize_frame, session_dates
from ml.data.synthetic import SyntheticSource
from ml.universe import Instrument

if TYPE_CHECKING:
    import pandas as pd


class PriceSource(Protocol):
    name: str
    # True when the bars are computed or read on this machine (CPU-bound: `ingest_all` spreads
    # such a source over processes); False for a network source (threads, a bounded few at a
    # time). A source without the attribute counts as a network source.
    local: bool

    def fetch(self, instrument: Instrument, start: date, end: date) -> pd.DataFrame:
        """Bars of `instrument` with start <= Date <= end, in the standard columns."""
        ...


# --- files ---------------------------------------------------------------------------------------


# Names a user's file may give each standard column (compared lowercase, spaces/_/- removed).
_COLUMN_ALIASES = {
    "Date": ("date", "datetime", "timestamp", "time", "day"),
    "Open": ("open",),
    "High": ("high",),
    "Low": ("low",),
    "Close": ("close",),
    "Adj Close": ("adjclose", "adjustedclose"),
    "Volume": ("volume", "vol"),
}


# The column names an error or a note lists: a file's header is its content, and a header of
# thousands of names (a file that is not a price table at all) must not fill the run report.
_SHOWN_COLUMNS = 12


def _column_key(name: object) -> str:
    return "".join(ch for ch in str(name).lower() if ch not in " _-.")


def _column_list(columns: Iterable[object]) -> str:
    """A file's column names as a message shows them: each one `excerpt`ed (escaped, cut), and
    at most `_SHOWN_COLUMNS` of them, then how many more there are."""
    names = [str(c) for c in columns]
    shown = [excerpt(n) for n in names[:_SHOWN_COLUMNS]]
    if len(names) > _SHOWN_COLUMNS:
        shown.append(f"... {len(names) - _SHOWN_COLUMNS:,} more")
    return f"[{', '.join(shown)}]"


def _first_non_date(values: pd.Series) -> int | None:
    """The position of the first value that reads as no date, if any (for the error message:
    the row to fix, never its content)."""
    import pandas as pd

    parsed = pd.to_datetime(values, errors="coerce", utc=True, format="mixed")
    bad = (parsed.isna() & values.notna()).to_numpy()
    return int(bad.argmax()) if bad.any() else None


def standardize_file_frame(raw: pd.DataFrame, ticker: str, path: Path) -> pd.DataFrame:
    """A user's price table in yfinance's columns, with what was assumed in `attrs["notes"]`.

    Accepted as users have them: the date as the first unnamed column (a saved pandas index), as
    the index of a Parquet file, or a column named Date/date/timestamp; column names in any case;
    no `Adj Close` (then Adj Close = Close: the file carries no adjustment, and the note says
    so); newest-first order (reversed); extra columns (dividends, splits, open interest) ignored.
    Anything else raises `PriceSourceError` naming the file (by its name in the folder) and the
    column; a message shows the file's column names (escaped, cut, a bounded few) and never its
    values.
    """
    import pandas as pd

    frame = raw
    if isinstance(frame.index, pd.DatetimeIndex) or frame.index.name is not None:
        frame = frame.reset_index()
    keys = {_column_key(c): c for c in reversed(list(frame.columns))}
    renames: dict[object, str] = {}
    for column, aliases in _COLUMN_ALIASES.items():
        found = next((keys[a] for a in aliases if a in keys), None)
        if found is not None:
            renames[found] = column
    if "Date" not in renames.values():
        first = frame.columns[0] if len(frame.columns) else None
        if first is not None and (str(first).startswith("Unnamed: ") or str(first).strip() == ""):
            renames[first] = "Date"
    missing = [c for c in PRICE_COLUMNS if c not in renames.values() and c != "Adj Close"]
    if missing:
        if "Date" in missing:
            where = "no date column (the first column unnamed, or one named Date, date, timestamp)"
        else:
            where = f"missing column(s) {missing}"
        raise PriceSourceError(
            f"{ticker}: {path.name}: {where}; the file has columns {_column_list(frame.columns)}"
        )
    frame = frame.rename(columns=renames)
    notes = []
    ignored = [c for c in frame.columns if c not in PRICE_COLUMNS]
    if ignored:
        notes.append(f"{path.name}: ignored column(s) {_column_list(ignored)}")
    if "Adj Close" not in frame.columns:
        frame = frame.assign(**{"Adj Close": frame["Close"]})
        notes.append(f"{path.name}: no Adj Close column: Adj Close = Close (no adjustment)")
    frame = frame[PRICE_COLUMNS]
    try:
        dates = session_dates(frame["Date"])
    except (ValueError, TypeError):
        # The parser's message quotes the offending value: the row number is said instead, and
        # the parser's error is not chained (a task log prints the cause too).
        row = _first_non_date(frame["Date"])
        at = f" (data row {row + 1} is not a date)" if row is not None else ""
        raise PriceSourceError(
            f"{ticker}: {path.name}: column {excerpt(_file_name_of(renames, 'Date'))} does not "
            f"hold dates{at}; write them YYYY-MM-DD"
        ) from None
    if len(dates) > 1 and dates.is_monotonic_decreasing and not dates.is_monotonic_increasing:
        frame = frame.iloc[::-1].reset_index(drop=True)
        notes.append(f"{path.name}: newest-first order, read in reverse")
    frame.attrs["notes"] = notes
    return frame


def _file_name_of(renames: dict[object, str], column: str) -> str:
    """The file's own name of a standard column."""
    return next((str(k) for k, v in renames.items() if v == column), column)


# What a folder entry that is not a regular file is, for the message that refuses it.
_ENTRY_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _reason(exc: BaseException, limit: int = 120) -> str:
    """A parser's error as one short printable line: its type and the first line of its message,
    cut (a message may quote the bytes it choked on)."""
    lines = str(exc).strip().splitlines()
    text = "".join(ch if ch.isprintable() else "?" for ch in (lines[0] if lines else ""))
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass(frozen=True)
class FileSource:
    """Replays a folder of CSV or Parquet files, one per ticker, in the layouts users have (see
    `standardize_file_frame`).

    A file is found as `<TICKER>.csv`, `<slug>.csv` or the `.parquet` equivalents, in any case
    (`msft.csv` serves MSFT). Only a regular file whose real path lies inside the folder is read
    (a link to another file in the folder is fine), and only up to `max_bytes`
    (PRICE_FILE_MAX_BYTES): a link out of the folder (to `/proc/self/environ`, `/etc/...`), a
    FIFO, a device or a socket is refused without being opened, and so is a larger file, before
    any byte is parsed. Errors name the file by its name in the folder.
    """

    directory: Path
    max_bytes: int = Settings.price_file_max_bytes
    name: str = "files"
    local: bool = True

    def _path_for(self, instrument: Instrument) -> Path:
        """The folder's entry for `instrument`, whatever it is (file, link, FIFO): `_read` vets it,
        so that a misplaced entry is refused by name rather than reported missing."""
        stems = list(dict.fromkeys((instrument.ticker, instrument.slug)))
        for stem in stems:
            for ext in (".parquet", ".csv"):
                path = self.directory / f"{stem}{ext}"
                if os.path.lexists(path):
                    return path
        wanted = {f"{stem}{ext}".lower() for stem in stems for ext in (".parquet", ".csv")}
        if self.directory.is_dir():
            for path in sorted(self.directory.iterdir()):
                if path.name.lower() in wanted:
                    return path
        raise PriceSourceError(
            f"{instrument.ticker}: no price file in {self.directory} "
            f"(expected {instrument.slug}.csv or {instrument.slug}.parquet)"
        )

    def _read(self, ticker: str, path: Path) -> bytes:
        """The bytes of `path`, a regular file inside the folder of at most `max_bytes`, else
        PriceSourceError. What the entry is gets checked on its real path before it is opened
        (opening a FIFO blocks, opening a device may act), then again on the open descriptor, in
        case the entry was swapped in between."""
        name = path.name  # one of the names `_path_for` looks for: a ticker's, short and plain
        try:
            # resolve() reads links, never the file they lead to.
            target = path.resolve()
            inside = target.is_relative_to(self.directory.resolve())
        except (OSError, RuntimeError) as exc:  # a link loop
            raise PriceSourceError(f"{ticker}: cannot read {name}: {_reason(exc)}") from None
        if not inside:
            raise PriceSourceError(
                f"{ticker}: {name} in PRICE_FILES_DIR links to a file outside that folder: not "
                "read; copy the file itself into PRICE_FILES_DIR"
            )
        try:
            info = os.stat(target)
        except FileNotFoundError:
            raise PriceSourceError(
                f"{ticker}: {name} in PRICE_FILES_DIR is a link to nothing; replace it with the "
                "ticker's CSV or Parquet file"
            ) from None
        except OSError as exc:  # no permission
            raise PriceSourceError(f"{ticker}: cannot read {name}: {_reason(exc)}") from None
        if not stat.S_ISREG(info.st_mode):
            kind = _ENTRY_KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
            raise PriceSourceError(
                f"{ticker}: {name} in PRICE_FILES_DIR is {kind}, not a regular file: not read; "
                "put the ticker's CSV or Parquet file there"
            )
        if info.st_size > self.max_bytes:
            raise self._too_large(ticker, name, info.st_size)
        if info.st_size == 0:  # also what /proc and /sys report for their generated files
            raise PriceSourceError(f"{ticker}: {name} in PRICE_FILES_DIR is empty")
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(target, flags)
        except OSError as exc:
            raise PriceSourceError(f"{ticker}: cannot read {name}: {_reason(exc)}") from None
        with os.fdopen(fd, "rb") as fh:
            opened = os.fstat(fh.fileno())
            if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
                raise PriceSourceError(
                    f"{ticker}: {name} in PRICE_FILES_DIR was replaced while being opened; "
                    "run again once it is in place"
                )
            data = fh.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:  # it grew after the check
            raise self._too_large(ticker, name, len(data))
        return data

    def _too_large(self, ticker: str, name: str, size: int) -> PriceSourceError:
        return PriceSourceError(
            f"{ticker}: {name} in PRICE_FILES_DIR has {size:,} bytes, more than "
            f"PRICE_FILE_MAX_BYTES ({self.max_bytes:,}): not read; keep one ticker's daily bars "
            "in it, or raise PRICE_FILE_MAX_BYTES"
        )

    def fetch(self, instrument: Instrument, start: date, end: date) -> pd.DataFrame:
        import pandas as pd

        path = self._path_for(instrument)
        parquet = path.suffix.lower() == ".parquet"
        data = io.BytesIO(self._read(instrument.ticker, path))
        try:
            raw = pd.read_parquet(data) if parquet else pd.read_csv(data)
        except Exception as exc:
            raise PriceSourceError(
                f"{instrument.ticker}: cannot read {path.name} as "
                f"{'Parquet' if parquet else 'CSV'}: {_reason(exc)}"
            ) from None  # the whole parser message (in a task log's traceback) may quote bytes
        frame = standardize_file_frame(raw, instrument.ticker, path)
        out = normalize_frame(frame, instrument.ticker, start, end)
        out.attrs["notes"] = frame.attrs["notes"]
        return out


# --- yahoo ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class YahooSource:
    """Daily bars from Yahoo Finance through yfinance (see `ml.data.yahoo`)."""

    max_retries: int = 5
    backoff_seconds: float = 2.0
    name: str = "yahoo"
    local: bool = False
    # A curl_cffi Session for yfinance (tests pass a replaying one); None = yfinance's own.
    session: object | None = None

    def fetch(self, instrument: Instrument, start: date, end: date) -> pd.DataFrame:
        from ml.data.yahoo import fetch_yahoo

        raw = fetch_yahoo(
            instrument.ticker,
            start,
            end,
            max_retries=self.max_retries,
            backoff_seconds=self.backoff_seconds,
            session=self.session,
        )
        frame = normalize_frame(raw, instrument.ticker, start, end)
        frame.attrs["events"] = list(raw.attrs.get("events") or ())
        return frame


def get_source(settings: Settings) -> PriceSource:
    """The source named by `PRICE_SOURCE`. There is no fallback between sources."""
    if settings.price_source == "synthetic":
        return SyntheticSource()
    if settings.price_source == "files":
        if settings.price_files_dir is None:
            raise ConfigError("PRICE_SOURCE=files needs PRICE_FILES_DIR")
        return FileSource(settings.price_files_dir, settings.price_file_max_bytes)
    return YahooSource(settings.yahoo_max_retries, settings.yahoo_backoff_seconds)
