"""ml.data.yahoo against Yahoo Finance answers replayed at the HTTP session layer (fixtures written
offline in Yahoo's v8 format, not captures: tests/fixtures/yahoo/README.md).

yfinance runs for real (cookie/crumb handling, time-zone probe, v8 chart parsing, error branches):
only `session.request` is answered from tests/fixtures/yahoo/*.json. Any request without a recorded
answer raises, and a guard makes every other curl_cffi session refuse to touch the network.
"""

from __future__ import annotations

import json
from datetime import date, datetime, time
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pytest

# Imported at collection, not inside a test: yfinance installs a warnings filter on import that
# would otherwise outrank pytest's for that test (and show pandas-3 deprecations from yfinance).
import yfinance  # noqa: F401
from curl_cffi import requests as curl_requests
from curl_cffi.requests.exceptions import ConnectionError as CurlConnectionError

from ml.data.schema import OUTPUT_COLUMNS, PRICE_COLUMNS, PriceSourceError
from ml.data.sources import YahooSource
from ml.data.yahoo import YahooError, YahooRateLimited, YahooTickerNotFound, fetch_yahoo
from ml.universe import Instrument
from tests.fixtures.yahoo.replay import (
    FIXTURE_DIR,
    ReplayMiss,
    ReplaySession,
    load_interactions,
    load_responses,
    record,
)

JUNE_3, JUNE_14 = date(2024, 6, 3), date(2024, 6, 14)
SESSIONS = [
    date(2024, 6, d) for d in (3, 4, 5, 6, 7, 10, 11, 12, 13, 14)
]  # the ten sessions recorded
ERRORS = load_responses()
CHART = "/v8/finance/chart/"


# --- isolation -----------------------------------------------------------------------------------


def _refuse_network(self, method, url, *args, **kwargs):
    raise AssertionError(f"real network call attempted: {method} {url}")


@pytest.fixture(autouse=True)
def offline_yfinance(monkeypatch):
    """No network, no on-disk yfinance caches, and yfinance's process-wide state restored."""
    import requests
    import yfinance.base
    from yfinance import cache
    from yfinance.data import YfData

    monkeypatch.setattr(curl_requests.Session, "request", _refuse_network)
    monkeypatch.setattr(requests.Session, "request", _refuse_network)
    monkeypatch.setattr(cache._TzCacheManager, "_tz_cache", cache._TzCacheDummy())
    monkeypatch.setattr(cache._CookieCacheManager, "_Cookie_cache", cache._CookieCacheDummy())
    # yfinance asks quoteSummary for a missing time zone only twice per process: reset the budget.
    monkeypatch.setattr(yfinance.base, "_tz_info_fetch_ctr", 0)
    data = YfData()  # the singleton every Ticker shares; a session passed in replaces its own
    monkeypatch.setattr(data, "_session", data._session)
    for attr, value in (("_crumb", None), ("_cookie", None), ("_cookie_strategy", "basic")):
        monkeypatch.setattr(data, attr, value)
    YfData.cache_get.cache_clear()
    hide = yfinance.config.debug.hide_exceptions
    yield
    YfData.cache_get.cache_clear()
    assert yfinance.config.debug.hide_exceptions == hide, "fetch_yahoo leaked a config change"


@pytest.fixture
def replay():
    """Factory of replay sessions; fails the test if yfinance asked for anything unrecorded."""
    sessions: list[ReplaySession] = []

    def make(*fixtures: str, interactions: tuple | list = ()) -> ReplaySession:
        session = ReplaySession("session.json", *fixtures, interactions=interactions)
        sessions.append(session)
        return session

    yield make
    for session in sessions:
        assert not session.misses, f"unrecorded requests: {session.misses}"


class Sleeps(list):
    """An injected `sleep` that records instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def no_jitter() -> float:
    """The jitter draw that makes the factor exactly 1 (the draw is from [0, 1), factor 0.5 + draw)."""
    return 0.5


def recorded_chart(fixture: str, ticker: str) -> dict:
    """chart.result[0] of the recorded period1/period2 answer for `ticker`."""
    for exchange in load_interactions(fixture):
        req = exchange["request"]
        if req["url"].endswith(CHART + ticker) and "period1" in req["params"]:
            return exchange["response"]["json"]["chart"]["result"][0]
    raise LookupError(ticker)


def midnight(day: date, tz: str) -> int:
    return int(datetime.combine(day, time(0), ZoneInfo(tz)).timestamp())


# The query of GOOGL's recorded history call (June 3..14), for scripting answers to that call only.
GOOGL_HISTORY = {"period1": str(midnight(JUNE_3, "America/New_York"))}


# --- happy paths ---------------------------------------------------------------------------------


def test_googl_daily_bars_parsed_by_real_yfinance(replay):
    session = replay("GOOGL.json")
    sleeps = Sleeps()
    df = fetch_yahoo("GOOGL", JUNE_3, JUNE_14, session=session, sleep=sleeps, jitter=no_jitter)

    assert list(df.columns) == PRICE_COLUMNS
    assert str(df["Date"].dtype) == "datetime64[ns]"
    assert all(str(df[c].dtype) == "float64" for c in PRICE_COLUMNS[1:])
    assert not isinstance(df.columns, pd.MultiIndex)
    assert df["Date"].dt.tz is None
    assert (df["Date"] == df["Date"].dt.normalize()).all()
    # Inclusive end: the 2024-06-14 session is there, and yfinance was asked up to 06-15 00:00 NY.
    assert [d.date() for d in df["Date"]] == SESSIONS
    history_call = session.chart_calls("GOOGL")[-1]
    assert history_call.params["period1"] == str(midnight(JUNE_3, "America/New_York"))
    assert history_call.params["period2"] == str(midnight(date(2024, 6, 15), "America/New_York"))

    recorded = recorded_chart("GOOGL.json", "GOOGL")
    quote = recorded["indicators"]["quote"][0]
    for column, key in [("Open", "open"), ("High", "high"), ("Low", "low"), ("Close", "close")]:
        np.testing.assert_array_equal(df[column].to_numpy(), np.array(quote[key]), err_msg=column)
    np.testing.assert_array_equal(df["Volume"].to_numpy(), np.array(quote["volume"], float))
    adjclose = recorded["indicators"]["adjclose"][0]["adjclose"]
    np.testing.assert_array_equal(df["Adj Close"].to_numpy(), np.array(adjclose))

    # auto_adjust=False: Adj Close is Yahoo's dividend-adjusted close, Close stays raw (GOOGL
    # went ex-dividend on 2024-06-10, so earlier adjusted closes are lower).
    assert (df["Adj Close"] <= df["Close"]).all()
    assert (df["Adj Close"] < df["Close"]).any()
    assert sleeps == []


def test_forex_keeps_zero_volume_and_london_session_dates(replay):
    session = replay("EURUSD_X.json")
    df = fetch_yahoo("EURUSD=X", JUNE_3, JUNE_14, session=session, sleep=Sleeps())

    assert list(df.columns) == PRICE_COLUMNS
    # Bars start 00:00 London = 23:00 UTC the day before: dates must not shift back a day.
    assert [d.date() for d in df["Date"]] == SESSIONS
    assert len(df) == 10
    assert (df["Volume"] == 0.0).all() and not df["Volume"].isna().any()
    assert (df["Adj Close"] == df["Close"]).all()
    quote = recorded_chart("EURUSD_X.json", "EURUSD=X")["indicators"]["quote"][0]
    np.testing.assert_array_equal(df["Open"].to_numpy(), np.array(quote["open"]))
    np.testing.assert_array_equal(df["Close"].to_numpy(), np.array(quote["close"]))


def test_valid_ticker_without_sessions_gives_empty_frame(replay):
    session = replay("GOOGL.json")
    sleeps = Sleeps()
    df = fetch_yahoo(
        "GOOGL",
        date(2024, 6, 15),
        date(2024, 6, 16),
        session=session,
        sleep=sleeps,
        jitter=no_jitter,
    )

    assert df.empty
    assert list(df.columns) == PRICE_COLUMNS
    assert str(df["Date"].dtype) == "datetime64[ns]"
    assert sleeps == []


# --- rate limits and transient errors ------------------------------------------------------------


def test_rate_limit_then_success_backs_off_exponentially(replay):
    session = replay("GOOGL.json")
    # yfinance itself re-sends a failed request once (other cookie strategy) before raising
    # YFRateLimitError, so four 429s make two failed attempts.
    session.script(CHART + "GOOGL", *[ERRORS["rate_limited"]] * 4)
    sleeps = Sleeps()

    df = fetch_yahoo(
        "GOOGL",
        JUNE_3,
        JUNE_14,
        backoff_seconds=0.5,
        session=session,
        sleep=sleeps,
        jitter=no_jitter,
    )

    assert sleeps == [0.5, 1.0]
    assert [d.date() for d in df["Date"]] == SESSIONS
    assert [c.status for c in session.chart_calls("GOOGL")][:4] == [429] * 4


def test_persistent_rate_limit_raises_after_max_retries(replay):
    session = replay("GOOGL.json")
    session.script(CHART + "GOOGL", ERRORS["rate_limited"], forever=True)
    sleeps = Sleeps()

    with pytest.raises(YahooRateLimited) as info:
        fetch_yahoo(
            "GOOGL",
            JUNE_3,
            JUNE_14,
            max_retries=3,
            backoff_seconds=1.0,
            session=session,
            sleep=sleeps,
            jitter=no_jitter,
        )

    assert sleeps == [1.0, 2.0, 4.0]
    message = str(info.value)
    assert "GOOGL" in message and "4 attempts" in message and "429" in message
    assert isinstance(info.value, YahooError) and isinstance(info.value, PriceSourceError)
    assert len(session.chart_calls("GOOGL")) >= 4


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(ERRORS["server_error"], id="500-chart-error-json"),
        pytest.param(ERRORS["bad_gateway"], id="502-html"),
        pytest.param(
            CurlConnectionError("Failed to connect to query2.finance.yahoo.com", 7),
            id="connection-error",
        ),
    ],
)
@pytest.mark.parametrize("stage", ["timezone-probe", "history"])
def test_transient_error_then_success_is_retried(replay, failure, stage):
    session = replay("GOOGL.json")
    params = {"range": "1d"} if stage == "timezone-probe" else GOOGL_HISTORY
    session.script(CHART + "GOOGL", failure, failure, params=params)
    # A 500 on the time-zone probe sends yfinance to quoteSummary: Yahoo is failing there too.
    session.script("/v10/finance/quoteSummary/GOOGL", ERRORS["server_error"], forever=True)
    sleeps = Sleeps()

    df = fetch_yahoo(
        "GOOGL",
        JUNE_3,
        JUNE_14,
        backoff_seconds=2.0,
        session=session,
        sleep=sleeps,
        jitter=no_jitter,
    )

    assert sleeps == ([2.0, 4.0] if isinstance(failure, Exception) else [2.0])
    assert [d.date() for d in df["Date"]] == SESSIONS


def test_server_error_on_timezone_probe_is_not_mistaken_for_unknown_ticker(replay, monkeypatch):
    """yfinance reports a 500 on its time-zone probe as 'possibly delisted; no timezone found'
    (YFTzMissingError) once its quoteSummary fallback budget is spent: the HTTP status decides."""
    import yfinance.base

    monkeypatch.setattr(yfinance.base, "_tz_info_fetch_ctr", 2)
    session = replay("GOOGL.json")
    session.script(
        CHART + "GOOGL", ERRORS["server_error"], ERRORS["server_error"], params={"range": "1d"}
    )
    sleeps = Sleeps()

    df = fetch_yahoo("GOOGL", JUNE_3, JUNE_14, session=session, sleep=sleeps, jitter=no_jitter)

    assert sleeps == [2.0]
    assert len(df) == len(SESSIONS)


def test_persistent_server_error_raises_yahoo_error(replay):
    session = replay("GOOGL.json")
    session.script(CHART + "GOOGL", ERRORS["bad_gateway"], forever=True)
    sleeps = Sleeps()

    with pytest.raises(YahooError) as info:
        fetch_yahoo(
            "GOOGL", JUNE_3, JUNE_14, max_retries=2, session=session, sleep=sleeps, jitter=no_jitter
        )

    assert not isinstance(info.value, (YahooRateLimited, YahooTickerNotFound))
    assert "GOOGL" in str(info.value) and "3 attempts" in str(info.value)
    assert "502" in str(info.value)
    assert sleeps == [2.0, 4.0]


# --- unknown tickers -----------------------------------------------------------------------------


@pytest.mark.parametrize("fallback_budget_left", [True, False], ids=["quoteSummary-404", "no-tz"])
def test_unknown_ticker_raises_not_found_without_retry(replay, monkeypatch, fallback_budget_left):
    import yfinance.base

    if not fallback_budget_left:  # later in a process yfinance gives up with YFTzMissingError
        monkeypatch.setattr(yfinance.base, "_tz_info_fetch_ctr", 2)
    session = replay("NOSUCHTICKER.json")
    sleeps = Sleeps()

    with pytest.raises(YahooTickerNotFound) as info:
        fetch_yahoo(
            "NOSUCHTICKER", JUNE_3, JUNE_14, session=session, sleep=sleeps, jitter=no_jitter
        )

    assert sleeps == []
    assert "NOSUCHTICKER" in str(info.value) and "unknown or delisted" in str(info.value)
    assert info.value.__cause__ is not None  # yfinance's own exception, chained
    # One attempt only (yfinance re-sends a 4xx once itself).
    assert len(session.chart_calls("NOSUCHTICKER")) <= 2
    quote_summary = [c for c in session.calls if "quoteSummary" in c.url]
    assert bool(quote_summary) == fallback_budget_left


# --- through the price source --------------------------------------------------------------------


def test_yahoo_source_fetch_uses_the_session(replay):
    session = replay("EURUSD_X.json")
    source = YahooSource(max_retries=0, backoff_seconds=0.0, session=session)

    df = source.fetch(Instrument("EURUSD=X", "forex"), JUNE_3, JUNE_14)

    assert list(df.columns) == OUTPUT_COLUMNS
    assert (df["Ticker"] == "EURUSD=X").all()
    assert [d.date() for d in df["Date"]] == SESSIONS
    assert (df["Volume"] == 0.0).all()


def test_yahoo_source_unknown_ticker_is_a_price_source_error(replay):
    source = YahooSource(max_retries=3, backoff_seconds=0.0, session=replay("NOSUCHTICKER.json"))

    with pytest.raises(PriceSourceError, match="NOSUCHTICKER"):
        source.fetch(Instrument("NOSUCHTICKER", "stock"), JUNE_3, JUNE_14)


# --- the replay itself ---------------------------------------------------------------------------


def test_unrecorded_request_fails_loudly(replay):
    session = replay("GOOGL.json")

    with pytest.raises(YahooError, match="no recorded response") as info:
        fetch_yahoo("GOOGL", date(2024, 5, 1), date(2024, 5, 31), session=session, sleep=Sleeps())

    assert "ReplayMiss" in str(info.value)
    assert session.misses and "period1" in session.misses[0].params
    session.misses.clear()  # expected here; the fixture would fail the test otherwise


def test_real_network_is_refused():
    with pytest.raises(AssertionError, match="real network call attempted"):
        curl_requests.Session().get("https://query2.finance.yahoo.com/v8/finance/chart/GOOGL")


def test_fixtures_are_yahoo_v8_chart_answers():
    for name in ("GOOGL.json", "EURUSD_X.json"):
        doc = json.loads((FIXTURE_DIR / name).read_text())
        for exchange in doc["interactions"]:
            chart = exchange["response"]["json"]["chart"]
            assert chart["error"] is None
            result = chart["result"][0]
            meta = result["meta"]
            assert meta["dataGranularity"] == "1d"
            assert meta["exchangeTimezoneName"] in ("America/New_York", "Europe/London")
            assert meta["instrumentType"] in ("EQUITY", "CURRENCY")
            assert set(meta["validRanges"]) >= {"1d", "5d", "1mo", "max"}
            if "timestamp" in result:
                quote = result["indicators"]["quote"][0]
                n = len(result["timestamp"])
                assert all(len(quote[k]) == n for k in ("open", "high", "low", "close", "volume"))
                assert len(result["indicators"]["adjclose"][0]["adjclose"]) == n
    with pytest.raises(ReplayMiss):
        ReplaySession().get("https://fc.yahoo.com")


def test_record_writes_replayable_fixtures(tmp_path, monkeypatch):
    """record() (normally against the real network) here records from a replay: its file must
    replay to the same frame, with the crumb redacted."""
    upstream = ReplaySession("session.json", "GOOGL.json", "NOSUCHTICKER.json")

    def fake_network(self, method, url, **kwargs):
        return upstream.request(method, url, **kwargs)

    monkeypatch.setattr(curl_requests.Session, "request", fake_network)
    path = record("GOOGL", JUNE_3, JUNE_14, out=tmp_path / "GOOGL.recorded.json")
    assert record("GOOGL", date(2024, 6, 15), date(2024, 6, 16), out=path) == path  # appends
    with pytest.raises(YahooTickerNotFound):  # written first, then re-raised
        record("NOSUCHTICKER", JUNE_3, JUNE_14, out=path)
    assert not upstream.misses

    doc = json.loads(path.read_text())
    urls = [e["request"]["url"] for e in doc["interactions"]]
    assert any(u.endswith("/v8/finance/chart/GOOGL") for u in urls)
    assert len(urls) == len({json.dumps(e["request"], sort_keys=True) for e in doc["interactions"]})
    crumbs = [e for e in doc["interactions"] if e["request"]["url"].endswith("/getcrumb")]
    assert crumbs and all(e["response"]["text"] == "REDACTEDcrumb" for e in crumbs)

    assert len(doc["recordings"]) == 3 and "YahooTickerNotFound" in doc["recordings"][2]

    replayed = fetch_yahoo("GOOGL", JUNE_3, JUNE_14, session=ReplaySession(str(path)))
    assert fetch_yahoo(
        "GOOGL", date(2024, 6, 15), date(2024, 6, 16), session=ReplaySession(str(path))
    ).empty
    with pytest.raises(YahooTickerNotFound):
        fetch_yahoo("NOSUCHTICKER", JUNE_3, JUNE_14, session=ReplaySession(str(path)))
    original = fetch_yahoo(
        "GOOGL", JUNE_3, JUNE_14, session=ReplaySession("session.json", "GOOGL.json")
    )
    pd.testing.assert_frame_equal(replayed, original)


# --- Retry-After, jitter, empty answers ----------------------------------------------------------


def test_rate_limit_honours_retry_after_and_caps_it(replay):
    session = replay("GOOGL.json")
    polite = {
        **ERRORS["rate_limited"],
        "headers": {**ERRORS["rate_limited"]["headers"], "Retry-After": "7"},
    }
    rude = {**polite, "headers": {**polite["headers"], "Retry-After": "86400"}}
    # Two 429s per failed attempt (yfinance re-sends once itself, held by the Retry-After too).
    session.script(CHART + "GOOGL", polite, polite, rude, rude)
    sleeps = Sleeps()

    df = fetch_yahoo(
        "GOOGL",
        JUNE_3,
        JUNE_14,
        backoff_seconds=0.5,
        session=session,
        sleep=sleeps,
        jitter=no_jitter,
    )

    # Retry-After when longer than the backoff, capped at 120 s: before yfinance's re-send (the
    # rest of the wait: the clock ran a little since the 429), then before the next attempt.
    assert sleeps == [
        pytest.approx(7.0, abs=0.5),
        7.0,
        pytest.approx(120.0, abs=0.5),
        120.0,
    ]
    assert [d.date() for d in df["Date"]] == SESSIONS


def test_backoff_is_jittered(replay):
    session = replay("GOOGL.json")
    # Two 500s per failed attempt on the history call (yfinance re-sends once itself).
    session.script(CHART + "GOOGL", *[ERRORS["server_error"]] * 4, params=GOOGL_HISTORY)
    draws = iter([0.0, 0.999])
    sleeps = Sleeps()

    fetch_yahoo(
        "GOOGL",
        JUNE_3,
        JUNE_14,
        backoff_seconds=2.0,
        session=session,
        sleep=sleeps,
        jitter=lambda: next(draws),
    )

    assert sleeps == [pytest.approx(1.0), pytest.approx(4 * 1.499)]  # 2 x 0.5, then 4 x 1.499


def _empty_chart() -> dict:
    """The recorded answer of a range without sessions (a weekend): a valid, empty chart."""
    for exchange in load_interactions("GOOGL.json"):
        req = exchange["request"]
        if req["url"].endswith(CHART + "GOOGL") and req["params"].get("period1") == str(
            midnight(date(2024, 6, 15), "America/New_York")
        ):
            return exchange["response"]
    raise LookupError("no recorded weekend answer")


def test_an_empty_answer_for_a_long_range_is_retried_before_it_is_believed(replay):
    """A transient empty chart for a 12-day range (every market trades in a week): asked again,
    and the full answer that follows is used (yfinance's real parsing on both)."""
    session = replay("GOOGL.json")
    session.script(
        CHART + "GOOGL",
        _empty_chart(),
        params=GOOGL_HISTORY,
    )
    sleeps = Sleeps()

    df = fetch_yahoo("GOOGL", JUNE_3, JUNE_14, session=session, sleep=sleeps, jitter=no_jitter)

    assert sleeps == [2.0]
    assert [d.date() for d in df["Date"]] == SESSIONS


def test_an_empty_answer_that_persists_is_returned_after_the_retries(replay):
    session = replay("GOOGL.json")
    session.script(
        CHART + "GOOGL",
        _empty_chart(),
        params=GOOGL_HISTORY,
        forever=True,
    )
    sleeps = Sleeps()

    df = fetch_yahoo(
        "GOOGL", JUNE_3, JUNE_14, max_retries=2, session=session, sleep=sleeps, jitter=no_jitter
    )

    assert df.empty and list(df.columns) == PRICE_COLUMNS  # validation then reports "no rows"
    assert sleeps == [2.0, 4.0]


def test_a_truncated_body_is_retried(replay):
    session = replay("GOOGL.json")
    truncated = {
        "status_code": 200,
        "reason": "OK",
        "headers": {"content-type": "application/json;charset=utf-8"},
        "text": '{"chart":{"result":[{"meta":{"currency":"USD","symbol":"GOO',
    }
    session.script(CHART + "GOOGL", truncated, truncated, params=GOOGL_HISTORY)
    sleeps = Sleeps()

    df = fetch_yahoo("GOOGL", JUNE_3, JUNE_14, session=session, sleep=sleeps, jitter=no_jitter)

    assert sleeps and sleeps[0] == 2.0
    assert [d.date() for d in df["Date"]] == SESSIONS


# --- corporate actions through yfinance ----------------------------------------------------------


def _chart_answer(bars: pd.DataFrame, start: date, end: date, events: dict) -> dict:
    """A v8 chart exchange for GOOGL's [start, end]: the bars of `bars` in that span (float32,
    as Yahoo sends them) and the split/dividend `events` ({date: {...}}) dated in it."""
    from tests.fixtures.yahoo.build_fixtures import CHART as CHART_URL
    from tests.fixtures.yahoo.build_fixtures import get, googl_meta, period_params, ts

    ny = "America/New_York"
    span = bars.loc[(bars["Date"] >= pd.Timestamp(start)) & (bars["Date"] <= pd.Timestamp(end))]
    stamps = [ts(d.date(), time(9, 30), ny) for d in span["Date"]]
    quote = {c.lower(): [float(np.float32(v)) for v in span[c]] for c in PRICE_COLUMNS[1:5]}
    quote["volume"] = [int(v) for v in span["Volume"]]
    found: dict = {}
    for day, event in events.items():
        if start.isoformat() <= day <= end.isoformat():
            stamp = ts(day, time(9, 30), ny)
            kind = "splits" if "numerator" in event else "dividends"
            found.setdefault(kind, {})[str(stamp)] = {**event, "date": stamp}
    result = {
        "meta": googl_meta("", float(np.float32(span["Close"].iloc[0]))),
        "timestamp": stamps,
        **({"events": found} if found else {}),
        "indicators": {
            "quote": [quote],
            "adjclose": [{"adjclose": [float(np.float32(v)) for v in span["Adj Close"]]}],
        },
    }
    body = {"chart": {"result": [result], "error": None}}
    return get(CHART_URL + "GOOGL", period_params(start, end, ny), 200, body)


YAHOO_EVENTS = {  # name: (d0, d1, the event, the vendor's series before and after, described)
    "split-2-1": ("2024-06-21", "2024-06-24", {"2024-06-24": {"numerator": 2, "denominator": 1,
                  "splitRatio": "2:1"}}, 2.0, None, "split 2:1 on 2024-06-24"),
    "reverse-split-1-10": ("2024-06-21", "2024-06-24", {"2024-06-24": {"numerator": 1,
                           "denominator": 10, "splitRatio": "1:10"}}, 0.1, None,
                           "split 1:10 on 2024-06-24"),
    "dividend-1pct": ("2024-06-21", "2024-06-24", {"2024-06-24": {"amount": 1.8}}, None, 0.99,
                      "dividend on 2024-06-24"),
    "split-on-a-holiday": ("2024-07-03", "2024-07-05", {"2024-07-04": {"numerator": 2,
                           "denominator": 1, "splitRatio": "2:1"}}, 2.0, None,
                           "split 2:1 on 2024-07-05"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(YAHOO_EVENTS))
def test_a_corporate_action_through_yfinance_is_healed(name, replay, tmp_path):
    """The real yfinance client and source, replayed chart answers (written offline, in Yahoo's
    format) of a vendor before and after the event: the store ends equal to a full fetch."""
    from dataclasses import replace as replace_settings
    from datetime import timedelta

    from ml.config import get_settings
    from ml.data.ingest import stage_ticker
    from ml.data.revisions import max_relative_difference
    from ml.data.sources import SyntheticSource
    from ml.data.store import PriceStore
    from ml.quality.publish import publish_staged

    d0_text, d1_text, events, split, dividend, described = YAHOO_EVENTS[name]
    d0, d1, start = date.fromisoformat(d0_text), date.fromisoformat(d1_text), date(2024, 5, 1)
    googl = Instrument("GOOGL", "stock")
    bars = SyntheticSource().fetch(googl, start, d1).drop(columns="Ticker")
    bars = bars.loc[bars["Date"] != pd.Timestamp("2024-07-04")].reset_index(drop=True)
    prices = ["Open", "High", "Low", "Close", "Adj Close"]
    bars[prices] = bars[prices].astype("float32").astype("float64")
    before, after = bars.copy(), bars.copy()
    if split:  # the vendor served every earlier bar `split` times higher before the event
        before[prices] *= split
        before["Volume"] = (before["Volume"] / split).round()
    if dividend:
        event_day = pd.Timestamp(next(iter(events)))
        after.loc[after["Date"] < event_day, "Adj Close"] *= dividend
    settings = replace_settings(
        get_settings({}), data_dir=tmp_path / "data", history_start=start, price_source="yahoo"
    )
    window = lambda day: day - timedelta(days=settings.trailing_days)  # noqa: E731
    old_vendor = replay(
        "GOOGL.json", interactions=[_chart_answer(before, start, d0, {})]
    )  # before the event: no event yet
    new_vendor = replay(
        "GOOGL.json",
        interactions=[_chart_answer(after, s, d1, events) for s in (window(d0), start, window(d1))],
    )
    store = PriceStore(settings.data_dir)

    def day(session, as_of):
        source = YahooSource(max_retries=0, backoff_seconds=0.0, session=session)
        staged = stage_ticker(googl, as_of, settings, source)
        return staged, publish_staged(googl, as_of, settings)

    day(old_vendor, d0)
    staged, published = day(new_vendor, d1)
    assert staged.revision["replace"] and staged.revision["kind"] != "correction", staged
    assert published["revision"].startswith(described), published
    if split:
        assert staged.revision["vendor_event"].endswith(
            f"split {events[next(iter(events))]['splitRatio']}"
        )
    fresh = YahooSource(max_retries=0, session=new_vendor).fetch(googl, start, d1)
    history = store.load(googl)
    assert max_relative_difference(fresh, history) < 1e-6
    assert np.abs(np.diff(np.log(history["Close"]))).max() < 0.3  # no fake crash or jump

    files_before = {p: p.read_bytes() for p in sorted(settings.data_dir.rglob("*")) if p.is_file()}
    _, again = day(new_vendor, d1)  # a re-run of the date: nothing changes
    files_after = {p: p.read_bytes() for p in sorted(settings.data_dir.rglob("*")) if p.is_file()}
    assert files_after == files_before and again["revision"] == published["revision"]
