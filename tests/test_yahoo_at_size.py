"""Ingest at size: 2,000 tickers through the project's real ingest path (`ingest_all` with the
Yahoo source and its bounded concurrency) and the real yfinance client, against a local fake of
Yahoo's v8 chart API on a real socket that answers 429 + Retry-After above a set rate
(tests/fixtures/yahoo/fake_server.py).

Only Yahoo is faked: yfinance's chart base URL (a module constant, imported by value into
`yfinance.base` and `yfinance.scrapers.history`) points at the fake, and its cookie/crumb hosts
(fixed https URLs in `yfinance.data`) are refused by the session before any socket is opened, as
an unreachable host (yfinance goes on without a crumb, which the chart API does not need).

Rates are scaled down so the run is short: Retry-After 1 s, the project's backoff 0.05 s.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

import pandas as pd
import pytest
import yfinance  # noqa: F401  (imported at collection: its warnings filter, see test_yahoo.py)
from curl_cffi import requests as curl_requests
from curl_cffi.requests.exceptions import ConnectionError as CurlConnectionError

from ml.config import get_settings
from ml.data.sources import YahooSource
from ml.data.store import PriceStore
from ml.steps.data import ingest_all
from ml.universe import load_universe
from tests.fixtures.yahoo.fake_server import FakeYahoo, bars_for, weekdays

CONCURRENCY = 8
START, AS_OF = date(2024, 6, 3), date(2024, 6, 14)


@pytest.fixture
def yfinance_at(monkeypatch):
    """Point yfinance's chart calls at a base URL; no on-disk caches; its state restored."""
    import yfinance.base
    import yfinance.scrapers.history
    from yfinance import cache
    from yfinance.data import YfData

    def point(base: str) -> None:
        for module in (yfinance.base, yfinance.scrapers.history):
            monkeypatch.setattr(module, "_BASE_URL_", base)

    monkeypatch.setattr(cache._TzCacheManager, "_tz_cache", cache._TzCacheDummy())
    monkeypatch.setattr(cache._CookieCacheManager, "_Cookie_cache", cache._CookieCacheDummy())
    data = YfData()
    monkeypatch.setattr(data, "_session", data._session)
    for attr, value in (("_crumb", None), ("_cookie", None), ("_cookie_strategy", "basic")):
        monkeypatch.setattr(data, attr, value)
    YfData.cache_get.cache_clear()
    yield point
    YfData.cache_get.cache_clear()


def _local_only(session: curl_requests.Session, base: str) -> curl_requests.Session:
    """Requests to anything but the fake fail as an unreachable host would (no socket opened)."""
    inner = session.request

    def request(method, url, *args, **kwargs):
        if not str(url).startswith(base):
            raise CurlConnectionError(f"offline test: {url} is not the fake Yahoo")
        return inner(method, url, *args, **kwargs)

    session.request = request
    return session


def _settings(tmp_path: Path, tickers: int):
    universe = tmp_path / "universe.csv"
    names = [f"T{i:04d}" for i in range(tickers)]
    universe.write_text("ticker,asset_class,name\n" + "".join(f"{t},stock,{t}\n" for t in names))
    env = {
        "PRICE_SOURCE": "yahoo",
        "DATA_DIR": str(tmp_path / "data"),
        "UNIVERSE_FILE": str(universe),
        "HISTORY_START": START.isoformat(),
        "FETCH_CONCURRENCY": str(CONCURRENCY),
        "YAHOO_MAX_RETRIES": "8",
        "YAHOO_BACKOFF_SECONDS": "0.05",
    }
    return get_settings(env), names


def _early_requests(log) -> tuple[list, list[int]]:
    """Per ticker: requests that came before the Retry-After of that ticker's last 429 ran out.
    Across tickers: per 429, how many requests of any ticker arrived during its Retry-After."""
    per_ticker = defaultdict(list)
    for r in log:
        per_ticker[r.ticker].append(r)
    early = []
    for requests in per_ticker.values():
        for before, after in itertools.pairwise(requests):
            if before.status == 429 and after.at < before.at + before.retry_after:
                early.append((before, after))
    arrivals = sorted(r.at for r in log)
    during = []
    for r in log:
        if r.status == 429:
            during.append(sum(1 for a in arrivals if r.at < a < r.at + r.retry_after))
    return early, during


@pytest.mark.parametrize(
    "tickers",
    [
        100,
        pytest.param(
            2_000,
            marks=[
                pytest.mark.benchmark,
                pytest.mark.skipif(
                    os.environ.get("RUN_BENCHMARKS") != "1",
                    reason="minutes long: RUN_BENCHMARKS=1 runs it",
                ),
            ],
        ),
    ],
)
def test_tickers_through_a_rate_limited_fake_yahoo(yfinance_at, tmp_path, tickers):
    settings, names = _settings(tmp_path, tickers)
    with FakeYahoo(rate=50.0, burst=10, retry_after=1.0, today=AS_OF) as fake:
        yfinance_at(fake.url)
        session = _local_only(curl_requests.Session(), fake.url)
        source = YahooSource(
            settings.yahoo_max_retries, settings.yahoo_backoff_seconds, session=session
        )
        started = time.monotonic()
        result = ingest_all(names, AS_OF, settings, source=source)
        wall = time.monotonic() - started
        log = list(fake.log)

    refused = [r for r in log if r.status == 429]
    early, during = _early_requests(log)
    print(
        f"\n{tickers} tickers in {wall:.1f} s: {len(log)} requests, {len(refused)} answered 429; "
        f"requests during another 429's Retry-After: at most {max(during, default=0)}"
    )
    assert result["failed"] == {}
    assert sorted(result["staged"]) == sorted(names)
    assert refused, "the rate limit never bit: the test proves nothing about 429 handling"
    assert early == [], f"{len(early)} request(s) before their ticker's Retry-After ran out"
    # Requests already on their way when a 429 was answered can still arrive: the other
    # downloads in flight, and one sent while the 429 itself was on the wire. A client that
    # ignored the 429 would send many more.
    assert max(during) <= CONCURRENCY

    store = PriceStore(settings.data_dir)
    universe = load_universe(settings.universe_file)
    sessions = weekdays(START, AS_OF)
    for ticker in names:
        staged = store.read_staged(universe.get(ticker), AS_OF)
        expected = pd.DataFrame(bars_for(ticker, sessions))
        assert [d.date() for d in staged["Date"]] == sessions, ticker
        for column, key in (("Open", "open"), ("High", "high"), ("Low", "low"),
                            ("Close", "close"), ("Adj Close", "adjclose"), ("Volume", "volume")):  # fmt: skip
            assert staged[column].tolist() == pytest.approx(expected[key].tolist()), (
                ticker,
                column,
            )
