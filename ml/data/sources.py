"""Price sources: Yahoo Finance (yfinance), an offline synthetic generator, and file replay.

Every source returns the same frame: one row per session, columns `PRICE_COLUMNS` plus `Ticker`,
with `Date` a plain session date (no time, no time zone), sorted ascending, restricted to
`start <= Date <= end`. A source never falls back to another one: an error is raised instead.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ml.config import ConfigError, Settings, excerpt
from ml.data.schema import PRICE_COLUMNS, PriceSourceError
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


def _session_dates(values: pd.Series) -> pd.Series:
    """Each value's local session date: time zones (even mixed, across a DST change) are dropped,
    never converted, so a bar stays on the exchange's own calendar day."""
    import pandas as pd

    try:
        dates = pd.to_datetime(values, utc=False)
    except (ValueError, TypeError):
        dates = pd.Series(
            [
                pd.Timestamp(v).tz_localize(None) if pd.Timestamp(v).tzinfo else pd.Timestamp(v)
                for v in values
            ],
            index=values.index,
        )
    if getattr(dates.dt, "tz", None) is not None:
        dates = dates.dt.tz_localize(None)
    return dates


def normalize_frame(frame: pd.DataFrame, ticker: str, start: date, end: date) -> pd.DataFrame:
    """Bring a frame in yfinance's column layout to the standard shape.

    Columns are matched by name; `Date` may be a column or the index, with or without time zone
    (the session date is what counts). Rows outside [start, end] are dropped. Values are not
    checked here: that is the validation suite's job, so bad rows reach it and get reported.
    """
    import pandas as pd

    df = frame.copy()
    if "Date" not in df.columns:
        df = df.reset_index()
        first = df.columns[0]
        if first != "Date":
            df = df.rename(columns={first: "Date"})
    missing = [c for c in PRICE_COLUMNS if c not in df.columns]
    if missing:
        raise PriceSourceError(f"{ticker}: source frame is missing column(s) {missing}")
    dates = _session_dates(df["Date"])
    df["Date"] = dates.dt.normalize().astype("datetime64[ns]")
    df = df[PRICE_COLUMNS]
    for col in PRICE_COLUMNS[1:]:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    mask = (df["Date"] >= pd.Timestamp(start)) & (df["Date"] <= pd.Timestamp(end))
    df = df.loc[mask].reset_index(drop=True)
    df["Ticker"] = ticker
    return df


# --- synthetic -----------------------------------------------------------------------------------

SYNTHETIC_EPOCH = date(2000, 1, 3)
SYNTHETIC_LAST = date(2035, 12, 31)
# The price each synthetic series is scaled to on ANCHOR_DATE: near the instrument's real level.
ANCHOR_DATE = date(2024, 6, 28)
ANCHOR_PRICES = {
    "AMD": 162.0,
    "BYDDY": 59.0,
    "ZI": 12.7,
    "PFE": 28.0,
    "NU": 12.9,
    "WMT": 67.7,
    "F": 12.5,
    "GOOGL": 182.0,
    "Z": 46.3,
    "NVDA": 123.5,
    "MRNA": 118.7,
    "SPY": 544.2,
    "TQQQ": 60.6,
    "IVV": 547.2,
    "VOO": 500.1,
    "VTI": 267.5,
    "QQQ": 479.1,
    "VTV": 160.4,
    "BND": 72.1,
    "IWF": 364.5,
    "XLK": 226.2,
    "GLD": 215.0,
    "SCHD": 77.4,
    "EURUSD=X": 1.07,
    "JPY=X": 160.8,
    "MXN=X": 18.3,
    "SOL-USD": 146.0,
    "ZB=F": 117.8,
    "HG=F": 4.37,
    "ZC=F": 397.8,
    "ZM=F": 371.0,
}
# Annualized volatility, dividend yield and typical daily volume by asset class.
_CLASS_PROFILE = {
    "stock": (0.40, 0.010, 2.0e7),
    "etf": (0.18, 0.015, 5.0e6),
    "forex": (0.08, 0.0, 0.0),
    "crypto": (0.75, 0.0, 2.0e9),
    "future": (0.22, 0.0, 1.5e5),
}


def _seed(ticker: str) -> int:
    return int.from_bytes(hashlib.sha256(f"synthetic:{ticker}".encode()).digest()[:8], "little")


@lru_cache(maxsize=1024)
def _synthetic_series(ticker: str, asset_class: str) -> pd.DataFrame:
    """The whole fixed-span series of one ticker: every date's bar depends only on (ticker, date)."""
    import numpy as np
    import pandas as pd

    freq = "D" if asset_class == "crypto" else "B"
    dates = pd.date_range(SYNTHETIC_EPOCH, SYNTHETIC_LAST, freq=freq)
    n = len(dates)
    rng = np.random.default_rng(_seed(ticker))
    annual_vol, div_yield, volume_level = _CLASS_PROFILE[asset_class]
    per_year = 365 if asset_class == "crypto" else 252
    base_var = (annual_vol**2) / per_year

    # GARCH(1,1) daily variance: volatility clusters, so the next bar's range is predictable.
    alpha, beta = 0.08, 0.90
    omega = base_var * (1 - alpha - beta)
    shocks = rng.standard_t(df=5, size=n) / np.sqrt(5 / 3)
    # The recursion on plain floats: the same IEEE operations in the same order as on numpy
    # scalars (bit for bit), several times faster over the ~9,400 bars of the span.
    var_list = [0.0] * n
    ret_list = [0.0] * n
    v, r = base_var, 0.0
    for t, shock in enumerate(shocks.tolist()):
        if t:
            v = omega + alpha * r**2 + beta * v
        r = math.sqrt(v) * shock
        var_list[t], ret_list[t] = v, r
    var, ret = np.array(var_list), np.array(ret_list)
    sigma = np.sqrt(var)
    drift = 0.03 / per_year if asset_class in ("stock", "etf") else 0.0
    log_close = np.cumsum(ret + drift - 0.5 * var)

    # Intraday path: the open gaps from the last close, high/low extend beyond open and close by a
    # fraction of the day's volatility.
    gap = sigma * 0.25 * rng.standard_normal(n)
    log_open = np.concatenate([[0.0], log_close[:-1]]) + gap
    up = np.abs(rng.standard_normal(n)) * sigma * 0.6
    down = np.abs(rng.standard_normal(n)) * sigma * 0.6
    log_high = np.maximum(log_open, log_close) + up
    log_low = np.minimum(log_open, log_close) - down

    anchor_idx = int(np.searchsorted(dates.values, np.datetime64(ANCHOR_DATE)))
    anchor_idx = min(anchor_idx, n - 1)
    scale = np.log(ANCHOR_PRICES.get(ticker, 100.0)) - log_close[anchor_idx]
    close = np.exp(log_close + scale)
    years_to_end = (dates[-1] - dates).days.to_numpy() / 365.25
    adj_factor = np.exp(-div_yield * years_to_end)
    if volume_level:
        volume = np.round(
            volume_level * np.exp(0.35 * rng.standard_normal(n)) * (sigma / sigma.mean())
        )
    else:
        volume = np.zeros(n)
    digits = 6 if close[anchor_idx] < 10 else 4
    frame = pd.DataFrame(
        {
            "Date": dates.astype("datetime64[ns]"),
            "Open": np.round(np.exp(log_open + scale), digits),
            "High": np.round(np.exp(log_high + scale), digits),
            "Low": np.round(np.exp(log_low + scale), digits),
            "Close": np.round(close, digits),
            "Adj Close": np.round(close * adj_factor, digits),
            "Volume": volume.astype("float64"),
        }
    )
    frame["High"] = frame[["Open", "High", "Close"]].max(axis=1)
    frame["Low"] = frame[["Open", "Low", "Close"]].min(axis=1)
    return frame


@dataclass(frozen=True)
class SyntheticSource:
    """Deterministic, offline bars per (ticker, date): the same date always gives the same bar.

    Equities, ETFs, futures and forex trade on weekdays, crypto every day; volatility clusters
    (GARCH), OHLC are consistent, forex has zero volume, levels are near each instrument's real
    price in mid-2024. The data are SYNTHETIC: they carry no information about real markets.
    """

    name: str = "synthetic"
    local: bool = True

    def fetch(self, instrument: Instrument, start: date, end: date) -> pd.DataFrame:
        if start > end:
            raise PriceSourceError(f"{instrument.ticker}: start {start} is after end {end}")
        if end > SYNTHETIC_LAST or start < SYNTHETIC_EPOCH:
            raise PriceSourceError(
                f"{instrument.ticker}: synthetic data span {SYNTHETIC_EPOCH}..{SYNTHETIC_LAST}"
            )
        import pandas as pd

        series = _synthetic_series(instrument.ticker, instrument.asset_class)
        # Only the asked span goes through normalize_frame (its own date filter keeps the same
        # rows: these dates are already midnight, tz-naive).
        lo = series["Date"].searchsorted(pd.Timestamp(start), side="left")
        hi = series["Date"].searchsorted(pd.Timestamp(end), side="right")
        return normalize_frame(series.iloc[lo:hi], instrument.ticker, start, end)


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
        dates = _session_dates(frame["Date"])
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
