"""The ticker universe: which instruments the pipeline forecasts, and their asset classes.

The universe is data (`universe.csv`, path from `UNIVERSE_FILE`), not code. Tickers end up in file
names, MLflow model names and URLs, so each one is checked against a strict pattern and mapped to a
reversible slug before it is used anywhere.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ml.config import excerpt

ASSET_CLASSES = ("stock", "etf", "forex", "crypto", "future")

# Upper-case Yahoo symbols: an optional index caret, 1-20 letters/digits/dots/dashes, and an optional
# `=X` (forex) or `=F` (futures) suffix. Nothing else: no slashes, spaces, quotes or separators.
# `$(?!\n)`: JSON-schema validators use re.search, where a bare `$` also matches before a final
# newline; the lookahead (valid ECMA regex too) closes that gap in the Airflow params form.
TICKER_PATTERN = re.compile(r"^\^?[A-Z0-9][A-Z0-9.\-]{0,19}(=[A-Z])?$(?!\n)")
SLUG_PATTERN = re.compile(r"^_?[A-Z0-9][A-Z0-9.\-]{0,19}(_[A-Z])?$")
MODEL_NAME_PREFIX = "price-forecast-"


class UniverseError(ValueError):
    """A ticker or the universe file is malformed."""


@dataclass(frozen=True)
class Instrument:
    ticker: str
    asset_class: str
    name: str = ""

    @property
    def slug(self) -> str:
        return ticker_slug(self.ticker)

    @property
    def model_name(self) -> str:
        return MODEL_NAME_PREFIX + self.slug

    @property
    def trades_weekends(self) -> bool:
        return self.asset_class == "crypto"

    @property
    def has_volume(self) -> bool:
        return self.asset_class != "forex"


def validate_ticker(ticker: object) -> str:
    """Return `ticker` if it is a well-formed Yahoo symbol, else raise UniverseError."""
    if not isinstance(ticker, str) or not TICKER_PATTERN.fullmatch(ticker):
        raise UniverseError(
            f"malformed ticker {excerpt(ticker)}: expected an upper-case Yahoo symbol such as "
            "'GOOGL', 'SOL-USD', 'EURUSD=X' or 'ZB=F' (pattern "
            f"{TICKER_PATTERN.pattern})"
        )
    return ticker


def ticker_slug(ticker: str) -> str:
    """Map a ticker to a name safe for files, MLflow models and URLs (`EURUSD=X` -> `EURUSD_X`)."""
    validate_ticker(ticker)
    slug = ticker.replace("=", "_")
    return "_" + slug[1:] if slug.startswith("^") else slug


def ticker_from_slug(slug: str) -> str:
    """The inverse of `ticker_slug`."""
    if not isinstance(slug, str) or not SLUG_PATTERN.fullmatch(slug):
        raise UniverseError(f"malformed ticker slug {excerpt(slug)}")
    ticker = "^" + slug[1:] if slug.startswith("_") else slug
    return validate_ticker(ticker.replace("_", "="))


@dataclass(frozen=True)
class Universe:
    instruments: tuple[Instrument, ...]

    def __len__(self) -> int:
        return len(self.instruments)

    def __iter__(self):
        return iter(self.instruments)

    @property
    def tickers(self) -> list[str]:
        return [i.ticker for i in self.instruments]

    def get(self, ticker: str) -> Instrument:
        validate_ticker(ticker)
        for instrument in self.instruments:
            if instrument.ticker == ticker:
                return instrument
        raise UniverseError(
            f"unknown ticker {ticker!r}: not in the universe file; add it there with its asset class"
        )

    def select(self, tickers: Iterable[str] | None) -> list[Instrument]:
        """The instruments for `tickers` (all when None), in the order given; a ticker named twice
        is selected once (each run of a ticker writes the same files and models)."""
        if tickers is None:
            return list(self.instruments)
        chosen = [self.get(t) for t in dict.fromkeys(tickers)]
        if not chosen:
            raise UniverseError("no tickers selected")
        return chosen


def parse_universe(
    rows: Sequence[dict[str, str]],
    origin: str = "universe",
    line_numbers: Sequence[int] | None = None,
) -> Universe:
    instruments: list[Instrument] = []
    seen: set[str] = set()
    numbers = line_numbers or range(2, len(rows) + 2)
    for line_no, row in zip(numbers, rows, strict=True):
        ticker = (row.get("ticker") or "").strip()
        asset_class = (row.get("asset_class") or "").strip().lower()
        where = f"{origin}, line {line_no}"
        try:
            validate_ticker(ticker)
        except UniverseError as exc:
            raise UniverseError(f"{where}: {exc}") from None
        if asset_class not in ASSET_CLASSES:
            raise UniverseError(
                f"{where}: asset class {excerpt(asset_class)} for {ticker}: choose from "
                f"{', '.join(ASSET_CLASSES)}"
            )
        if ticker in seen:
            raise UniverseError(f"{where}: duplicate ticker {ticker}")
        seen.add(ticker)
        instruments.append(Instrument(ticker, asset_class, (row.get("name") or "").strip()))
    if not instruments:
        raise UniverseError(f"{origin}: the universe is empty")
    return Universe(tuple(instruments))


def load_universe(path: Path) -> Universe:
    """Read and check the universe file (CSV with columns ticker, asset_class, name)."""
    try:
        # utf-8-sig: a file saved by Excel starts with a byte-order mark.
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = {"ticker", "asset_class"} - set(reader.fieldnames or ())
            if missing:
                raise UniverseError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
            rows, lines = [], []
            for row in reader:
                rows.append(row)
                lines.append(reader.line_num)
    except FileNotFoundError:
        raise UniverseError(f"universe file not found: {path} (set UNIVERSE_FILE)") from None
    except (UnicodeDecodeError, csv.Error, OSError) as exc:  # garbage bytes, NUL, a folder
        raise UniverseError(
            f"{path}: not a readable universe file, a UTF-8 CSV with the columns ticker, "
            f"asset_class, name ({type(exc).__name__}: {exc}). Restore it (the project's "
            "universe.csv is under version control) or set UNIVERSE_FILE to a good copy."
        ) from exc
    return parse_universe(rows, origin=str(path), line_numbers=lines)
