"""Tests of `ml.universe`: the default universe, the ticker pattern, slugs and file errors."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from ml.universe import (
    ASSET_CLASSES,
    Instrument,
    Universe,
    UniverseError,
    load_universe,
    ticker_from_slug,
    ticker_slug,
    validate_ticker,
)

REPO = Path(__file__).resolve().parent.parent
UNIVERSE_FILE = REPO / "universe.csv"

# The 31 default tickers of the project (docs/data.md, "The universe").
DESIGN_UNIVERSE = {
    "stock": ["AMD", "BYDDY", "ZI", "PFE", "NU", "WMT", "F", "GOOGL", "Z", "NVDA", "MRNA"],
    "etf": ["SPY", "TQQQ", "IVV", "VOO", "VTI", "QQQ", "VTV", "BND", "IWF", "XLK", "GLD", "SCHD"],
    "forex": ["EURUSD=X", "JPY=X", "MXN=X"],
    "crypto": ["SOL-USD"],
    "future": ["ZB=F", "HG=F", "ZC=F", "ZM=F"],
}
FILE_SAFE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
HEADER = "ticker,asset_class,name\n"


@pytest.fixture(scope="module")
def universe() -> Universe:
    return load_universe(UNIVERSE_FILE)


def write(tmp_path: Path, text: str, name: str = "universe.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- the default universe ------------------------------------------------------------------------


def test_default_universe_matches_the_design(universe: Universe) -> None:
    assert len(universe) == 31
    counts = Counter(i.asset_class for i in universe)
    assert counts == {"stock": 11, "etf": 12, "forex": 3, "crypto": 1, "future": 4}
    by_class = {c: [i.ticker for i in universe if i.asset_class == c] for c in ASSET_CLASSES}
    assert by_class == DESIGN_UNIVERSE
    assert all(i.name for i in universe)


def test_asset_class_properties(universe: Universe) -> None:
    assert [i.ticker for i in universe if i.trades_weekends] == ["SOL-USD"]
    assert [i.ticker for i in universe if not i.has_volume] == DESIGN_UNIVERSE["forex"]
    assert universe.get("ZB=F").model_name == "price-forecast-ZB_F"


def test_select_keeps_the_given_order_and_none_means_all(universe: Universe) -> None:
    assert [i.ticker for i in universe.select(["ZB=F", "AMD"])] == ["ZB=F", "AMD"]
    assert universe.select(None) == list(universe)
    with pytest.raises(UniverseError, match="no tickers"):
        universe.select([])


def test_select_collapses_a_ticker_named_twice(universe: Universe) -> None:
    chosen = universe.select(["SPY", "AMD", "SPY", "AMD", "SPY"])
    assert [i.ticker for i in chosen] == ["SPY", "AMD"]


# --- the ticker pattern --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ticker", ["EURUSD=X", "ZB=F", "SOL-USD", "GOOGL", "^GSPC", "BRK-B", "BRK.B", "F", "7203.T"]
)
def test_pattern_admits_yahoo_symbols(ticker: str) -> None:
    assert validate_ticker(ticker) == ticker


@pytest.mark.parametrize(
    "ticker",
    [
        "../x",
        "",
        " GOOGL",
        "GOOGL ",
        "GOOGL\n",
        "GOO GL",
        "A;B",
        "a/b",
        "A/B",
        "googl",
        "Googl",
        "$(rm)",
        "`id`",
        "A'B",
        'A"B',
        "A\\B",
        "-A",
        ".A",
        "..",
        "^",
        "A=",
        "A=XX",
        "A_B",
        "A" * 22,
        None,
        42,
        b"GOOGL",
    ],
)
def test_pattern_rejects_anything_else(ticker: object) -> None:
    with pytest.raises(UniverseError) as excinfo:
        validate_ticker(ticker)
    assert repr(ticker) in str(excinfo.value)
    assert "malformed ticker" in str(excinfo.value)


# --- slugs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ticker", "slug"),
    [
        ("EURUSD=X", "EURUSD_X"),
        ("^GSPC", "_GSPC"),
        ("ZB=F", "ZB_F"),
        ("SOL-USD", "SOL-USD"),
        ("GOOGL", "GOOGL"),
        ("BRK.B", "BRK.B"),
    ],
)
def test_slug_examples(ticker: str, slug: str) -> None:
    assert ticker_slug(ticker) == slug
    assert ticker_from_slug(slug) == ticker


def test_slugs_of_the_default_universe_are_reversible_unique_and_file_safe(
    universe: Universe,
) -> None:
    slugs = [i.slug for i in universe]
    assert len(set(slugs)) == len(slugs)
    for instrument, slug in zip(universe, slugs, strict=True):
        assert ticker_from_slug(slug) == instrument.ticker
        assert FILE_SAFE.fullmatch(slug), slug
        assert slug not in (".", "..")
        assert Path(slug).name == slug
        # Case-insensitive file systems must not merge two slugs either.
    assert len({s.lower() for s in slugs}) == len(slugs)


@pytest.mark.parametrize("bad", ["../x", "", "A/B", "a_b", "EURUSD=X", "_", None, "A B"])
def test_malformed_slug_is_rejected(bad: object) -> None:
    with pytest.raises(UniverseError):
        ticker_from_slug(bad)  # type: ignore[arg-type]


def test_slug_refuses_malformed_tickers() -> None:
    with pytest.raises(UniverseError, match="malformed ticker"):
        ticker_slug("../etc/passwd")


# --- lookups -------------------------------------------------------------------------------------


def test_get_unknown_ticker_names_it(universe: Universe) -> None:
    with pytest.raises(UniverseError) as excinfo:
        universe.get("ZZZZ")
    assert "'ZZZZ'" in str(excinfo.value)
    assert "unknown ticker" in str(excinfo.value)
    assert universe.get("GOOGL") == Instrument("GOOGL", "stock", "Alphabet Class A")


def test_get_malformed_ticker_says_malformed(universe: Universe) -> None:
    with pytest.raises(UniverseError, match=r"malformed ticker '\.\./x'"):
        universe.get("../x")


@pytest.mark.parametrize("bad", ["A" * 5000, "\n".join(["X=1"] * 2000)], ids=["long", "lines"])
def test_a_long_bad_ticker_is_echoed_cut_with_its_length(universe: Universe, bad: str) -> None:
    with pytest.raises(UniverseError) as excinfo:
        universe.select(["SPY", bad])
    message = str(excinfo.value)
    assert len(message) < 300, message
    assert "\n" not in message
    assert f"malformed ticker {bad[:40]!r}... ({len(bad):,} characters)" in message


# --- malformed files -----------------------------------------------------------------------------


def test_a_small_valid_file_loads(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "AMD,stock,AMD\n SOL-USD , Crypto ,Solana\n")
    universe = load_universe(path)
    assert universe.instruments == (
        Instrument("AMD", "stock", "AMD"),
        Instrument("SOL-USD", "crypto", "Solana"),
    )


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ("AMD,stock,x\nBAD TICK,stock,y\n", ["line 3", "malformed ticker 'BAD TICK'"]),
        ("AMD,stock,x\n../x,stock,y\n", ["line 3", "'../x'"]),
        ("amd,stock,x\n", ["line 2", "'amd'"]),
        ("AMD,equity,x\n", ["line 2", "'equity'", "AMD", "stock, etf, forex, crypto, future"]),
        ("AMD,,x\n", ["line 2", "asset class ''"]),
        ("AMD,stock,x\nF,stock,y\nAMD,etf,z\n", ["line 4", "duplicate ticker AMD"]),
        ("", ["the universe is empty"]),
    ],
    ids=["bad-ticker", "traversal", "lowercase", "unknown-class", "no-class", "duplicate", "empty"],
)
def test_malformed_file_names_the_path_and_line(
    tmp_path: Path, body: str, fragments: list[str]
) -> None:
    path = write(tmp_path, HEADER + body)
    with pytest.raises(UniverseError) as excinfo:
        load_universe(path)
    message = str(excinfo.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_column_names_the_path_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "ticker,name\nAMD,x\n")
    with pytest.raises(UniverseError) as excinfo:
        load_universe(path)
    assert str(path) in str(excinfo.value)
    assert "missing column(s) asset_class" in str(excinfo.value)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "universe.csv"
    with pytest.raises(UniverseError) as excinfo:
        load_universe(path)
    assert str(path) in str(excinfo.value)
    assert "UNIVERSE_FILE" in str(excinfo.value)


def test_line_number_counts_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "AMD,stock,x\n\nBAD TICK,stock,y\n")
    with pytest.raises(UniverseError, match="line 4"):
        load_universe(path)


def test_file_saved_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    path = tmp_path / "universe.csv"
    path.write_bytes(("\ufeff" + HEADER + "AMD,stock,x\n").encode("utf-8"))
    assert load_universe(path).tickers == ["AMD"]
