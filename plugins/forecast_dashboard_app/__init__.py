"""Forecast dashboard: an Airflow 3 UI plugin showing the forecasts table and the run reports.

The Airflow api-server mounts this package's FastAPI app under `/forecast-dashboard` (the plugin
class is `plugins/forecast_dashboard.py`):

    GET /forecast-dashboard/                         HTML dashboard; `?date=YYYY-MM-DD` picks a logical
                                                     date (default: the latest in the forecasts table)
    GET /forecast-dashboard/ticker/<TICKER>          a ticker's chart of its past forecasts against
                                                     what happened, and its live skill
    GET /forecast-dashboard/api/forecasts?date=...   the forecast rows of that date, as JSON
    GET /forecast-dashboard/api/report?date=...      the run report JSON of that date (default: the
                                                     latest report), 404 when there is none

and the Airflow UI lists it under Browse -> Forecasts (`/plugin/forecasts`, the page in an iframe).

The package:

    data.py       reads (read-only) the forecasts table, the run reports, the price store and the
                  ledger; parses the `date` parameter strictly and refuses a date no run can
                  have processed (after today in UTC, before HISTORY_START), as the CLI does
    intervals.py  the quantile fields of a forecast (issue 29; missing or null for a model saved
                  before quantile forecasts) and whether each past forecast's intervals held
    models.py     turns them into view models: formatted numbers, links, the gate table, charts
    views.py      the FastAPI app: routes, Airflow auth, the Jinja2 environment, security headers
    templates/    base.html (the layout), dashboard.html, ticker.html

What it reads: `DATA_DIR/forecasts/forecasts.csv` (`ml.forecasts.export.read_forecasts`) and
`DATA_DIR/reports/<date>.json` (`ml.steps.report.report_path`), and for a ticker's page its published
bars (`ml.data.store.PriceStore`) and the ledger (`ml.forecasts.ledger.read_table`), with the settings read on
every request (`ml.config.get_settings()`), so a new run shows up without restarting the
api-server. It never writes anything: the dashboard is read-only. A `date` parameter is parsed
strictly into a `date` before it is used; file paths are built from that parsed date, never from
the raw input. Every value is HTML-escaped (one Jinja2 environment, autoescaping on) and the pages
run no JavaScript (their Content Security Policy allows none). Model versions link to the MLflow UI
at `MLFLOW_UI_URL` if set (for example when the tracking URI is a Docker-internal name such as
`http://mlflow:5000`), else at `MLFLOW_TRACKING_URI`; only http(s) URLs become links.

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

Import cost: Airflow imports the plugin in every process that loads plugins, task processes
included. This package imports only the standard library at import time; FastAPI, Jinja2, pandas
and `ml` are imported when the api-server (or `airflow plugins`) asks for the app, or inside the
handlers.
"""

from .data import BadDateError, DashboardError, check_date, parse_date
from .views import DAG_ID, URL_PREFIX, create_app, get_app

__all__ = [
    "DAG_ID",
    "URL_PREFIX",
    "BadDateError",
    "DashboardError",
    "check_date",
    "create_app",
    "get_app",
    "parse_date",
]
