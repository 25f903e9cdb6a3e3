"""Daily bars from Yahoo Finance through yfinance, with errors raised, classified and retried.

yfinance hides failures by default (`yf.download` only logs them; `Ticker.history` logs and returns
an empty frame unless `yf.config.debug.hide_exceptions` is False), and the exceptions it does raise
do not always say what Yahoo answered: a 500 on the time-zone probe surfaces as
"possibly delisted; no timezone found", a 404 as an `HTTPError` from its quoteSummary fallback.
So `fetch_yahoo`:

* calls `yf.Ticker(ticker, session=session).history(..., auto_adjust=False)` with
  `hide_exceptions` switched off for the call;
* watches the HTTP status codes of the Yahoo data calls the session makes for that attempt (a thin
  wrapper around `session.request`, installed once per session; it only records, never alters);
* clears yfinance's in-process response cache (`YfData.cache_get`, an lru_cache that also keeps
  error responses) before each attempt, so a retry really asks Yahoo again;
* classifies the outcome: HTTP 429 / `YFRateLimitError` -> retry, then `YahooRateLimited`;
  HTTP 5xx, connection errors, timeouts, non-JSON bodies -> retry, then `YahooError`;
  HTTP 404 or an unresolvable ticker -> `YahooTickerNotFound` at once; a valid ticker with no
  sessions in the range -> an empty frame, except that an empty answer for a range of at least
  `EMPTY_RETRY_DAYS` calendar days (every market trades in a week; the daily trailing window is
  10 days) is retried first, since Yahoo sometimes answers a transient empty chart; anything else
  -> `YahooError` at once.

Retries wait `backoff_seconds * 2**attempt` (attempt = 0, 1, ...) times a jitter factor drawn
from [0.5, 1.5) (so many workers do not retry in step), or the 429 answer's `Retry-After`
seconds when that is longer (at most `MAX_RETRY_AFTER_SECONDS`), through the injected `sleep`;
`max_retries` counts the retries, so at most `max_retries + 1` attempts are made.
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

from ml.data.schema import PRICE_COLUMNS, PriceSourceError, empty_prices

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_SECONDS = 30.0
# An empty answer for at least this many calendar days is retried before it is believed.
EMPTY_RETRY_DAYS = 7
# The longest `Retry-After` of a 429 that is honoured (a longer one is capped, not ignored).
MAX_RETRY_AFTER_SECONDS = 120.0
# Yahoo endpoints whose status code tells about the ticker (cookie/crumb/consent calls do not).
_DATA_PATHS = ("/v8/finance/chart/", "/v10/finance/quoteSummary/", "/v7/finance/quote")
_TRANSIENT_NAMES = frozenset(
    {
        "Timeout",
        "TimeoutError",
        "ConnectTimeout",
        "ReadTimeout",
        "ConnectionError",
        "ChunkedEncodingError",
        "RemoteDisconnected",
        "IncompleteRead",
        "DNSError",
        "SSLError",
        "ProxyError",
    }
)


class YahooError(PriceSourceError):
    """Yahoo Finance did not deliver bars for a ticker."""


class YahooRateLimited(YahooError):
    """Yahoo Finance kept answering HTTP 429 Too Many Requests through every retry."""


class YahooTickerNotFound(YahooError):
    """Yahoo Finance does not know the ticker (unknown or delisted symbol)."""


# --- observing the HTTP status codes of one attempt ---------------------------------------------


@dataclass(frozen=True)
class _Exchange:
    url: str
    status: int | None
    error: BaseException | None = None
    retry_after: str | None = None  # the Retry-After header of the answer, if any


_exchanges: contextvars.ContextVar[list[_Exchange] | None] = contextvars.ContextVar(
    "ml_yahoo_exchanges", default=None
)
# The `sleep` of the fetch running in this context (injected by tests).
_sleep: contextvars.ContextVar[Callable[[float], object]] = contextvars.ContextVar(
    "ml_yahoo_sleep", default=time.sleep
)


def _seconds(value: str | None) -> float | None:
    """A `Retry-After` in seconds (an HTTP date is not used), or None."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


class _Cooldown:
    """The `Retry-After` of a session's latest 429, for every request of that session.

    Yahoo limits a client, not a ticker: after a 429 no request of the session (the other
    tickers' downloads in other threads, yfinance's own immediate re-send of the refused request)
    may leave before the wait it asked for (capped at MAX_RETRY_AFTER_SECONDS) is over. A thread
    whose retry loop already slept through the deadline (`served`) does not wait again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until = 0.0
        self._served = threading.local()

    def hold(self, seconds: float) -> None:
        until = time.monotonic() + min(seconds, MAX_RETRY_AFTER_SECONDS)
        with self._lock:
            self._until = max(self._until, until)

    def served(self, up_to: float) -> None:
        """This thread slept until `up_to` (time.monotonic): a deadline up to it is waited out."""
        with self._lock:
            self._served.until = min(self._until, up_to)

    def wait(self, sleep: Callable[[float], object]) -> None:
        while True:
            with self._lock:
                until = self._until
            if getattr(self._served, "until", 0.0) >= until:
                return
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            sleep(remaining)
            self._served.until = until  # then again only if another 429 moved the deadline


def _observe(session: Any) -> None:
    """Make `session.request` report each answer to the attempt being run in this context, and
    hold every request of the session while a 429's `Retry-After` runs (`_Cooldown`)."""
    if getattr(session, "_ml_yahoo_observed", False):
        return
    inner = session.request
    cooldown = _Cooldown()

    @functools.wraps(inner)
    def request(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        seen = _exchanges.get()
        cooldown.wait(_sleep.get())
        try:
            response = inner(method, url, *args, **kwargs)
        except BaseException as exc:
            if seen is not None:
                seen.append(_Exchange(url, None, exc))
            raise
        status = getattr(response, "status_code", None)
        retry_after = (getattr(response, "headers", None) or {}).get("Retry-After")
        if status == 429:
            cooldown.hold(_seconds(retry_after) or 0.0)
        if seen is not None:
            seen.append(_Exchange(url, status, None, retry_after))
        return response

    try:
        session.request = request
        session._ml_yahoo_cooldown = cooldown
        session._ml_yahoo_observed = True
    except (AttributeError, TypeError):  # a session that refuses attributes: classify blind
        log.debug("cannot observe %r; classifying Yahoo errors from exceptions only", session)


class _RaiseErrors:
    """Switch yfinance's `hide_exceptions` off while at least one fetch runs (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved: Any = None

    @contextmanager
    def __call__(self, config: Any) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                self._saved = config.debug.hide_exceptions
                config.debug.hide_exceptions = False
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    config.debug.hide_exceptions = self._saved


_raise_errors = _RaiseErrors()


# --- classification ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Failure:
    kind: str  # "rate_limited" | "transient" | "not_found" | "empty" | "error"
    detail: str
    exc: BaseException | None = None
    retry_after: float | None = None  # seconds a 429 asked for


def _retry_after(seen: list[_Exchange]) -> float | None:
    """The longest `Retry-After` (in seconds; an HTTP date is not used) of this attempt's 429s."""
    waits = [_seconds(e.retry_after) for e in seen if e.status == 429]
    waits = [w for w in waits if w is not None]
    return max(waits) if waits else None


def _is_data_url(url: str) -> bool:
    return any(p in url for p in _DATA_PATHS)


def _is_transient(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & _TRANSIENT_NAMES:
        return True
    if isinstance(exc, json.JSONDecodeError):  # an HTML error page or a truncated body
        return True
    # yfinance's YFDataException for Yahoo's "Will be right back" maintenance page:
    return "CURRENTLY DOWN" in str(exc)


def _classify(exc: BaseException, seen: list[_Exchange]) -> _Failure:
    from yfinance.exceptions import (
        YFPricesMissingError,
        YFRateLimitError,
        YFTzMissingError,
    )

    # `seen` holds this attempt's exchanges only (the context variable is per thread).
    codes = [e.status for e in seen if e.status is not None and _is_data_url(e.url)]
    response = getattr(exc, "response", None)
    if getattr(response, "status_code", None) is not None:
        codes.append(response.status_code)
    status = f"HTTP {', '.join(map(str, dict.fromkeys(codes)))}" if codes else "no HTTP answer"
    what = f"{type(exc).__name__}: {exc}"

    if isinstance(exc, YFRateLimitError) or 429 in codes:
        return _Failure("rate_limited", "HTTP 429 Too Many Requests", exc, _retry_after(seen))
    server = [c for c in codes if c >= 500]
    if server:
        return _Failure("transient", f"HTTP {server[-1]} from Yahoo ({what})", exc)
    if _is_transient(exc):
        return _Failure("transient", f"{what} ({status})", exc)
    reason = getattr(exc, "yahoo_reason", None) or ""
    if 404 in codes or "symbol may be delisted" in reason or isinstance(exc, YFTzMissingError):
        return _Failure("not_found", f"{status}; {what}", exc)
    if isinstance(exc, YFPricesMissingError) and (not reason or reason.startswith("Data doesn't")):
        return _Failure("empty", what, exc)
    return _Failure("error", f"{what} ({status})", exc)


# --- frames --------------------------------------------------------------------------------------


def _to_price_frame(raw: pd.DataFrame | None, ticker: str, start: date, end: date) -> pd.DataFrame:
    """yfinance's frame (tz-aware DatetimeIndex in the exchange time zone) -> standard columns,
    with the vendor's split and dividend events of the span in `attrs["events"]` (see
    `_events`)."""
    import pandas as pd

    if raw is None or raw.empty:
        return empty_prices(PRICE_COLUMNS)
    missing = [c for c in PRICE_COLUMNS[1:] if c not in raw.columns]
    if missing:
        raise YahooError(
            f"{ticker}: yfinance returned no {missing} column(s) (got {list(raw.columns)})"
        )
    index = pd.DatetimeIndex(raw.index)
    if index.tz is not None:
        index = index.tz_localize(None)  # wall-clock time at the exchange: its session date
    events = _events(raw, index, start, end)
    # yfinance adds a row without prices for an event outside the bars' span (a split on a
    # holiday at the end of the range): the event is kept above, the row is no bar. The test
    # is yfinance's own for dropping empty rows when events are not asked for.
    values = raw[PRICE_COLUMNS[1:]]
    bars = ~(values.isna() | (values == 0)).all(axis=1).to_numpy()
    raw, index = raw.loc[bars], index[bars]
    frame = pd.DataFrame({"Date": index.normalize().astype("datetime64[ns]")})
    for col in PRICE_COLUMNS[1:]:
        frame[col] = raw[col].to_numpy(dtype="float64")
    mask = (frame["Date"] >= pd.Timestamp(start)) & (frame["Date"] <= pd.Timestamp(end))
    frame = frame.loc[mask].sort_values("Date").reset_index(drop=True)
    frame.attrs["events"] = events
    return frame


def _events(
    raw: pd.DataFrame, index: pd.DatetimeIndex, start: date, end: date
) -> list[dict[str, Any]]:
    """Yahoo's split and dividend events in [start, end]: {"date", "split": shares after per
    share before} or {"date", "dividend": amount}, by session date (`index`: the rows' exchange
    wall-clock times; an event on a holiday is reported on the session before it)."""
    import pandas as pd

    out: list[dict[str, Any]] = []
    for column, key in (("Stock Splits", "split"), ("Dividends", "dividend")):
        if column not in raw.columns:
            continue
        values = pd.to_numeric(raw[column], errors="coerce").to_numpy(dtype="float64")
        for day, value in zip(index.normalize(), values, strict=True):
            if value and value == value and start <= day.date() <= end:
                out.append({"date": day.date().isoformat(), key: float(value)})
    return sorted(out, key=lambda e: (e["date"], sorted(e)))


# --- fetch ---------------------------------------------------------------------------------------


def _default_session() -> Any:
    """The session yfinance itself uses (its process-wide YfData singleton's)."""
    from yfinance.data import YfData

    session = getattr(YfData(), "_session", None)
    if session is None:  # pragma: no cover - layout of a future yfinance
        from curl_cffi import requests as curl_requests

        session = curl_requests.Session(impersonate="chrome")
    return session


def _clear_response_cache() -> None:
    from yfinance.data import YfData

    cache_clear = getattr(getattr(YfData, "cache_get", None), "cache_clear", None)
    if cache_clear is not None:
        cache_clear()


def _attempt(
    ticker: str, start: date, end: date, session: Any, sleep: Callable[[float], object]
) -> pd.DataFrame | _Failure:
    import yfinance as yf

    _clear_response_cache()
    seen: list[_Exchange] = []
    token, sleep_token = _exchanges.set(seen), _sleep.set(sleep)
    try:
        with _raise_errors(yf.config):
            raw = yf.Ticker(ticker, session=session).history(
                start=start,
                end=end + timedelta(days=1),  # yfinance's end is exclusive
                interval="1d",
                auto_adjust=False,
                back_adjust=False,
                actions=True,  # the split and dividend events: `ml.data.revisions` reads them
                repair=False,
                keepna=False,
                prepost=False,
                rounding=False,
                timeout=REQUEST_TIMEOUT_SECONDS,
            )
    except Exception as exc:
        return _classify(exc, seen)
    finally:
        _exchanges.reset(token)
        _sleep.reset(sleep_token)
    return _to_price_frame(raw, ticker, start, end)


def fetch_yahoo(
    ticker: str,
    start: date,
    end: date,
    *,
    max_retries: int = 5,
    backoff_seconds: float = 2.0,
    session: Any = None,
    sleep: Callable[[float], object] = time.sleep,
    jitter: Callable[[], float] = random.random,
) -> pd.DataFrame:
    """Daily bars of `ticker` with start <= Date <= end (both inclusive) from Yahoo Finance.

    Returns columns `Date, Open, High, Low, Close, Adj Close, Volume`: `Date` is the session date
    (tz-naive midnight, datetime64[ns]), the others float64; `Adj Close` is Yahoo's dividend and
    split adjusted close, kept apart from `Close`. A valid ticker without sessions in the range
    gives an empty frame with these columns.

    `session`: a curl_cffi (or requests) Session for yfinance; None uses yfinance's own.
    `sleep` and `jitter` (a draw from [0, 1)) are injectable so tests need not wait or guess.
    Raises YahooTickerNotFound (no retry), YahooRateLimited or YahooError (after retries).
    """
    if not isinstance(ticker, str) or not ticker.strip():
        raise YahooError(f"invalid ticker {ticker!r}")
    if start > end:
        raise YahooError(f"{ticker}: start {start} is after end {end}")
    if max_retries < 0 or backoff_seconds < 0:
        raise ValueError("max_retries and backoff_seconds must be >= 0")
    session = _default_session() if session is None else session
    _observe(session)
    cooldown = getattr(session, "_ml_yahoo_cooldown", None)

    attempts = max_retries + 1
    failure: _Failure | None = None
    for attempt in range(attempts):
        last = attempt + 1 == attempts
        outcome = _settle(ticker, start, end, _attempt(ticker, start, end, session, sleep), last)
        if not isinstance(outcome, _Failure):
            return outcome
        failure = outcome
        if not last:
            wait = backoff_seconds * 2**attempt * (0.5 + jitter())
            if failure.retry_after is not None:
                wait = max(wait, min(failure.retry_after, MAX_RETRY_AFTER_SECONDS))
            log.warning(
                "%s: %s on attempt %d/%d; retrying in %.1fs",
                ticker,
                failure.detail,
                attempt + 1,
                attempts,
                wait,
            )
            slept_until = time.monotonic() + wait
            sleep(wait)
            if cooldown is not None:
                cooldown.served(slept_until)
    assert failure is not None  # attempts >= 1
    span = f"{start}..{end}"
    if failure.kind == "rate_limited":
        raise YahooRateLimited(
            f"{ticker}: Yahoo Finance rate limit (HTTP 429 Too Many Requests) persisted through "
            f"{attempts} attempts for {span} (max_retries={max_retries}, "
            f"backoff {backoff_seconds}s doubling, with jitter)"
        ) from failure.exc
    raise YahooError(
        f"{ticker}: Yahoo Finance still failing after {attempts} attempts for {span}: "
        f"{failure.detail}"
    ) from failure.exc


def _settle(
    ticker: str, start: date, end: date, outcome: pd.DataFrame | _Failure, last: bool
) -> pd.DataFrame | _Failure:
    """What one attempt's outcome means: bars to return, a failure worth another attempt, or
    (raised) a failure no retry can cure. An empty answer for a range of a week or more (no
    market has none) is asked again, unless this was the last attempt."""
    long_range = (end - start).days + 1 >= EMPTY_RETRY_DAYS
    if not isinstance(outcome, _Failure):
        if not (outcome.empty and long_range and not last):
            return outcome
        outcome = _Failure("empty", "an empty chart answer")
    if outcome.kind == "empty":
        if not long_range or last:
            log.info("%s: Yahoo has no sessions in %s..%s (%s)", ticker, start, end, outcome.detail)
            return empty_prices(PRICE_COLUMNS)
        return _Failure(
            "transient",
            f"no sessions in {(end - start).days + 1} days ({outcome.detail}), "
            "which no market has: asking again",
            outcome.exc,
        )
    if outcome.kind == "not_found":
        raise YahooTickerNotFound(
            f"{ticker}: unknown or delisted ticker: Yahoo Finance has no data for this symbol "
            f"({outcome.detail}). Check the symbol in the universe file."
        ) from outcome.exc
    if outcome.kind == "error":
        raise YahooError(
            f"{ticker}: Yahoo Finance request failed: {outcome.detail}"
        ) from outcome.exc
    return outcome
