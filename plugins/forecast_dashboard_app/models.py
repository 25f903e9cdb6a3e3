"""View models: the data of `data.py` turned into the strings and flags the templates show.

Nothing here escapes HTML: the templates autoescape every value. The two SVG charts of a ticker's
page (`ml.charts`, drawn on the server from numbers, their text escaped there) are the only markup
that reaches a template as is.
"""

import os
from datetime import date
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from .data import DashboardError, TickerData, load_report, valid_dates
from .intervals import CHECKS, close_interval, coverage, number, published_units, quantile

if TYPE_CHECKING:
    from ml.config import Settings

MLFLOW_UI_ENV = "MLFLOW_UI_URL"


def _fmt_price(value: float | None, decimals: int) -> str:
    return "–" if value is None else f"{value:,.{decimals}f}"


def _price_decimals(last_close: float | None) -> int:
    """One precision per ticker, from its price level: 1.0450 (EURUSD=X) but 155.60 (AMD)."""
    return 4 if last_close is not None and abs(last_close) < 20 else 2


def _fmt_pct(value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.2f} %" if signed else f"{value:.2f} %"


def _fmt(value: Any, digits: int = 3) -> str:
    result = number(value)
    return "–" if result is None else f"{result:.{digits}f}"


def _text(value: Any) -> str:
    return "–" if value is None or value == "" else str(value)


def mlflow_ui_base(settings: "Settings") -> str | None:
    """The MLflow UI base URL for links (http/https only), or None."""
    base = (os.environ.get(MLFLOW_UI_ENV) or settings.mlflow_tracking_uri or "").strip()
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    return base.rstrip("/")


def model_version_url(base: str | None, name: str | None, version: str | None) -> str | None:
    if not base or not name or not version:
        return None
    return f"{base}/#/models/{quote(name, safe='')}/versions/{quote(version, safe='')}"


# --- the dashboard --------------------------------------------------------------------------------


def no_intervals(version: Any) -> str:
    """What a forecast without quantiles shows in their place."""
    return f"no intervals for model v{_text(version)} (saved before quantile forecasts)"


def interval_lines(record: dict[str, Any], decimals: int) -> list[str]:
    """The next bar's intervals of a forecast, one line each ("Close 90 %: 602.10 – 624.00"), or
    none when its model forecast no quantiles (each line needs both of its ends)."""
    lines = []
    interval = close_interval(record)
    if interval is not None:
        q05, q10, q90, q95 = (_fmt_price(v, decimals) for v in interval)
        lines += [f"Close 90 %: {q05} – {q95}", f"Close 80 %: {q10} – {q90}"]
    # One-sided: the High stays at or below its q90, the Low at or above its q10, 9 times in 10.
    for label, column in (("High q90", "pred_high_q90"), ("Low q10", "pred_low_q10")):
        value = quantile(record, column)
        if value is not None:
            lines.append(f"{label}: {_fmt_price(value, decimals)}")
    return lines


def view_row(row: dict[str, Any], mlflow_base: str | None) -> dict[str, Any]:
    """A row of the forecasts table as the page shows it."""
    change = row["close_change_pct"]
    decimals = _price_decimals(row["last_close"])
    intervals = interval_lines(row, decimals)
    return {
        "ticker": row["ticker"] or "–",
        "last_bar_date": row["last_bar_date"] or "–",
        "last_close": _fmt_price(row["last_close"], decimals),
        "pred_low": _fmt_price(row["pred_low"], decimals),
        "pred_high": _fmt_price(row["pred_high"], decimals),
        "pred_close": _fmt_price(row["pred_close"], decimals),
        "close_change": _fmt_pct(change, signed=True),
        "change_class": "up" if change and change > 0 else "down" if change and change < 0 else "",
        "pred_adj_close": _fmt_price(row["pred_adj_close"], decimals),
        "range_pct": _fmt_pct(row["range_pct"]),
        "intervals": intervals,
        "no_intervals": "" if intervals else no_intervals(row["model_version"]),
        "model_name": row["model_name"] or "–",
        "model_version": row["model_version"] or "–",
        "model_url": model_version_url(mlflow_base, row["model_name"], row["model_version"]),
        "source": row["source"] or "–",
        "synthetic": row["source"] == "synthetic",
    }


def _u2_cell(u2: Any, target: str, limit: float | None) -> dict[str, str]:
    """A U2 value, marked pass/fail against its cap (`limit` None: no cap, no mark)."""
    value = number(u2.get(target)) if isinstance(u2, dict) else None
    if value is None:
        return {"text": "–", "cls": ""}
    if limit is None:
        return {"text": f"{value:.3f}", "cls": ""}
    return {"text": f"{value:.3f}", "cls": "pass" if value < limit else "fail"}


def _report_row(r: dict[str, Any], settings: "Settings") -> dict[str, Any]:
    """A ticker of a run report: its steps, U2 against the gate's caps and the promotion."""
    gate = settings.gate
    u2 = r.get("u2")
    promotion = _text(r.get("promotion"))
    if promotion == "none":
        promotion = "no champion"
    if r.get("state") == "failed":
        why = f"failed at {_text(r.get('failed_step'))}: {_text(r.get('error'))}"
    else:
        why = _text(r.get("promotion_reason"))
    return {
        "ticker": _text(r.get("ticker")),
        "state": _text(r.get("state")),
        "failed": r.get("state") == "failed",
        "validation": _text(r.get("validation")),
        "training": _text(r.get("training")),
        "u2_high": _u2_cell(u2, "High", gate.u2_high_max),
        "u2_low": _u2_cell(u2, "Low", gate.u2_low_max),
        # Close has no U2 cap: the gate only asks that it not be significantly worse.
        "u2_close": _u2_cell(u2, "Close", None),
        "promotion": promotion,
        "promoted": promotion.startswith("promoted"),
        # the champion's model kind (lstm, gru, har, gbm, naive); "–" in reports written before it
        "kind": _text(r.get("champion_kind")),
        "why": why,
    }


def view_report(report: dict[str, Any], settings: "Settings") -> dict[str, Any]:
    """A run report as the page shows it: counts, failures and the gate table."""
    gate = settings.gate
    tickers = [r for r in report.get("tickers") or [] if isinstance(r, dict)]
    failed = [r for r in tickers if r.get("state") == "failed"]
    rows = [_report_row(r, settings) for r in tickers]
    return {
        "logical_date": _text(report.get("logical_date")),
        "run_id": _text(report.get("run_id")),
        "price_source": _text(report.get("price_source")),
        "total": len(tickers),
        "succeeded": len(tickers) - len(failed),
        "failed": [
            {
                "ticker": _text(r.get("ticker")),
                "step": _text(r.get("failed_step")),
                "error": _text(r.get("error")),
            }
            for r in failed
        ],
        "promoted": sum(1 for row in rows if row["promoted"]),
        "rows": rows,
        "gate": (
            f"U2 High < {gate.u2_high_max:g} and U2 Low < {gate.u2_low_max:g}, both significantly "
            "better than persistence, Close not significantly worse (one-sided Diebold-Mariano, "
            f"p < {gate.p_value:g}); against the current champion on the same test block: no "
            "target significantly worse and a lower mean U2"
        ),
    }


def _date_navigation(
    forecast_dates: list[date], reports: list[date], shown: date | None
) -> dict[str, Any]:
    """The date selector's options (newest first) and the previous/next date links."""
    all_dates = sorted(set(forecast_dates) | set(reports))
    with_forecasts = set(forecast_dates)
    options = [
        {
            "value": d.isoformat(),
            "label": d.isoformat() + ("" if d in with_forecasts else " (report only)"),
            "selected": d == shown,
        }
        for d in reversed(all_dates)
    ]
    if shown is not None and shown not in all_dates:
        options.insert(
            0, {"value": shown.isoformat(), "label": shown.isoformat(), "selected": True}
        )
    earlier = [d for d in all_dates if shown is not None and d < shown]
    later = [d for d in all_dates if shown is not None and d > shown]
    return {
        "dates": options,
        "prev_date": earlier[-1].isoformat() if earlier else None,
        "next_date": later[0].isoformat() if later else None,
    }


def _report_context(
    settings: "Settings",
    shown: date | None,
    selected: date | None,
    rows: list[dict[str, Any]],
    newer: list[date],
) -> dict[str, Any]:
    """The run report of the shown date, the tickers it has no forecast for, and a newer report
    without forecasts (only on the default view, when `selected` is None)."""
    try:
        report = load_report(settings, shown) if shown is not None else None
    except DashboardError as exc:
        report, report_error = None, str(exc)
    else:
        report_error = None
    forecast_tickers = {r["ticker"] for r in rows}
    not_forecast = [
        str(r.get("ticker"))
        for r in (report or {}).get("tickers") or []
        if isinstance(r, dict) and r.get("ticker") and r.get("ticker") not in forecast_tickers
    ]
    newer_failed = 0
    if selected is None and newer:
        try:
            newer_payload = load_report(settings, newer[-1]) or {}
        except DashboardError:
            newer_payload = {}
        newer_failed = len(newer_payload.get("failed") or [])
    return {
        "not_forecast": not_forecast if rows else [],
        "report": view_report(report, settings) if report else None,
        "report_missing": report_error
        or (
            f"No run report for {shown.isoformat()} (the report task writes it at the end of each run)."
            if shown is not None
            else None
        ),
        "newer_report": newer[-1].isoformat() if selected is None and newer else None,
        "newer_report_failed": newer_failed,
    }


def dashboard_context(
    settings: "Settings",
    selected: date | None,
    forecasts: tuple[bool, list[dict[str, Any]]],
    reports: list[date],
    self_url: str,
) -> tuple[int, dict[str, Any]]:
    """(HTTP status, template context) of the dashboard for `selected` (None: the latest date).

    `forecasts` is `data.load_forecasts`'s (exists, rows), `reports` the run reports' dates."""
    from ml.forecasts.export import forecasts_path

    exists, table = forecasts
    forecast_dates = valid_dates(r["logical_date"] for r in table)
    latest = forecast_dates[-1] if forecast_dates else None
    shown = selected or latest or (reports[-1] if reports else None)
    mlflow_base = mlflow_ui_base(settings)
    rows = [
        view_row(r, mlflow_base)
        for r in sorted(table, key=lambda r: r["ticker"] or "")
        if shown is not None and r["logical_date"] == shown.isoformat()
    ]
    with_forecasts = set(forecast_dates)
    newer = [d for d in reports if shown is not None and d > shown and d not in with_forecasts]
    context: dict[str, Any] = {
        "forecasts_path": str(forecasts_path(settings)),
        "reports_dir": str(settings.data_dir / "reports"),
        "mlflow_base": mlflow_base,
        "self_url": self_url,
        **_date_navigation(forecast_dates, reports, shown),
        **_report_context(settings, shown, selected, rows, newer),
        "selected": shown.isoformat() if shown else "",
        "rows": rows,
        "synthetic": any(r["synthetic"] for r in rows),
        "latest_date": latest.isoformat() if latest else None,
    }
    if not table or shown is None:
        context["empty"] = True
        context["empty_reason"] = "has no rows yet" if exists else "does not exist yet"
        context["subtitle"] = "no forecasts yet"
        if selected is None and not reports:
            context["report_missing"] = None
        return 200, context
    if not rows:
        context["missing_date"] = shown.isoformat()
        context["subtitle"] = f"no forecasts for {shown.isoformat()}"
        return (200 if context["report"] else 404), context
    sources = sorted({r["source"] for r in rows})
    context["subtitle"] = (
        f"logical date {shown.isoformat()}"
        f"{' (latest)' if shown == latest else ''} · {len(rows)} tickers · source: {', '.join(sources)}"
    )
    return 200, context


# --- a ticker's page ------------------------------------------------------------------------------


def _next_forecast(
    data: TickerData, last_bar: dict[str, Any] | None
) -> tuple[dict[str, Any] | None, tuple[float, float] | None, tuple[float, ...] | None]:
    """The forecast of the bar after the last one: its text, and for the chart its band and its
    Close intervals (in the published units of the bars drawn)."""
    day = last_bar["Date"] if last_bar else None
    latest = data.forecasts.loc[data.forecasts["last_bar_date"] == day]
    latest = latest.sort_values("logical_date")
    if not len(latest) or last_bar is None:
        return None, None, None
    f = latest.iloc[-1].to_dict()
    lines = interval_lines(f, 4)
    shown = {
        "last_bar_date": f["last_bar_date"],
        "model_version": f["model_version"],
        "low": _fmt(f["pred_low"], 4),
        "high": _fmt(f["pred_high"], 4),
        "close": _fmt(f["pred_close"], 4),
        "intervals": lines,
        "no_intervals": "" if lines else no_intervals(f["model_version"]),
    }
    interval = close_interval(f, published_units(f, float(last_bar["Close"])))
    return shown, (float(f["pred_low"]), float(f["pred_high"])), interval


def coverage_lines(outcomes: list[dict[str, Any]]) -> list[str]:
    """How often the past forecasts' intervals held, one line per check that has scored bars,
    e.g. "Close 90 % interval held on 52 of 58 scored bars (0.90; nominal 0.90)"."""
    counts = coverage(outcomes)
    return [
        f"{label} on {held} of {n} scored bars ({held / n:.2f}; nominal {nominal:.2f})"
        for key, label, nominal in CHECKS
        for held, n in [counts[key]]
        if n
    ]


def _live_windows(lives: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The latest live metrics, one row per window that has scored forecasts."""
    return [
        {
            "window": w,
            "n": stats.get("n"),
            "u2_high": _fmt(stats.get("u2_high")),
            "u2_low": _fmt(stats.get("u2_low")),
            "u2_close": _fmt(stats.get("u2_close")),
            "coverage": _fmt(stats.get("coverage"), 2),
            "direction": _fmt(stats.get("directional_accuracy"), 2),
        }
        for w, stats in (lives[-1].items() if lives else ())
        if stats.get("n")
    ]


def ticker_context(data: TickerData) -> dict[str, Any]:
    """The template context of a ticker's page: its charts (SVG) and its live skill."""
    from ml.charts import CloseInterval, line_chart, price_band_chart

    drawn = {bar["Date"] for bar in data.bars}
    scored = data.scored
    # Only the drawn bars' forecasts: the others would stretch the price axis off the chart.
    bands = {
        t: (float(lo), float(hi))
        for t, lo, hi in zip(
            scored["target_date"], scored["pred_low"], scored["pred_high"], strict=True
        )
        if t in drawn
    }
    intervals = {
        o["target_date"]: CloseInterval(*o["interval"])
        for o in data.intervals
        if o["interval"] is not None and o["target_date"] in drawn
    }
    last_bar = data.bars[-1] if data.bars else None
    next_forecast, next_band, next_interval = _next_forecast(data, last_bar)
    held = coverage_lines(data.intervals)
    series = {
        f"live U2 {t} (20 bars)": [(x.get("20") or {}).get(f"u2_{t.lower()}") for x in data.lives]
        for t in ("High", "Low")
    }
    price_svg = price_band_chart(
        data.bars,
        bands,
        next_band,
        f"{data.ticker}: last bars",
        intervals,
        CloseInterval(*next_interval) if next_interval else None,
        held[0] if held else "",
    )
    return {
        "ticker": data.ticker,
        "bars_count": len(data.bars),
        "last_bar": last_bar["Date"] if last_bar else "–",
        "reason": data.promotion_reason,
        "price_svg": price_svg,
        "next_forecast": next_forecast,
        "coverage": held,
        "live_svg": line_chart(data.monitor_dates, series, "live U2 against persistence"),
        "live": _live_windows(data.lives),
    }
