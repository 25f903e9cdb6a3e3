"""Forecast dashboard: an Airflow 3 UI plugin showing the forecasts table and the run reports.

The Airflow api-server mounts this plugin's FastAPI app under `/forecast-dashboard`:

    GET /forecast-dashboard/                         HTML dashboard; `?date=YYYY-MM-DD` picks a logical
                                                     date (default: the latest in the forecasts table)
    GET /forecast-dashboard/api/forecasts?date=...   the forecast rows of that date, as JSON
    GET /forecast-dashboard/api/report?date=...      the run report JSON of that date (default: the
                                                     latest report), 404 when there is none

and the Airflow UI lists it under Browse -> Forecasts (`/plugin/forecasts`, the page in an iframe).

What it reads: `DATA_DIR/forecasts/forecasts.csv` (`ml.forecasting.read_forecasts`) and
`DATA_DIR/reports/<date>.json` (`ml.pipeline.report_path`), with the settings read on every request
(`ml.config.get_settings()`), so a new run shows up without restarting the api-server. It never
writes anything: the dashboard is read-only. A `date` parameter is parsed strictly into a `date`
before it is used; file paths are built from that parsed date, never from the raw input. Every
value is HTML-escaped (Jinja2 autoescaping) and the page runs no JavaScript (its Content Security
Policy allows none). Model versions link to the MLflow UI at `MLFLOW_UI_URL` if set (for example
when the tracking URI is a Docker-internal name such as `http://mlflow:5000`), else at
`MLFLOW_TRACKING_URI`; only http(s) URLs become links.

Authentication and authorization. Airflow attaches plugin apps with `app.mount()`, and the core
API authenticates with per-router and per-route dependencies that a mounted app does not inherit:
Airflow 3 does NOT protect plugin FastAPI apps (3.3.2: `airflow/api_fastapi/app.py:init_plugins`
mounts them bare, and no api-server middleware enforces auth; apache/airflow#72655 documents that
authenticating them is the plugin author's job).
This app therefore declares Airflow's own dependency, `requires_access_dag("GET", RUN,
param_dag_id="price_forecast")`, on every route: the configured auth manager authenticates the
caller (the UI's `_token` cookie or an `Authorization: Bearer` JWT) and authorizes reading the runs
of the `price_forecast` DAG, whose output this page shows (SimpleAuthManager: the viewer role and
above; FAB/Keycloak: read access on that DAG's runs). No auth of its own is invented. Anonymous
browsers are redirected to Airflow's login page (`/api/v2/auth/login?next=...`); API clients get
401/403 JSON. With `[core] simple_auth_manager_all_admins = True` Airflow itself treats every
request as an admin, so the dashboard is then open like the rest of that Airflow.

Inside the Airflow UI the page is embedded in an iframe sandboxed without `allow-popups`, so the
MLflow links (which open a new tab; MLflow refuses to be framed) only work when the dashboard is
opened directly at `/forecast-dashboard/`; the page says so.

Import cost: Airflow imports every module of the plugins folder in every process that loads
plugins, task processes included. This module imports only the standard library and
`airflow.plugins_manager` at import time; FastAPI, Jinja2, pandas and `ml` are imported when the
api-server (or `airflow plugins`) asks for the app, or inside the handlers.
"""

import json
import math
import os
import re
from datetime import date
from functools import cache
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit

from airflow.plugins_manager import AirflowPlugin

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from starlette.responses import Response

    from ml.config import Settings

URL_PREFIX = "/forecast-dashboard"
DAG_ID = "price_forecast"
MLFLOW_UI_ENV = "MLFLOW_UI_URL"
_DATE_PATTERN = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_PRICE_COLUMNS = ("last_close", "pred_high", "pred_low", "pred_close", "pred_adj_close")
_SECURITY_HEADERS = {
    # No script, no external asset: inline CSS only; framing only by the Airflow UI (same origin).
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class BadDateError(ValueError):
    """The `date` query parameter is not a calendar date written YYYY-MM-DD."""


class DashboardError(RuntimeError):
    """The dashboard cannot read its settings or data (shown as a 500 with this message)."""


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


# --- data access (read-only) ---------------------------------------------------------------------


def _settings() -> "Settings":
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


def _clean(value: Any) -> Any:
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


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def load_forecasts(settings: "Settings") -> tuple[bool, list[dict[str, Any]]]:
    """(whether the forecasts table exists, its rows) with NaN as None and numbers as floats."""
    from ml.forecasting import FORECAST_COLUMNS, forecasts_path, read_forecasts

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
    rows = []
    for record in table[FORECAST_COLUMNS].to_dict("records"):
        row = {k: _clean(v) for k, v in record.items()}
        for column in _PRICE_COLUMNS:
            row[column] = _number(row[column])
        for column in ("ticker", "logical_date", "last_bar_date", "model_name", "source"):
            row[column] = None if row[column] is None else str(row[column])
        version = row["model_version"]
        if isinstance(version, float) and version.is_integer():
            version = int(version)
        row["model_version"] = None if version is None else str(version)
        last, high, low, close = (
            row[c] for c in ("last_close", "pred_high", "pred_low", "pred_close")
        )
        row["range_pct"] = (
            (high - low) / last * 100 if None not in (last, high, low) and last else None
        )
        row["close_change_pct"] = (
            (close / last - 1) * 100 if None not in (last, close) and last else None
        )
        rows.append(row)
    return True, rows


def _valid_dates(values: Any) -> list[date]:
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
    folder = settings.data_dir / "reports"
    if not folder.is_dir():
        return []
    return _valid_dates(p.stem for p in folder.glob("*.json"))


def load_report(settings: "Settings", as_of: date) -> dict[str, Any] | None:
    """The run report of `as_of` (path built from the parsed date), None when there is none."""
    from ml.pipeline import report_path

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


# --- presentation ---------------------------------------------------------------------------------


def _fmt_price(value: float | None, decimals: int) -> str:
    return "–" if value is None else f"{value:,.{decimals}f}"


def _price_decimals(last_close: float | None) -> int:
    """One precision per ticker, from its price level: 1.0450 (EURUSD=X) but 155.60 (AMD)."""
    return 4 if last_close is not None and abs(last_close) < 20 else 2


def _fmt_pct(value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.2f} %" if signed else f"{value:.2f} %"


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


def _view_row(row: dict[str, Any], mlflow_base: str | None) -> dict[str, Any]:
    change = row["close_change_pct"]
    decimals = _price_decimals(row["last_close"])
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
        "model_name": row["model_name"] or "–",
        "model_version": row["model_version"] or "–",
        "model_url": model_version_url(mlflow_base, row["model_name"], row["model_version"]),
        "source": row["source"] or "–",
        "synthetic": row["source"] == "synthetic",
    }


def _u2_cell(u2: Any, target: str, limit: float | None) -> dict[str, str]:
    """A U2 value, marked pass/fail against its cap (`limit` None: no cap, no mark)."""
    value = _number(u2.get(target)) if isinstance(u2, dict) else None
    if value is None:
        return {"text": "–", "cls": ""}
    if limit is None:
        return {"text": f"{value:.3f}", "cls": ""}
    return {"text": f"{value:.3f}", "cls": "pass" if value < limit else "fail"}


def _text(value: Any) -> str:
    return "–" if value is None or value == "" else str(value)


def _view_report(report: dict[str, Any], settings: "Settings") -> dict[str, Any]:
    gate = settings.gate
    tickers = [r for r in report.get("tickers") or [] if isinstance(r, dict)]
    failed = [r for r in tickers if r.get("state") == "failed"]
    rows = []
    for r in tickers:
        u2 = r.get("u2")
        promotion = _text(r.get("promotion"))
        if promotion == "none":
            promotion = "no champion"
        if r.get("state") == "failed":
            why = f"failed at {_text(r.get('failed_step'))}: {_text(r.get('error'))}"
        else:
            why = _text(r.get("promotion_reason"))
        rows.append(
            {
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
                "why": why,
            }
        )
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


_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
:root { color-scheme: light dark; --fg:#1a202c; --muted:#5a6475; --bg:#fff; --panel:#f6f8fa;
  --line:#dde3ea; --accent:#0b6bcb; --good:#1b7f3b; --bad:#b42318; --warn-bg:#fff4d6;
  --warn-line:#e8b634; --bad-bg:#fdecea; }
@media (prefers-color-scheme: dark) { :root { --fg:#e6e9ef; --muted:#9aa4b2; --bg:#14171c;
  --panel:#1d2229; --line:#2e3540; --accent:#6cb2ff; --good:#5fd38a; --bad:#ff8a80;
  --warn-bg:#3a2f12; --warn-line:#8a6d1d; --bad-bg:#3b1d1b; } }
* { box-sizing: border-box; }
body { margin: 0; padding: 20px 24px 40px; font: 14px/1.45 system-ui, -apple-system, "Segoe UI",
  Roboto, Helvetica, Arial, sans-serif; color: var(--fg); background: var(--bg); }
h1 { font-size: 22px; margin: 0 0 2px; } h2 { font-size: 17px; margin: 28px 0 8px; }
a { color: var(--accent); } .muted { color: var(--muted); }
header { display: flex; flex-wrap: wrap; gap: 12px 24px; align-items: flex-end;
  justify-content: space-between; margin-bottom: 14px; }
form.dates { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; }
select, button { font: inherit; padding: 4px 8px; border: 1px solid var(--line); border-radius: 6px;
  background: var(--panel); color: var(--fg); }
button { cursor: pointer; }
.banner { border: 1px solid var(--warn-line); background: var(--warn-bg); border-radius: 8px;
  padding: 10px 14px; margin: 10px 0 14px; }
.error { border: 1px solid var(--bad); background: var(--bad-bg); border-radius: 8px;
  padding: 12px 16px; margin: 12px 0; }
.empty { border: 1px dashed var(--line); border-radius: 8px; padding: 18px 20px; margin: 12px 0;
  background: var(--panel); }
.scroll { overflow-x: auto; border: 1px solid var(--line); border-radius: 8px; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { padding: 6px 10px; border-bottom: 1px solid var(--line); text-align: left;
  white-space: nowrap; vertical-align: top; }
th { background: var(--panel); font-weight: 600; position: sticky; top: 0; }
tr:last-child td { border-bottom: 0; }
td.num, th.num { text-align: right; }
td.why { white-space: normal; min-width: 260px; }
.up { color: var(--good); } .down { color: var(--bad); }
.pass { color: var(--good); } .fail { color: var(--bad); font-weight: 600; }
.badge { display: inline-block; padding: 1px 7px; border-radius: 10px; font-size: 12px;
  border: 1px solid var(--line); background: var(--panel); }
.badge.synthetic { border-color: var(--warn-line); background: var(--warn-bg); font-weight: 600; }
.badge.failed { border-color: var(--bad); color: var(--bad); }
.badge.promoted { border-color: var(--good); color: var(--good); }
.stats { display: flex; flex-wrap: wrap; gap: 8px 22px; margin: 6px 0 10px; }
.stats b { font-size: 16px; }
footer { margin-top: 28px; font-size: 12px; }
code { font-size: 12px; }
</style>
</head>
<body>
<header>
  <div>
    <h1>Price forecasts</h1>
    <div class="muted">{{ subtitle }}</div>
  </div>
  {% if dates %}
  <form class="dates" method="get" action="">
    {% if prev_date %}<a href="?date={{ prev_date }}" title="previous logical date">&larr; {{ prev_date }}</a>{% endif %}
    <label for="date">Logical date</label>
    <select id="date" name="date">
      {% for d in dates %}<option value="{{ d.value }}"{% if d.selected %} selected{% endif %}>{{ d.label }}</option>{% endfor %}
    </select>
    <button type="submit">Show</button>
    {% if next_date %}<a href="?date={{ next_date }}" title="next logical date">{{ next_date }} &rarr;</a>{% endif %}
  </form>
  {% endif %}
</header>

{% if error %}
<div class="error" role="alert"><strong>{{ error_title }}</strong><br>{{ error }}</div>
{% if back_link %}<p><a href="./">Show the latest forecasts</a></p>{% endif %}
{% endif %}

{% if empty %}
<div class="empty">
  <strong>No forecasts yet: trigger price_forecast.</strong>
  <p>The forecasts table <code>{{ forecasts_path }}</code> {{ empty_reason }}. Trigger the
  <code>price_forecast</code> DAG in Airflow (Dags &rarr; price_forecast &rarr; Trigger), or run
  <code>make demo</code>; each ticker's champion model writes its next-bar forecast there and this
  page shows it.</p>
</div>
{% endif %}

{% if missing_date %}
<div class="empty">
  <strong>No forecasts for {{ missing_date }}.</strong>
  {% if latest_date %}<p>The latest forecasts are for <a href="?date={{ latest_date }}">{{ latest_date }}</a>;
  pick another date above.</p>{% endif %}
</div>
{% endif %}

{% if rows %}
{% if synthetic %}
<div class="banner"><strong>Synthetic data.</strong> These forecasts were made on prices from the
offline synthetic source (<code>PRICE_SOURCE=synthetic</code>), not on market data: do not use them
for decisions.</div>
{% endif %}
<div class="scroll">
<table id="forecasts">
  <thead><tr>
    <th>Ticker</th><th>Last bar</th><th class="num">Last close</th>
    <th class="num">Pred. Low</th><th class="num">Pred. High</th><th class="num">Pred. Close</th>
    <th class="num">vs last</th><th class="num">Pred. Adj Close</th>
    <th class="num" title="(predicted High - predicted Low) / last Close">Range</th>
    <th>Model (MLflow)</th><th>Source</th>
  </tr></thead>
  <tbody>
  {% for r in rows %}
  <tr>
    <td><strong><a href="{{ self_url }}ticker/{{ r.ticker|urlencode }}">{{ r.ticker }}</a></strong></td>
    <td>{{ r.last_bar_date }}</td>
    <td class="num">{{ r.last_close }}</td>
    <td class="num">{{ r.pred_low }}</td>
    <td class="num">{{ r.pred_high }}</td>
    <td class="num">{{ r.pred_close }}</td>
    <td class="num {{ r.change_class }}">{{ r.close_change }}</td>
    <td class="num">{{ r.pred_adj_close }}</td>
    <td class="num">{{ r.range_pct }}</td>
    <td>{% if r.model_url %}<a href="{{ r.model_url }}" target="_blank" rel="noopener noreferrer">{{ r.model_name }} v{{ r.model_version }}</a>{% else %}{{ r.model_name }} v{{ r.model_version }}{% endif %}</td>
    <td>{% if r.synthetic %}<span class="badge synthetic" title="offline synthetic prices, not market data">synthetic data</span>{% else %}<span class="badge">{{ r.source }}</span>{% endif %}</td>
  </tr>
  {% endfor %}
  </tbody>
</table>
</div>
<p class="muted">{{ rows|length }} tickers. Predictions are for the bar after each ticker's last bar.
<a href="api/forecasts?date={{ selected }}">JSON</a></p>
{% if not_forecast %}
<p>No forecast for <strong>{{ not_forecast|join(", ") }}</strong> on this date: no champion yet or
the run failed for them (see the run report below).</p>
{% endif %}
{% endif %}

{% if newer_report %}
<div class="banner">A newer run report exists for <a href="?date={{ newer_report }}">{{ newer_report }}</a>
(with no forecasts{% if newer_report_failed %}: {{ newer_report_failed }} ticker(s) failed{% endif %}).</div>
{% endif %}

{% if report %}
<h2 id="report">Run report for {{ report.logical_date }}</h2>
<div class="stats">
  <span><b>{{ report.succeeded }}</b> / {{ report.total }} tickers succeeded</span>
  <span class="{{ 'fail' if report.failed else 'pass' }}"><b>{{ report.failed|length }}</b> failed</span>
  <span><b>{{ report.promoted }}</b> promoted</span>
  <span class="muted">run <code>{{ report.run_id }}</code>, prices: {{ report.price_source }}</span>
  <a href="api/report?date={{ report.logical_date }}">JSON</a>
</div>
{% if report.failed %}
<div class="error"><strong>Failed tickers</strong>
<ul>{% for f in report.failed %}<li><strong>{{ f.ticker }}</strong> at <code>{{ f.step }}</code>: {{ f.error }}</li>{% endfor %}</ul>
</div>
{% endif %}
<p class="muted">Promotion gate: {{ report.gate }}.</p>
<div class="scroll">
<table id="gate">
  <thead><tr>
    <th>Ticker</th><th>State</th><th>Validation</th><th>Training</th>
    <th class="num">U2 High</th><th class="num">U2 Low</th><th class="num">U2 Close</th>
    <th>Champion</th><th>Why</th>
  </tr></thead>
  <tbody>
  {% for r in report.rows %}
  <tr>
    <td><strong>{{ r.ticker }}</strong></td>
    <td>{% if r.failed %}<span class="badge failed">failed</span>{% else %}{{ r.state }}{% endif %}</td>
    <td>{{ r.validation }}</td>
    <td>{{ r.training }}</td>
    <td class="num {{ r.u2_high.cls }}">{{ r.u2_high.text }}</td>
    <td class="num {{ r.u2_low.cls }}">{{ r.u2_low.text }}</td>
    <td class="num {{ r.u2_close.cls }}">{{ r.u2_close.text }}</td>
    <td>{% if r.promoted %}<span class="badge promoted">{{ r.promotion }}</span>{% else %}{{ r.promotion }}{% endif %}</td>
    <td class="why">{{ r.why }}</td>
  </tr>
  {% endfor %}
  </tbody>
</table>
</div>
{% elif report_missing %}
<h2 id="report">Run report</h2>
<p class="muted">{{ report_missing }}</p>
{% endif %}

<footer class="muted">
  Read-only view of <code>{{ forecasts_path }}</code> and the run reports in
  <code>{{ reports_dir }}</code>.
  {% if mlflow_base %}Model links open the MLflow UI (<code>{{ mlflow_base }}</code>) in a new tab.
  The Airflow UI embeds this page in a frame that may not open tabs: to follow them, open the page
  on its own at <code>{{ self_url }}</code>.{% endif %}
</footer>
</body>
</html>
"""


@cache
def _template() -> Any:
    import jinja2

    env = jinja2.Environment(
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True
    )
    return env.from_string(_TEMPLATE)


_PAGE_DEFAULTS: dict[str, Any] = {
    "title": "Price forecasts",
    "subtitle": "",
    "dates": [],
    "prev_date": None,
    "next_date": None,
    "error": None,
    "error_title": "",
    "back_link": False,
    "empty": False,
    "empty_reason": "",
    "missing_date": None,
    "latest_date": None,
    "rows": [],
    "synthetic": False,
    "not_forecast": [],
    "selected": "",
    "newer_report": None,
    "newer_report_failed": 0,
    "report": None,
    "report_missing": None,
    "forecasts_path": "DATA_DIR/forecasts/forecasts.csv",
    "reports_dir": "DATA_DIR/reports",
    "mlflow_base": None,
    "self_url": URL_PREFIX + "/",
}


def _html(status: int, **context: Any) -> "Response":
    from starlette.responses import HTMLResponse

    page = {**_PAGE_DEFAULTS, **context}
    return HTMLResponse(_template().render(**page), status_code=status, headers=_SECURITY_HEADERS)


def render_dashboard(raw_date: str | None, self_url: str) -> "Response":
    """The dashboard page for `?date=raw_date` (latest when absent)."""
    try:
        selected = parse_date(raw_date)
    except BadDateError as exc:
        return _html(
            400, title="Bad date", error_title="Bad request", error=str(exc), back_link=True
        )
    try:
        settings = _settings()
        exists, table = load_forecasts(settings)
        reports = report_dates(settings)
    except DashboardError as exc:
        return _html(
            500, title="Dashboard error", error_title="Cannot load forecasts", error=str(exc)
        )

    from ml.forecasting import forecasts_path

    forecast_dates = _valid_dates(r["logical_date"] for r in table)
    common = {
        "forecasts_path": str(forecasts_path(settings)),
        "reports_dir": str(settings.data_dir / "reports"),
        "mlflow_base": mlflow_ui_base(settings),
        "self_url": self_url,
    }
    latest = forecast_dates[-1] if forecast_dates else None
    shown = selected or latest or (reports[-1] if reports else None)
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

    rows = [
        _view_row(r, common["mlflow_base"])
        for r in sorted(table, key=lambda r: r["ticker"] or "")
        if shown is not None and r["logical_date"] == shown.isoformat()
    ]
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
    newer = [d for d in reports if shown is not None and d > shown and d not in with_forecasts]
    newer_failed = 0
    if selected is None and newer:
        try:
            newer_payload = load_report(settings, newer[-1]) or {}
        except DashboardError:
            newer_payload = {}
        newer_failed = len(newer_payload.get("failed") or [])

    context: dict[str, Any] = {
        **common,
        "dates": options,
        "prev_date": earlier[-1].isoformat() if earlier else None,
        "next_date": later[0].isoformat() if later else None,
        "selected": shown.isoformat() if shown else "",
        "rows": rows,
        "synthetic": any(r["synthetic"] for r in rows),
        "not_forecast": not_forecast if rows else [],
        "report": _view_report(report, settings) if report else None,
        "report_missing": report_error
        or (
            f"No run report for {shown.isoformat()} (the report task writes it at the end of each run)."
            if shown is not None
            else None
        ),
        "newer_report": newer[-1].isoformat() if selected is None and newer else None,
        "newer_report_failed": newer_failed,
        "latest_date": latest.isoformat() if latest else None,
    }
    if not table or shown is None:
        context["empty"] = True
        context["empty_reason"] = "has no rows yet" if exists else "does not exist yet"
        context["subtitle"] = "no forecasts yet"
        if selected is None and not reports:
            context["report_missing"] = None
        return _html(200, **context)
    if not rows:
        context["missing_date"] = shown.isoformat()
        context["subtitle"] = f"no forecasts for {shown.isoformat()}"
        return _html(200 if report else 404, **context)
    sources = sorted({r["source"] for r in rows})
    context["subtitle"] = (
        f"logical date {shown.isoformat()}"
        f"{' (latest)' if shown == latest else ''} · {len(rows)} tickers · source: {', '.join(sources)}"
    )
    return _html(200, **context)


# --- the per-ticker page -------------------------------------------------------------------------

_TICKER_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ ticker }}: forecasts against what happened</title>
<style>
body { margin: 0; padding: 20px 24px 40px; font: 14px/1.45 system-ui, sans-serif; }
.chart { width: 100%; max-width: 960px; height: auto; display: block; margin: 8px 0 20px; }
table { border-collapse: collapse; } td, th { padding: 3px 10px; border-bottom: 1px solid #ddd; }
.muted { color: #666; }
</style></head><body>
<p><a href="{{ home }}">All forecasts</a></p>
<h1>{{ ticker }}</h1>
<p class="muted">{{ bars_count }} bars to {{ last_bar }}; blue: the range each past forecast
predicted for its bar; orange: the forecast of the next bar.{% if reason %} Gate: {{ reason }}{% endif %}</p>
{% if price_svg %}{{ price_svg | safe }}{% else %}<p>No published bars yet.</p>{% endif %}
{% if next_forecast %}<p id="next">Next bar after {{ next_forecast.last_bar_date }} (model
v{{ next_forecast.model_version }}): Low {{ next_forecast.low }}, High {{ next_forecast.high }},
Close {{ next_forecast.close }}.</p>{% else %}<p id="next">No forecast: no champion yet.</p>{% endif %}
<h2>Live skill</h2>
{% if live_svg %}{{ live_svg | safe }}{% endif %}
{% if live %}<table id="live"><tr><th>window</th><th>n</th><th>U2 High</th><th>U2 Low</th>
<th>U2 Close</th><th>range coverage</th><th>direction</th></tr>
{% for w in live %}<tr><td>{{ w.window }}</td><td>{{ w.n }}</td><td>{{ w.u2_high }}</td>
<td>{{ w.u2_low }}</td><td>{{ w.u2_close }}</td><td>{{ w.coverage }}</td>
<td>{{ w.direction }}</td></tr>{% endfor %}</table>
{% else %}<p>No scored forecast yet: the ledger scores each forecast when its bar arrives.</p>{% endif %}
</body></html>
"""


def _fmt(value: Any, digits: int = 3) -> str:
    number = _number(value)
    return "–" if number is None else f"{number:.{digits}f}"


def render_ticker(ticker: str) -> "Response":
    """The chart page of one ticker: the last 120 bars, each past forecast's predicted range
    against what happened (the ledger), the next forecast, and the live U2 over time."""
    import json

    import jinja2
    from starlette.responses import HTMLResponse

    from ml.charts import line_chart, price_band_chart
    from ml.ledger import read_table
    from ml.store import PriceStore
    from ml.universe import UniverseError, load_universe

    try:
        settings = _settings()
        instrument = load_universe(settings.universe_file).get(ticker)
    except (DashboardError, UniverseError, KeyError, ValueError) as exc:
        return _html(404, title="Unknown ticker", error_title="Not found", error=str(exc),
                     back_link=True)  # fmt: skip
    bars = PriceStore(settings.data_dir).load(instrument).tail(120)
    rows = [
        {"Date": d.date().isoformat(), "High": h, "Low": lo, "Close": c}
        for d, h, lo, c in zip(bars["Date"], bars["High"], bars["Low"], bars["Close"], strict=True)
    ]
    forecasts = read_table(settings, "forecasts")
    forecasts = forecasts.loc[forecasts["ticker"] == instrument.ticker]
    outcomes = read_table(settings, "outcomes")
    outcomes = outcomes.loc[outcomes["ticker"] == instrument.ticker]
    keys = ["ticker", "last_bar_date", "model_version"]
    scored = outcomes.merge(forecasts, on=keys)
    bands = {
        t: (float(lo), float(hi))
        for t, lo, hi in zip(
            scored["target_date"], scored["pred_low"], scored["pred_high"], strict=True
        )
    }
    last_bar = rows[-1]["Date"] if rows else None
    latest = forecasts.loc[forecasts["last_bar_date"] == last_bar].sort_values("logical_date")
    next_forecast = None
    next_band = None
    if len(latest):
        f = latest.iloc[-1]
        next_band = (float(f["pred_low"]), float(f["pred_high"]))
        next_forecast = {
            "last_bar_date": f["last_bar_date"],
            "model_version": f["model_version"],
            "low": _fmt(f["pred_low"], 4),
            "high": _fmt(f["pred_high"], 4),
            "close": _fmt(f["pred_close"], 4),
        }
    monitor = read_table(settings, "monitor")
    monitor = monitor.loc[monitor["ticker"] == instrument.ticker].sort_values("as_of")
    lives = [json.loads(v) for v in monitor["live"]]
    series = {
        f"live U2 {t} (20 bars)": [(x.get("20") or {}).get(f"u2_{t.lower()}") for x in lives]
        for t in ("High", "Low")
    }
    live = [
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
    report_rows = {}
    dates = report_dates(settings)
    if dates:
        report = load_report(settings, dates[-1]) or {}
        report_rows = {r.get("ticker"): r for r in report.get("tickers") or []}
    reason = (report_rows.get(instrument.ticker) or {}).get("promotion_reason")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    page = env.from_string(_TICKER_TEMPLATE).render(
        ticker=instrument.ticker,
        home=URL_PREFIX + "/",
        bars_count=len(rows),
        last_bar=last_bar or "–",
        reason=reason,
        price_svg=price_band_chart(rows, bands, next_band, f"{instrument.ticker}: last bars"),
        next_forecast=next_forecast,
        live_svg=line_chart(list(monitor["as_of"]), series, "live U2 against persistence"),
        live=live,
    )
    return HTMLResponse(page, headers=_SECURITY_HEADERS)


# --- the FastAPI app ------------------------------------------------------------------------------


def authorization_dependency() -> Any:
    """Airflow's own check: the caller may read the runs of the price_forecast DAG."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_dag

    return requires_access_dag("GET", DagAccessEntity.RUN, param_dag_id=DAG_ID)


def _wants_html(request: "Request") -> bool:
    return request.method == "GET" and "text/html" in request.headers.get("accept", "")


def _login_url(request: "Request") -> str:
    root = request.scope.get("root_path", "")
    airflow_root = root[: -len(URL_PREFIX)] if root.endswith(URL_PREFIX) else root
    return f"{airflow_root}/api/v2/auth/login?{urlencode({'next': str(request.url)})}"


def create_app() -> "FastAPI":
    """The dashboard app; `app.state.authorize` is its auth dependency (tests override it)."""
    from fastapi import Depends, FastAPI, HTTPException, Query, Request
    from fastapi.exception_handlers import http_exception_handler
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import RedirectResponse, Response

    authorize = authorization_dependency()
    app = FastAPI(
        title="Forecast dashboard",
        description="Read-only forecasts and run reports of the price_forecast DAG.",
        dependencies=[Depends(authorize)],
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.authorize = authorize

    @app.exception_handler(StarletteHTTPException)
    async def _auth_errors(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 401 and _wants_html(request):
            return RedirectResponse(_login_url(request), status_code=303)
        if exc.status_code == 403 and _wants_html(request):
            return _html(
                403,
                title="Forbidden",
                error_title="Forbidden",
                error=f"Your Airflow user may not read the runs of the {DAG_ID} DAG, "
                "whose forecasts this page shows.",
            )
        return await http_exception_handler(request, exc)

    def _date_or_400(raw: str | None) -> date | None:
        try:
            return parse_date(raw)
        except BadDateError as exc:
            raise HTTPException(400, str(exc)) from None

    def _settings_or_500() -> "Settings":
        try:
            return _settings()
        except DashboardError as exc:
            raise HTTPException(500, str(exc)) from None

    date_query = Query(None, alias="date", description="logical date YYYY-MM-DD (default: latest)")

    @app.get("/", include_in_schema=False)
    def dashboard(request: Request, raw_date: str | None = date_query) -> Response:
        return render_dashboard(raw_date, str(request.url.replace(query="")))

    @app.get("/ticker/{ticker}", include_in_schema=False)
    def ticker_page(ticker: str) -> Response:
        return render_ticker(ticker)

    @app.get("/api/forecasts")
    def api_forecasts(raw_date: str | None = date_query) -> dict[str, Any]:
        selected = _date_or_400(raw_date)
        settings = _settings_or_500()
        try:
            _, table = load_forecasts(settings)
        except DashboardError as exc:
            raise HTTPException(500, str(exc)) from None
        dates = _valid_dates(r["logical_date"] for r in table)
        shown = selected or (dates[-1] if dates else None)
        rows = sorted(
            (r for r in table if shown is not None and r["logical_date"] == shown.isoformat()),
            key=lambda r: r["ticker"] or "",
        )
        if selected is not None and not rows:
            raise HTTPException(404, f"no forecasts for {selected.isoformat()}")
        return {
            "logical_date": shown.isoformat() if shown else None,
            "available_dates": [d.isoformat() for d in reversed(dates)],
            "rows": rows,
        }

    @app.get("/api/report")
    def api_report(raw_date: str | None = date_query) -> dict[str, Any]:
        selected = _date_or_400(raw_date)
        settings = _settings_or_500()
        shown = selected
        if shown is None:
            available = report_dates(settings)
            if not available:
                raise HTTPException(404, "no run report yet: trigger price_forecast")
            shown = available[-1]
        try:
            report = load_report(settings, shown)
        except DashboardError as exc:
            raise HTTPException(500, str(exc)) from None
        if report is None:
            raise HTTPException(404, f"no run report for {shown.isoformat()}")
        return report

    return app


@cache
def get_app() -> "FastAPI":
    return create_app()


class ForecastDashboardPlugin(AirflowPlugin):
    """Browse -> Forecasts in the Airflow UI, served by the api-server under /forecast-dashboard."""

    name = "forecast_dashboard"
    external_views = [  # noqa: RUF012 - the AirflowPlugin interface is class-level lists
        {
            "name": "Forecasts",
            # Relative to the UI's <base href>, so it also works when Airflow is served under a
            # sub-path ([api] base_url).
            "href": "forecast-dashboard/",
            "destination": "nav",
            "category": "browse",
            "url_route": "forecasts",
        }
    ]

    @property
    def fastapi_apps(self) -> list[dict[str, Any]]:  # type: ignore[override]
        # A property, so processes that load plugins only for macros or listeners (every task)
        # never build the app nor import FastAPI.
        return [{"app": get_app(), "url_prefix": URL_PREFIX, "name": "Forecast dashboard"}]
