"""The dashboard's FastAPI app: its pages (Jinja2 templates in `templates/`), its JSON API, and
Airflow's auth on every route.

FastAPI, Starlette, Jinja2 and `ml` are imported when the app is built or a page rendered, never at
import time (Airflow imports the plugin in every process that loads plugins, task processes
included).
"""

from datetime import date
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from .data import (
    BadDateError,
    DashboardError,
    UnknownTickerError,
    check_date,
    load_forecasts,
    load_report,
    load_settings,
    load_ticker,
    parse_date,
    report_dates,
    valid_dates,
)
from .models import dashboard_context, ticker_context

if TYPE_CHECKING:
    import jinja2
    from fastapi import FastAPI, Request
    from starlette.responses import Response

    from ml.config import Settings

URL_PREFIX = "/forecast-dashboard"
DAG_ID = "price_forecast"
TEMPLATES = Path(__file__).resolve().parent / "templates"
SECURITY_HEADERS = {
    # No script, no external asset: inline CSS only; framing only by the Airflow UI (same origin).
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
# Every variable of dashboard.html, which also renders the error pages; StrictUndefined catches the
# one a view forgets.
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


@cache
def environment() -> "jinja2.Environment":
    """The one Jinja2 environment of every page: templates/ on disk, every value HTML-escaped."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(template: str, status: int, context: dict[str, Any]) -> "Response":
    """`template` rendered with `context`, as HTML with the security headers."""
    from starlette.responses import HTMLResponse

    page = environment().get_template(template).render(**context)
    return HTMLResponse(page, status_code=status, headers=SECURITY_HEADERS)


def _html(status: int, **context: Any) -> "Response":
    """The dashboard page (or an error shown in its layout)."""
    return render("dashboard.html", status, {**_PAGE_DEFAULTS, **context})


def _bad_date(exc: BadDateError) -> "Response":
    return _html(400, title="Bad date", error_title="Bad request", error=str(exc), back_link=True)


def render_dashboard(raw_date: str | None, self_url: str) -> "Response":
    """The dashboard page for `?date=raw_date` (latest when absent)."""
    try:
        selected = parse_date(raw_date)
    except BadDateError as exc:
        return _bad_date(exc)
    try:
        settings = load_settings()
    except DashboardError as exc:
        return _html(
            500, title="Dashboard error", error_title="Cannot load forecasts", error=str(exc)
        )
    try:
        selected = check_date(settings, selected)
    except BadDateError as exc:
        return _bad_date(exc)
    try:
        forecasts = load_forecasts(settings)
        reports = report_dates(settings)
    except DashboardError as exc:
        return _html(
            500, title="Dashboard error", error_title="Cannot load forecasts", error=str(exc)
        )
    status, context = dashboard_context(settings, selected, forecasts, reports, self_url)
    return _html(status, **context)


def render_ticker(ticker: str) -> "Response":
    """The chart page of one ticker: the last 120 bars, each past forecast's predicted range
    against what happened (the ledger), the next forecast, and the live U2 over time."""
    try:
        data = load_ticker(load_settings(), ticker)
    except (DashboardError, UnknownTickerError) as exc:
        return _html(404, title="Unknown ticker", error_title="Not found", error=str(exc),
                     back_link=True)  # fmt: skip
    return render("ticker.html", 200, {**ticker_context(data), "home": URL_PREFIX + "/"})


# --- the JSON API ---------------------------------------------------------------------------------


def forecasts_json(settings: "Settings", selected: date | None) -> dict[str, Any] | None:
    """The forecast rows of `selected` (default: the latest date); None if that date has none."""
    _, table = load_forecasts(settings)
    dates = valid_dates(r["logical_date"] for r in table)
    shown = selected or (dates[-1] if dates else None)
    rows = sorted(
        (r for r in table if shown is not None and r["logical_date"] == shown.isoformat()),
        key=lambda r: r["ticker"] or "",
    )
    if selected is not None and not rows:
        return None
    return {
        "logical_date": shown.isoformat() if shown else None,
        "available_dates": [d.isoformat() for d in reversed(dates)],
        "rows": rows,
    }


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


def _add_auth_errors(app: "FastAPI") -> None:
    """Browsers without a login go to Airflow's login page; without the right, a 403 page."""
    from fastapi.exception_handlers import http_exception_handler
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import Request
    from starlette.responses import RedirectResponse, Response

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


def _add_routes(app: "FastAPI") -> None:
    from fastapi import HTTPException, Query, Request
    from starlette.responses import Response

    def _settings_and_date(raw: str | None) -> "tuple[Settings, date | None]":
        """The settings and the `?date=` they allow: 400 for a bad date (checked first, and
        without the settings for its form), 500 when the settings cannot be read."""
        try:
            selected = parse_date(raw)
        except BadDateError as exc:
            raise HTTPException(400, str(exc)) from None
        try:
            settings = load_settings()
        except DashboardError as exc:
            raise HTTPException(500, str(exc)) from None
        try:
            return settings, check_date(settings, selected)
        except BadDateError as exc:
            raise HTTPException(400, str(exc)) from None

    date_query = Query(None, alias="date", description="logical date YYYY-MM-DD (default: latest)")

    @app.get("/", include_in_schema=False)
    def dashboard(request: Request, raw_date: str | None = date_query) -> Response:
        return render_dashboard(raw_date, str(request.url.replace(query="")))

    @app.get("/ticker/{ticker}", include_in_schema=False)
    def ticker_page(ticker: str) -> Response:
        return render_ticker(ticker)

    @app.get("/api/forecasts")
    def api_forecasts(raw_date: str | None = date_query) -> dict[str, Any]:
        settings, selected = _settings_and_date(raw_date)
        try:
            payload = forecasts_json(settings, selected)
        except DashboardError as exc:
            raise HTTPException(500, str(exc)) from None
        if payload is None:
            raise HTTPException(404, f"no forecasts for {selected}")
        return payload

    @app.get("/api/report")
    def api_report(raw_date: str | None = date_query) -> dict[str, Any]:
        settings, selected = _settings_and_date(raw_date)
        try:
            available = report_dates(settings) if selected is None else [selected]
            if not available:
                raise HTTPException(404, "no run report yet: trigger price_forecast")
            report = load_report(settings, available[-1])
        except DashboardError as exc:
            raise HTTPException(500, str(exc)) from None
        if report is None:
            raise HTTPException(404, f"no run report for {available[-1].isoformat()}")
        return report


def create_app() -> "FastAPI":
    """The dashboard app; `app.state.authorize` is its auth dependency (tests override it)."""
    from fastapi import Depends, FastAPI

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
    _add_auth_errors(app)
    _add_routes(app)
    return app


@cache
def get_app() -> "FastAPI":
    """The app Airflow mounts, built once per process."""
    return create_app()
