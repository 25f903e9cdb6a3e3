"""The forecast dashboard plugin (plugins/forecast_dashboard.py, the package it registers:
plugins/forecast_dashboard_app/).

1. Its FastAPI app on a temp DATA_DIR, through FastAPI's TestClient: the page, the date selector,
   bad input, escaping, the JSON endpoints, the empty state, and that it requires Airflow auth.
2. Airflow discovers it: `airflow plugins -o json` lists the app and the nav entry, no import error.
3. (slow) A real `airflow api-server` serves it behind Airflow's login, and Chromium shows it both
   on its own and under Browse -> Forecasts in the Airflow UI (screenshots in the test's tmp dir).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlencode

import pytest

from ml.config import Settings, get_settings
from ml.forecasts.export import upsert_forecast
from ml.servers import wait_for_http
from ml.steps.report import write_run_report

REPO = Path(__file__).resolve().parent.parent
PLUGINS = REPO / "plugins"
BIN = Path(sys.executable).parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MLFLOW_URI = "http://127.0.0.1:5000"
D1, D2 = date(2026, 11, 19), date(2026, 11, 20)


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plugin() -> Iterator[ModuleType]:
    """The dashboard package, imported the way Airflow's plugins manager does: the plugins folder
    on sys.path, then the entry file executed by path (it imports the package and holds the
    plugin class)."""
    on_path = str(PLUGINS) in sys.path
    if not on_path:
        sys.path.append(str(PLUGINS))
    try:
        spec = importlib.util.spec_from_file_location(
            "forecast_dashboard", PLUGINS / "forecast_dashboard.py"
        )
        assert spec and spec.loader
        entry = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(entry)
        assert entry.ForecastDashboardPlugin.name == "forecast_dashboard"
        yield importlib.import_module("forecast_dashboard_app")
    finally:
        if not on_path:
            sys.path.remove(str(PLUGINS))


@pytest.fixture
def env_settings(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> Settings:
    """The environment the app reads per request, and the same settings for writing fixtures."""
    monkeypatch.setenv("DATA_DIR", str(data_dir))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", MLFLOW_URI)
    monkeypatch.setenv("PRICE_SOURCE", "synthetic")
    monkeypatch.delenv("MLFLOW_UI_URL", raising=False)
    return get_settings()


@pytest.fixture
def client(plugin: ModuleType, env_settings: Settings) -> Any:
    from fastapi.testclient import TestClient

    app = plugin.create_app()
    # Airflow's auth dependency needs a running api-server; its behaviour is tested separately.
    app.dependency_overrides[app.state.authorize] = lambda: None
    return TestClient(app)


def forecast_row(ticker: str, as_of: date, last_close: float, **changes: Any) -> dict[str, Any]:
    row = {
        "ticker": ticker,
        "logical_date": as_of.isoformat(),
        "last_bar_date": as_of.isoformat(),
        "last_close": last_close,
        "pred_high": last_close * 1.02,
        "pred_low": last_close * 0.99,
        "pred_close": last_close * 1.005,
        "pred_adj_close": last_close * 0.9,
        "model_name": "price-forecast-" + ticker.replace("=", "_"),
        "model_version": "3",
        "source": "synthetic",
    }
    row.update(changes)
    return row


def write_ledger_fixture(settings: Settings) -> int:
    """AMD's published bars to D2 and ten days of its forecasts in the ledger, scored, with a
    monitor row per day. Returns the number of scored forecasts."""
    import pandas as pd

    from ml.data.sources import SyntheticSource
    from ml.data.store import PriceStore
    from ml.forecasts.ledger import record_forecasts
    from ml.forecasts.monitor import monitor
    from ml.universe import Instrument

    amd = Instrument("AMD", "stock", "AMD")
    bars = SyntheticSource().fetch(amd, date(2026, 5, 1), D2)
    store = PriceStore(settings.data_dir)
    store.publish(amd, bars, D2, "{}")
    closes = bars.set_index(bars["Date"].dt.strftime("%Y-%m-%d"))["Close"]
    days = list(closes.index[-11:])
    for day in days:
        last = float(closes[day])
        record_forecasts(
            settings,
            [
                {
                    "ticker": "AMD",
                    "last_bar_date": day,
                    "model_version": "4",
                    "logical_date": day,
                    "model_name": "price-forecast-AMD",
                    "last_close": last,
                    "pred_high": last * 1.02,
                    "pred_low": last * 0.98,
                    "pred_close": last * 1.001,
                    "pred_adj_close": last,
                    "source": "synthetic",
                }
            ],
        )
    history = store.load(amd)
    for day in days[1:]:
        as_of = date.fromisoformat(day)
        visible = history.loc[history["Date"] <= pd.Timestamp(as_of)]
        monitor(settings, {"AMD": visible}, {"AMD": ("4", date(2026, 10, 1))}, as_of)
    return len(days) - 1


def write_fixture_data(settings: Settings) -> None:
    """Forecasts for D1 (2 tickers) and D2 (3 tickers), and the run report of D2."""
    upsert_forecast(settings, forecast_row("AMD", D1, 150.0))
    upsert_forecast(settings, forecast_row("EURUSD=X", D1, 1.04))
    upsert_forecast(settings, forecast_row("AMD", D2, 155.6043, model_version="4"))
    upsert_forecast(settings, forecast_row("EURUSD=X", D2, 1.045017))
    upsert_forecast(settings, forecast_row("SOL-USD", D2, 25.3844, source="yahoo"))
    write_run_report(
        settings,
        D2,
        [
            {
                "ticker": "AMD",
                "state": "success",
                "validation": "passed",
                "training": "trained v4",
                "u2": {"High": 0.674347, "Low": 0.640709, "Close": 0.998, "Adj Close": 1.0},
                "promotion": "promoted v4",
                "promotion_reason": "beats the champion v3 on the same test block",
                "champion_kind": "har",
            },
            {
                "ticker": "EURUSD=X",
                "state": "success",
                "validation": "passed",
                "training": "trained v4",
                "u2": {"High": 0.91, "Low": 0.93, "Close": 1.0182},
                "promotion": "kept v3",
                "promotion_reason": "fails the gate against persistence: Close significantly worse than persistence",
            },
            {
                "ticker": "SOL-USD",
                "state": "failed",
                "failed_step": "publish",
                "error": "PriceValidationError: SOL-USD: High < Low in 2 rows",
                "validation": "failed",
                "u2": {},
            },
            {"ticker": "NVDA", "state": "success", "promotion": "none", "u2": {"High": 0.8}},
        ],
        run_id="scheduled__2026-11-20T22:30:00+00:00",
    )


class _TableParser(HTMLParser):
    """The text of each body cell of the <table id=...> tables of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._in_body = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._table = dict(attrs).get("id") or ""
            self.tables[self._table] = []
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body and self._table is not None:
            self.tables[self._table].append([])
        elif tag == "td" and self._in_body:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def tables(html: str) -> dict[str, list[list[str]]]:
    parser = _TableParser()
    parser.feed(html)
    return parser.tables


# --- 1. the app --------------------------------------------------------------------------------------


def test_page_lists_every_ticker_of_the_latest_date(client: Any, env_settings: Settings) -> None:
    write_fixture_data(env_settings)
    resp = client.get("/")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    assert "script-src" not in resp.headers["content-security-policy"]  # no script at all
    rows = tables(resp.text)["forecasts"]
    assert [r[0] for r in rows] == ["AMD", "EURUSD=X", "SOL-USD"]
    amd, eur, sol = rows
    # ticker, last bar, last close, pred low, high, close, vs last, adj close, range, model, source
    assert amd == [
        "AMD",
        "2026-11-20",
        "155.60",
        "154.05",
        "158.72",
        "156.38",
        "+0.50 %",
        "140.04",
        "3.00 %",
        "price-forecast-AMD v4",
        "synthetic data",
    ]
    assert eur[2:6] == ["1.0450", "1.0346", "1.0659", "1.0502"]  # 4 decimals for forex
    assert sol[-1] == "yahoo"
    assert "logical date 2026-11-20 (latest)" in resp.text
    assert f'href="{MLFLOW_URI}/#/models/price-forecast-AMD/versions/4"' in resp.text
    assert f'href="{MLFLOW_URI}/#/models/price-forecast-EURUSD_X/versions/3"' in resp.text
    assert "Synthetic data." in resp.text  # the banner
    # the date selector offers both dates, latest selected, and links to the previous one
    assert '<option value="2026-11-20" selected>' in resp.text
    assert '<option value="2026-11-19">' in resp.text
    assert 'href="?date=2026-11-19"' in resp.text


def test_run_report_summary(client: Any, env_settings: Settings) -> None:
    write_fixture_data(env_settings)
    html = client.get("/").text
    assert "Run report for 2026-11-20" in html
    assert "<b>3</b> / 4 tickers succeeded" in html
    assert "<b>1</b> failed" in html
    assert "<b>1</b> promoted" in html
    assert "PriceValidationError: SOL-USD: High &lt; Low in 2 rows" in html
    gate = {r[0]: r for r in tables(html)["gate"]}
    # ticker, state, validation, training, U2 High, Low, Close, champion, kind, why
    assert gate["AMD"][4:] == [
        "0.674",
        "0.641",
        "0.998",
        "promoted v4",
        "har",
        "beats the champion v3 on the same test block",
    ]
    assert gate["EURUSD=X"][6:] == [
        "1.018",
        "kept v3",
        "–",  # a report written before the champion's kind was in it
        "fails the gate against persistence: Close significantly worse than persistence",
    ]
    assert gate["SOL-USD"][1] == "failed"
    assert gate["SOL-USD"][-1].startswith("failed at publish: PriceValidationError")
    assert gate["NVDA"][7] == "no champion"
    assert 'class="num fail">0.930' not in html  # High/Low below their caps pass
    assert 'class="num ">1.018' in html  # Close has no U2 cap: its DM test is in the reason
    assert "No forecast for <strong>NVDA</strong>" in html


def test_date_parameter_selects_another_date(client: Any, env_settings: Settings) -> None:
    write_fixture_data(env_settings)
    resp = client.get("/", params={"date": "2026-11-19"})
    assert resp.status_code == 200
    rows = tables(resp.text)["forecasts"]
    assert [(r[0], r[2]) for r in rows] == [("AMD", "150.00"), ("EURUSD=X", "1.0400")]
    assert "(latest)" not in resp.text
    assert '<option value="2026-11-19" selected>' in resp.text
    assert "No run report for 2026-11-19" in resp.text
    assert 'href="?date=2026-11-20"' in resp.text  # the next date


@pytest.mark.parametrize(
    "raw",
    ["2026-11-20x", "20261120", "2026-13-01", "2026-02-30", "../reports/2026-11-20", "<b>x</b>"],
)
def test_malformed_date_is_a_400(client: Any, env_settings: Settings, raw: str) -> None:
    write_fixture_data(env_settings)
    resp = client.get("/", params={"date": raw})
    assert resp.status_code == 400
    assert "invalid date" in resp.text
    assert "<b>x</b>" not in resp.text
    for endpoint in ("/api/forecasts", "/api/report"):
        api = client.get(endpoint, params={"date": raw})
        assert api.status_code == 400
        assert api.json()["detail"].startswith("invalid date")


def test_a_date_no_run_can_have_processed_is_a_400(client: Any, env_settings: Settings) -> None:
    """After today (UTC) or before HISTORY_START: refused like a malformed date, with the message
    the CLI gives (`ml.config.check_as_of`)."""
    write_fixture_data(env_settings)
    future = datetime.now(UTC).date() + timedelta(days=3)
    before = env_settings.history_start - timedelta(days=1)
    for day, reason in ((future, "after today"), (before, "before HISTORY_START")):
        resp = client.get("/", params={"date": day.isoformat()})
        assert resp.status_code == 400
        assert f"invalid date {day.isoformat()}: {reason}" in resp.text
        for endpoint in ("/api/forecasts", "/api/report"):
            api = client.get(endpoint, params={"date": day.isoformat()})
            assert api.status_code == 400
            assert api.json()["detail"].startswith(f"invalid date {day.isoformat()}: {reason}")


def test_check_date_uses_the_pipelines_bounds(plugin: ModuleType, env_settings: Settings) -> None:
    today = env_settings.history_start + timedelta(days=400)  # injected: no clock involved
    assert plugin.check_date(env_settings, None, today=today) is None
    assert plugin.check_date(env_settings, today, today=today) == today
    start = env_settings.history_start
    assert plugin.check_date(env_settings, start, today=today) == start
    for day in (today + timedelta(days=1), start - timedelta(days=1)):
        with pytest.raises(plugin.BadDateError, match=f"^invalid date {day.isoformat()}: "):
            plugin.check_date(env_settings, day, today=today)


def test_unknown_date_says_there_are_no_forecasts(client: Any, env_settings: Settings) -> None:
    write_fixture_data(env_settings)
    resp = client.get("/", params={"date": "2020-01-06"})
    assert resp.status_code == 404
    assert "No forecasts for 2020-01-06." in resp.text
    assert 'The latest forecasts are for <a href="?date=2026-11-20">' in resp.text
    assert "forecasts" not in tables(resp.text)


def test_values_are_html_escaped(client: Any, env_settings: Settings) -> None:
    upsert_forecast(
        env_settings,
        forecast_row(
            "AMD",
            D2,
            10.0,
            model_name='<script>alert("pwned")</script>',
            model_version='1"><img src=x onerror=alert(1)>',
            source="<i>yahoo</i>",
        ),
    )
    resp = client.get("/")
    assert resp.status_code == 200
    assert "<script>" not in resp.text
    assert "<img" not in resp.text
    assert "<i>yahoo" not in resp.text
    assert "&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt;" in resp.text
    assert "&lt;i&gt;yahoo&lt;/i&gt;" in resp.text
    # the link is built from URL-quoted parts
    assert (
        "/#/models/%3Cscript%3Ealert%28%22pwned%22%29%3C%2Fscript%3E/versions/1%22%3E" in resp.text
    )


def test_json_endpoints(client: Any, env_settings: Settings) -> None:
    write_fixture_data(env_settings)
    latest = client.get("/api/forecasts").json()
    assert latest["logical_date"] == "2026-11-20"
    assert latest["available_dates"] == ["2026-11-20", "2026-11-19"]
    assert [r["ticker"] for r in latest["rows"]] == ["AMD", "EURUSD=X", "SOL-USD"]
    amd = latest["rows"][0]
    assert amd["last_close"] == pytest.approx(155.6043)
    assert amd["pred_high"] == pytest.approx(155.6043 * 1.02, abs=1e-6)
    assert amd["model_version"] == "4"
    assert amd["range_pct"] == pytest.approx(3.0, abs=1e-4)

    older = client.get("/api/forecasts", params={"date": "2026-11-19"}).json()
    assert [r["ticker"] for r in older["rows"]] == ["AMD", "EURUSD=X"]
    missing = client.get("/api/forecasts", params={"date": "2020-01-06"})
    assert missing.status_code == 404
    assert missing.json() == {"detail": "no forecasts for 2020-01-06"}

    on_disk = json.loads((env_settings.data_dir / "reports" / "2026-11-20.json").read_text())
    assert client.get("/api/report", params={"date": "2026-11-20"}).json() == on_disk
    assert client.get("/api/report").json() == on_disk  # the latest report by default
    no_report = client.get("/api/report", params={"date": "2026-11-19"})
    assert no_report.status_code == 404
    assert no_report.json() == {"detail": "no run report for 2026-11-19"}


def test_empty_state(client: Any, env_settings: Settings) -> None:
    resp = client.get("/")
    assert resp.status_code == 200
    assert "No forecasts yet: trigger price_forecast." in resp.text
    assert str(env_settings.data_dir / "forecasts" / "forecasts.csv") in resp.text
    assert "does not exist yet" in resp.text
    assert client.get("/api/forecasts").json() == {
        "logical_date": None,
        "available_dates": [],
        "rows": [],
    }
    assert client.get("/api/report").status_code == 404


def test_empty_state_still_shows_a_run_report(client: Any, env_settings: Settings) -> None:
    """A first run in which every ticker failed leaves a report but no forecasts."""
    write_run_report(
        env_settings,
        D2,
        [{"ticker": "AMD", "state": "failed", "failed_step": "ingest", "error": "YahooError"}],
    )
    html = client.get("/").text
    assert "No forecasts yet: trigger price_forecast." in html
    assert "Run report for 2026-11-20" in html
    assert "failed at ingest: YahooError" in html


def test_mlflow_links_follow_settings(
    client: Any, env_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    upsert_forecast(env_settings, forecast_row("AMD", D2, 100.0))
    monkeypatch.setenv("MLFLOW_UI_URL", "https://mlflow.example.org/")
    html = client.get("/").text
    assert 'href="https://mlflow.example.org/#/models/price-forecast-AMD/versions/3"' in html
    monkeypatch.delenv("MLFLOW_UI_URL")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")  # no UI to link to
    html = client.get("/").text
    assert "/#/models/" not in html
    assert "price-forecast-AMD v3" in html


def test_anonymous_callers_get_airflow_auth(plugin: ModuleType, env_settings: Settings) -> None:
    """Without the override, Airflow's own auth dependency guards every route."""
    from fastapi.testclient import TestClient

    anonymous = TestClient(plugin.create_app())
    for path in ("/api/forecasts", "/api/report", "/"):
        resp = anonymous.get(path, headers={"accept": "application/json"})
        assert resp.status_code == 401, path
        assert resp.json() == {"detail": "Not authenticated"}
    browser = anonymous.get("/", headers={"accept": "text/html"}, follow_redirects=False)
    assert browser.status_code == 303
    assert browser.headers["location"].startswith("/api/v2/auth/login?next=http")


def test_parse_date_is_strict(plugin: ModuleType) -> None:
    assert plugin.parse_date("2026-11-20") == D2
    assert plugin.parse_date(None) is None
    assert plugin.parse_date("") is None
    for raw in ("2026-1-20", "2026-11-20T00:00", "２０２６-11-20", " 2026-11-20", "x" * 500):
        with pytest.raises(plugin.BadDateError, match="invalid date"):
            plugin.parse_date(raw)


def test_module_import_stays_light() -> None:
    """Airflow imports the plugins folder in every task process: no FastAPI, pandas or ml."""
    code = (
        "import importlib.util, json, sys\n"
        f"sys.path.append({str(PLUGINS)!r})\n"  # as Airflow does with its plugins folder
        f"spec = importlib.util.spec_from_file_location('fd', {str(PLUGINS / 'forecast_dashboard.py')!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print(json.dumps(sorted(m for m in ('fastapi', 'pandas', 'ml', 'ml.config') if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


# --- 2. discovery by Airflow -------------------------------------------------------------------------


def airflow_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    dags = home / "dags"
    dags.mkdir(parents=True, exist_ok=True)
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(PLUGINS),
        AIRFLOW__CORE__DAGS_FOLDER=str(dags),
        AIRFLOW__CORE__LOAD_EXAMPLES="false",
        PYTHONPATH=str(REPO),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        **extra,
    )
    return env


def _json_document(stdout: str) -> Any:
    """The JSON document of a CLI output that may start with warnings."""
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(("[", "{")):
            return json.loads("\n".join(lines[i:]))
    raise AssertionError(f"no JSON in the output:\n{stdout}")


def test_airflow_discovers_the_plugin(tmp_path: Path) -> None:
    env = airflow_env(tmp_path / "airflow")
    listed = subprocess.run(
        [str(BIN / "airflow"), "plugins", "-o", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert listed.returncode == 0, listed.stderr
    listed_plugins = _json_document(listed.stdout)
    assert [p["name"] for p in listed_plugins].count("forecast_dashboard") == 1
    plugins = {p["name"]: p for p in listed_plugins}
    assert "forecast_dashboard" in plugins, plugins
    plugin = plugins["forecast_dashboard"]
    assert plugin["source"] == "$PLUGINS_FOLDER/forecast_dashboard.py"
    assert plugin["fastapi_apps"] == [
        {
            "app": "fastapi.applications.FastAPI",
            "url_prefix": "/forecast-dashboard",
            "name": "Forecast dashboard",
        }
    ]
    assert plugin["external_views"] == [
        {
            "name": "Forecasts",
            "href": "forecast-dashboard/",
            "destination": "nav",
            "category": "browse",
            "url_route": "forecasts",
        }
    ]

    check = (
        "import json\n"
        "from airflow import plugins_manager\n"
        "from airflow.api_fastapi.app import RESERVED_URL_PREFIXES\n"
        "from airflow.api_fastapi.core_api.datamodels.plugins import ExternalViewResponse\n"
        "apps, _ = plugins_manager.get_fastapi_plugins()\n"
        "views, _ = plugins_manager._get_ui_plugins()\n"
        "[ExternalViewResponse.model_validate(v) for v in views]\n"
        "print(json.dumps({\n"
        "    'errors': plugins_manager.get_import_errors(),\n"
        "    'reserved': RESERVED_URL_PREFIXES,\n"
        "    'prefixes': [a['url_prefix'] for a in apps],\n"
        "    'routes': [v['url_route'] for v in views],\n"
        "}))\n"
    )
    checked = subprocess.run(
        [sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300
    )
    assert checked.returncode == 0, checked.stderr
    result = _json_document(checked.stdout)
    assert result["errors"] == {}
    assert result["prefixes"] == ["/forecast-dashboard"]
    assert result["routes"] == ["forecasts"]
    assert not any(p.startswith(r) for p in result["prefixes"] for r in result["reserved"])


# --- 3. a real api-server and a real browser ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """Stop the server's whole process group (uvicorn and its worker)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


@dataclass
class ApiServer:
    base: str
    home: Path

    def password(self, user: str) -> str:
        generated = self.home / "simple_auth_manager_passwords.json.generated"
        return json.loads(generated.read_text())[user]


@pytest.fixture
def api_server(tmp_path: Path, settings: Settings) -> Iterator[ApiServer]:
    """`airflow api-server` with the plugin, fixture data and SimpleAuthManager users.

    Real authentication (not `simple_auth_manager_all_admins`), so the test also proves that the
    dashboard is behind Airflow's login and that a viewer may read it.
    """
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    home = tmp_path / "airflow"
    write_fixture_data(settings)
    write_ledger_fixture(settings)
    env = airflow_env(
        home,
        AIRFLOW__CORE__AUTH_MANAGER=(
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
        ),
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="admin:admin,ann:viewer",
        AIRFLOW__API__BASE_URL=base,
        AIRFLOW__API__PORT=str(port),
        DATA_DIR=str(settings.data_dir),
        MLFLOW_TRACKING_URI=MLFLOW_URI,
        PRICE_SOURCE="synthetic",
    )
    env.pop("MLFLOW_UI_URL", None)
    migrate = subprocess.run(
        [str(BIN / "airflow"), "db", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    log_path = tmp_path / "api-server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                *(str(BIN / "airflow"), "api-server", "--host", "127.0.0.1"),
                *("--port", str(port), "--workers", "1"),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            start_new_session=True,
        )
    try:
        try:
            wait_for_http(f"{base}/api/v2/version", timeout=180, process=process)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}\n{log_path.read_text()[-4000:]}") from exc
        yield ApiServer(base, home)
    finally:
        _stop(process)


def _get(url: str, **headers: str) -> tuple[int, str, dict[str, str]]:
    """GET without following redirects: (status, body, headers)."""

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=30) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), dict(err.headers)


@pytest.mark.slow
@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="chromium not installed: apt-get install -y chromium"
)
def test_dashboard_in_a_real_browser(
    api_server: ApiServer, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from playwright.sync_api import expect, sync_playwright

    base = api_server.base
    dashboard = f"{base}/forecast-dashboard/"
    # Anonymous callers: JSON clients get 401, browsers are sent to Airflow's login.
    status, body, _ = _get(f"{dashboard}api/forecasts")
    assert (status, json.loads(body)) == (401, {"detail": "Not authenticated"})
    status, _, headers = _get(dashboard, Accept="text/html")
    assert status == 303
    assert headers["location"] == "/api/v2/auth/login?" + urlencode({"next": dashboard})

    dashboard_png = tmp_path / "forecast-dashboard.png"
    airflow_png = tmp_path / "airflow-ui-forecasts.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60_000)
            expect.set_options(timeout=60_000)

            # The dashboard on its own: Airflow's login page first, then back to the dashboard.
            page.goto(dashboard)
            page.wait_for_url("**/auth/login?next=**")
            page.locator("input[name=username]").fill("ann")  # role: viewer
            page.locator("input[name=password]").fill(api_server.password("ann"))
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(dashboard)
            table = page.locator("table#forecasts")
            expect(table.locator("tbody tr")).to_have_count(3)
            for ticker in ("AMD", "EURUSD=X", "SOL-USD"):
                expect(table).to_contain_text(ticker)
            expect(table).to_contain_text("synthetic data")
            expect(page.locator("table#gate")).to_contain_text("promoted v4")
            page.select_option("select#date", "2026-11-19")
            page.get_by_role("button", name="Show").click()
            page.wait_for_url("**/forecast-dashboard/?date=2026-11-19")
            expect(page.locator("table#forecasts tbody tr")).to_have_count(2)
            page.goto(dashboard)
            expect(table.locator("tbody tr")).to_have_count(3)
            page.screenshot(path=str(dashboard_png), full_page=True)
            # A ticker's page: the chart of past forecasts against what happened, drawn inline.
            table.get_by_role("link", name="AMD", exact=True).click()
            page.wait_for_url("**/forecast-dashboard/ticker/AMD")
            expect(page.locator("svg.chart").first).to_be_visible()
            expect(page.locator("svg.chart rect.band")).to_have_count(10)
            expect(page.locator("svg.chart rect.next")).to_be_visible()
            expect(page.locator("table#live")).to_contain_text("20")
            page.screenshot(path=str(tmp_path / "ticker-chart.png"), full_page=True)

            # The Airflow UI: Browse -> Forecasts embeds the dashboard (same session cookie).
            page.goto(f"{base}/", wait_until="networkidle")
            page.get_by_role("button", name="Browse").click()
            entry = page.get_by_role("menuitem", name="Forecasts")
            expect(entry).to_be_visible()
            entry.click()
            page.wait_for_url("**/plugin/forecasts**")
            frame = page.frame_locator("iframe[title='Forecasts']")
            expect(frame.locator("table#forecasts tbody tr")).to_have_count(3)
            expect(frame.locator("table#forecasts")).to_contain_text("EURUSD=X")
            page.screenshot(path=str(airflow_png))
        finally:
            browser.close()
    for png in (dashboard_png, airflow_png):
        assert png.stat().st_size > 10_000
        request.node.user_properties.append(("screenshot", str(png)))
        print(f"screenshot: {png}")


def test_ticker_page_draws_past_forecasts_against_what_happened(
    client: Any, env_settings: Settings
) -> None:
    write_fixture_data(env_settings)
    scored = write_ledger_fixture(env_settings)
    resp = client.get("/ticker/AMD")
    assert resp.status_code == 200
    html = resp.text
    assert html.count('class="band"') == scored  # one predicted range per scored forecast
    assert html.count('class="next"') == 1  # the forecast of the bar after the last one
    assert html.count('class="series"') == 2  # live U2 High and Low over the monitor's days
    assert 'id="live"' in html and "beats the champion v3" in html
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org", "")
    assert resp.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert 'ticker/AMD">AMD</a>' in client.get("/").text  # linked from the table

    assert client.get("/ticker/NOSUCH").status_code == 404
    empty = client.get("/ticker/EURUSD=X")  # in the universe, nothing published or scored
    assert empty.status_code == 200 and "No published bars yet" in empty.text
