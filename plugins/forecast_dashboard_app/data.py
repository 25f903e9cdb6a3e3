"""The dashboard's data, read-only: the forecasts table, the run reports, and for a ticker's page
its published bars and its ledger rows (forecasts, outcomes, monitor).

A `date` parameter is parsed strictly into a `date` before it is used; file paths are built from
that parsed date, never from the raw input. The settings are read on every request
(`ml.config.get_settings()`), so a new run shows up without restarting the api-server. `ml` and
pandas are imported inside the functions, never at import time.
"""

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any

from .intervals import QUANTILE_COLUMNS, interval_outcomes, number

if TYPE_CHECKING:
    import pandas as pd

    from ml.config import Settings
    from ml.universe import Instrument

_DATE_PATTERN = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_PRICE_COLUMNS = ("last_close", "pred_high", "pred_low", "pred_close", "pred_adj_close")
_TEXT_COLUMNS = ("ticker", "logical_date", "last_bar_date", "model_name", "source")
TICKER_BARS = 120  # the bars a ticker's page draws


class BadDateError(ValueError):
    """The `date` query parameter is not a calendar date written YYYY-MM-DD, or one no run can
    have processed (after today, before HISTORY_START)."""


class DashboardError(RuntimeError):
    """The dashboard cannot read its settings or data (shown as a 500 with this message)."""


class UnknownTickerError(LookupError):
    """A ticker page was asked for a ticker that is not in the universe file (a 404)."""


def parse_date(raw: str | None) -> date | None:
    """The date of `?date=`: None when absent or empty, else a strictly YYYY-MM-DD calendar date."""
    if raw is None or raw == "":
        return None
    if not _DATE_PATTERN.fullmatch(raw):
        shown = raw if len(raw) <= 40 else raw[:40] + "..."
        raise BadDateError(f"invalid date {shown!r}: expected YYYY-MM-DD, for example 2026-11-20")
    try:
        return date.fromisoformat(raw)
    except ValueError as exc:
        raise BadDateError(f"invalid date {raw!r}: {exc}") from None


def check_date(settings: "Settings", day: date | None, today: date | None = None) -> date | None:
    """`day` (from `parse_date`) if a run can have processed it, else BadDateError: the pipeline's
    own check (`ml.config.check_as_of`: not after today in UTC, not before HISTORY_START), so the
    dashboard refuses the dates the CLI and the DAG refuse, with the same message."""
    if day is None:
        return None
    from ml.config import ConfigError, check_as_of

    try:
        return check_as_of(day, settings.history_start, today)
    except ConfigError as exc:
        raise BadDateError(str(exc)) from None


def load_settings() -> "Settings":
    """The pipeline's settings, read now; DashboardError when `ml` is missing or they are invalid."""
    try:
        from ml.config import get_settings

        return get_settings()
    except ImportError as exc:
        raise DashboardError(
            f"cannot import the project's `ml` package ({exc}); put the project root on the "
            "api-server's PYTHONPATH"
        ) from exc
    except ValueError as exc:  # ml.config.ConfigError
        raise DashboardError(f"invalid pipeline settings: {exc}") from exc


def clean(value: Any) -> Any:
    """A JSON- and template-friendly scalar: NaN/NA -> None, numpy scalars -> Python."""
    if value is None:
        return None
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    try:
        if value != value:  # pandas.NA raises TypeError here; NaN-like values are not equal
            return None
    except TypeError:
        return None
    return value


def _forecast_row(record: dict[str, Any]) -> dict[str, Any]:
    """One row of the forecasts table, typed, with its predicted range and change in percent."""
    row = {k: clean(v) for k, v in record.items()}
    for column in _PRICE_COLUMNS:
        row[column] = number(row[column])
    for column in _TEXT_COLUMNS:
        row[column] = None if row[column] is None else str(row[column])
    # Every row has every quantile field, None where the model or the file has none, so the
    # page and the JSON API treat a table written before quantile forecasts like a model without.
    for column in QUANTILE_COLUMNS:
        row[column] = number(row.get(column))
    version = row["model_version"]
    if isinstance(version, float) and version.is_integer():
        version = int(version)
    row["model_version"] = None if version is None else str(version)
    last, high, low, close = (row[c] for c in ("last_close", "pred_high", "pred_low", "pred_close"))
    row["range_pct"] = (high - low) / last * 100 if None not in (last, high, low) and last else None
    row["close_change_pct"] = (
        (close / last - 1) * 100 if None not in (last, close) and last else None
    )
    return row


def load_forecasts(settings: "Settings") -> tuple[bool, list[dict[str, Any]]]:
    """(whether the forecasts table exists, its rows) with NaN as None and numbers as floats."""
    from ml.forecasts.export import FORECAST_COLUMNS, forecasts_path, read_forecasts

    path = forecasts_path(settings)
    if not path.exists():
        return False, []
    try:
        table = read_forecasts(settings)
    except Exception as exc:
        raise DashboardError(f"cannot read the forecasts table {path}: {exc}") from exc
    missing = [c for c in FORECAST_COLUMNS if c not in table.columns]
    if missing:
        raise DashboardError(f"the forecasts table {path} lacks the columns {missing}")
    # The quantile fields are optional: an export written before them lacks the columns.
    columns = [*FORECAST_COLUMNS, *(c for c in QUANTILE_COLUMNS if c in table.columns)]
    columns = list(dict.fromkeys(columns))  # once, should the export's list come to name them
    return True, [_forecast_row(record) for record in table[columns].to_dict("records")]


def valid_dates(values: Iterable[Any]) -> list[date]:
    """The distinct YYYY-MM-DD dates among `values`, sorted; anything else is skipped."""
    dates = set()
    for value in values:
        try:
            parsed = parse_date(value) if isinstance(value, str) else None
        except BadDateError:
            continue
        if parsed is not None:
            dates.add(parsed)
    return sorted(dates)


def report_dates(settings: "Settings") -> list[date]:
    """The dates of the run reports in DATA_DIR/reports, oldest first."""
    folder = settings.data_dir / "reports"
    if not folder.is_dir():
        return []
    return valid_dates(p.stem for p in folder.glob("*.json"))


def load_report(settings: "Settings", as_of: date) -> dict[str, Any] | None:
    """The run report of `as_of` (path built from the parsed date), None when there is none."""
    from ml.steps.report import report_path

    path = report_path(settings, as_of)
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DashboardError(f"the run report {path} is unreadable: {exc}") from exc
    if not isinstance(payload, dict):
        raise DashboardError(f"the run report {path} is not a JSON object")
    return payload


# --- a ticker's page ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TickerData:
    """What a ticker's page shows, as read from the store, the ledger and the latest run report."""

    ticker: str
    bars: list[dict[str, Any]]  # the last TICKER_BARS bars: Date (ISO), High, Low, Close
    forecasts: "pd.DataFrame"  # the ledger's forecasts of this ticker
    scored: "pd.DataFrame"  # its outcomes joined with the forecasts they score
    # every published past forecast's Close interval and whether it held (intervals.py), over the
    # whole published history, not only the bars drawn
    intervals: list[dict[str, Any]]
    monitor_dates: list[Any]  # the days of its monitor rows, oldest first
    lives: list[dict[str, Any]]  # the live metrics of those rows (window -> stats)
    promotion_reason: str | None  # the gate's reason in the latest run report


def find_instrument(settings: "Settings", ticker: str) -> "Instrument":
    """The universe's instrument of `ticker`; UnknownTickerError when it has none."""
    from ml.universe import UniverseError, load_universe

    try:
        return load_universe(settings.universe_file).get(ticker)
    except (UniverseError, KeyError, ValueError) as exc:
        raise UnknownTickerError(str(exc)) from exc


def _latest_promotion_reason(settings: "Settings", ticker: str) -> str | None:
    dates = report_dates(settings)
    if not dates:
        return None
    report = load_report(settings, dates[-1]) or {}
    rows = {r.get("ticker"): r for r in report.get("tickers") or []}
    return (rows.get(ticker) or {}).get("promotion_reason")


def load_ticker(settings: "Settings", ticker: str) -> TickerData:
    """The data of `ticker`'s page; UnknownTickerError when it is not in the universe."""
    from ml.data.store import PriceStore
    from ml.forecasts.ledger import read_table

    instrument = find_instrument(settings, ticker)
    bars = PriceStore(settings.data_dir).load(instrument)
    rows = [
        {"Date": d.date().isoformat(), "High": h, "Low": lo, "Close": c}
        for d, h, lo, c in zip(bars["Date"], bars["High"], bars["Low"], bars["Close"], strict=True)
    ]
    forecasts = read_table(settings, "forecasts")
    forecasts = forecasts.loc[forecasts["ticker"] == instrument.ticker]
    outcomes = read_table(settings, "outcomes")
    outcomes = outcomes.loc[outcomes["ticker"] == instrument.ticker]
    scored = outcomes.merge(forecasts, on=["ticker", "last_bar_date", "model_version"])
    monitor = read_table(settings, "monitor")
    monitor = monitor.loc[monitor["ticker"] == instrument.ticker].sort_values("as_of")
    return TickerData(
        ticker=instrument.ticker,
        bars=rows[-TICKER_BARS:],
        forecasts=forecasts,
        scored=scored,
        intervals=interval_outcomes(forecasts.to_dict("records"), rows),
        monitor_dates=list(monitor["as_of"]),
        lives=[json.loads(v) for v in monitor["live"]],
        promotion_reason=_latest_promotion_reason(settings, instrument.ticker),
    )
