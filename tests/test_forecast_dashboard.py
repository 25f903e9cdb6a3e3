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
import re
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


# The quantile fields of a forecast record (issue 29), as multiples of the last Close.
QUANTILES = {
    "pred_close_q05": 0.97,
    "pred_close_q10": 0.98,
    "pred_close_q50": 1.005,
    "pred_close_q90": 1.03,
    "pred_close_q95": 1.04,
    "pred_high_q90": 1.045,
    "pred_high_q95": 1.055,
    "pred_low_q10": 0.965,
    "pred_low_q05": 0.955,
}


def with_quantiles(row: dict[str, Any], scale: float = 1.0) -> dict[str, Any]:
    """`row` with its quantile fields: the multiples of QUANTILES, each spread by `scale`."""
    last = row["last_close"]
    return {**row, **{k: last * (1 + (m - 1) * scale) for k, m in QUANTILES.items()}}


def upsert_with_quantiles(settings: Settings, rows: list[dict[str, Any]]) -> None:
    """Rows into the forecasts export with their quantile fields. The export of this branch
    predates those fields (ml.forecasts.export drops them): they are then added to the CSV as
    the ledger change of issue 29 writes them, empty where a row has none."""
    import pandas as pd

    from ml.forecasts.export import forecasts_path, upsert_forecasts

    upsert_forecasts(settings, rows)
    path = forecasts_path(settings)
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in QUANTILES if c not in table.columns]
    if not missing:
        return
    given = pd.DataFrame(rows, columns=["ticker", "logical_date", *QUANTILES])
    table = table.merge(given[["ticker", "logical_date", *missing]], how="left")
    table.to_csv(path, index=False, float_format="%.6f")


def record_with_quantiles(settings: Settings, rows: list[dict[str, Any]]) -> None:
    """Forecasts into the ledger with their quantile fields. The ledger of this branch predates
    them (record_forecasts keeps its own columns only): the columns are then added to its
    `forecasts` table, nullable, and filled, as the ledger change of issue 29 stores them."""
    from sqlalchemy import inspect, text

    from ml.forecasts.ledger import engine_for, record_forecasts

    record_forecasts(settings, rows)
    engine = engine_for(settings)
    present = {c["name"] for c in inspect(engine).get_columns("forecasts")}
    missing = [c for c in QUANTILES if c not in present]
    if not missing:
        return
    with engine.begin() as connection:
        for column in missing:
            connection.execute(text(f"ALTER TABLE forecasts ADD COLUMN {column} FLOAT"))
        for row in rows:
            connection.execute(
                text(
                    f"UPDATE forecasts SET {', '.join(f'{c} = :{c}' for c in missing)} WHERE "
                    "ticker = :ticker AND last_bar_date = :last_bar_date "
                    "AND model_version = :model_version"
                ),
                {c: row.get(c) for c in [*missing, "ticker", "last_bar_date", "model_version"]},
            )


NO_QUANTILES = 3  # the ledger fixture's first forecasts, made by a model saved before quantiles


def write_ledger_fixture(settings: Settings) -> int:
    """AMD's published bars to D2 and ten days of its forecasts in the ledger, scored, with a
    monitor row per day. Returns the number of scored forecasts."""
    import pandas as pd

    from ml.data.sources import SyntheticSource
    from ml.data.store import PriceStore
    from ml.forecasts.monitor import monitor
    from ml.universe import Instrument

    amd = Instrument("AMD", "stock", "AMD")
    bars = SyntheticSource().fetch(amd, date(2026, 5, 1), D2)
    store = PriceStore(settings.data_dir)
    store.publish(amd, bars, D2, "{}")
    closes = bars.set_index(bars["Date"].dt.strftime("%Y-%m-%d"))["Close"]
    days = list(closes.index[-11:])
    rows = []
    for k, day in enumerate(days):
        last = float(closes[day])
        row = {
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
        # Narrow intervals (a quarter of QUANTILES' spread), so some Closes fall outside.
        rows.append(row if k < NO_QUANTILES else with_quantiles(row, 0.25))
    record_with_quantiles(settings, rows)
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
    # D2: AMD's model forecasts quantiles, EURUSD=X's and SOL-USD's were saved before them.
    upsert_with_quantiles(
        settings,
        [
            with_quantiles(forecast_row("AMD", D2, 155.6043, model_version="4")),
            forecast_row("EURUSD=X", D2, 1.045017),
            forecast_row("SOL-USD", D2, 25.3844, source="yahoo"),
        ],
    )
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
    # ticker, last bar, last close, expected low, high, close, vs last, intervals, adj close,
    # range, model, source
    assert amd == [
        "AMD",
        "2026-11-20",
        "155.60",
        "154.05",
        "158.72",
        "156.38",
        "+0.50 %",
        "Close 90 %: 150.94 – 161.83 Close 80 %: 152.49 – 160.27 High q90: 162.61 Low q10: 150.16",
        "140.04",
        "3.00 %",
        "price-forecast-AMD v4",
        "synthetic data",
    ]
    assert eur[2:6] == ["1.0450", "1.0346", "1.0659", "1.0502"]  # 4 decimals for forex
    assert eur[7] == "no intervals for model v3 (saved before quantile forecasts)"
    # the point columns say what they are
    assert (
        '<th class="num" title="expected value (mean), not a bound">Expected Low</th>' in resp.text
    )
    assert "each is the expected value (mean),\nnot a bound" in resp.text
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
            expect(table).to_contain_text("Close 90 %: 150.94 – 161.83")
            expect(table).to_contain_text("no intervals for model v3")
            expect(table.locator("th").filter(has_text="Expected Close")).to_have_attribute(
                "title", "expected value (mean), not a bound"
            )
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
            # The past forecasts' Close intervals as bands, the Closes marked, the coverage.
            intervals = 10 - NO_QUANTILES
            expect(page.locator("svg.chart rect.interval90")).to_have_count(intervals)
            expect(page.locator("svg.chart rect.interval80")).to_have_count(intervals)
            expect(page.locator("svg.chart rect.next-interval90")).to_have_count(1)
            marks = page.locator("svg.chart .close-inside, svg.chart .close-outside")
            expect(marks).to_have_count(intervals)
            expect(page.locator("svg.chart g.legend")).to_contain_text("Close outside 90 %")
            box = page.locator("svg.chart rect.interval90").first.bounding_box()
            assert box is not None and box["width"] > 1 and box["height"] > 1  # drawn, not empty
            expect(page.locator("#coverage")).to_contain_text(
                re.compile(rf"Close 90 % interval held on [0-9]+ of {intervals} scored bars")
            )
            expect(page.locator("#next-intervals")).to_contain_text("Close 90 %:")
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
    for png in (dashboard_png, tmp_path / "ticker-chart.png", airflow_png):
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
    # The Close intervals of the forecasts that have them, their Closes marked inside or outside
    # the 90 % interval, as the bars' own Closes say; the next bar's intervals.
    with_intervals = scored - NO_QUANTILES
    assert html.count('class="interval90"') == html.count('class="interval80"') == with_intervals
    inside, outside = html.count('class="close-inside"'), html.count('class="close-outside"')
    assert inside + outside == with_intervals
    assert inside == expected_inside(env_settings)
    assert html.count('class="next-interval90"') == 1
    assert (
        f"Close 90 % interval held on {inside} of {with_intervals} scored bars "
        f"({inside / with_intervals:.2f}; nominal 0.90)"
    ) in html
    assert '<g class="legend"' in html and "Close inside 90 %" in html
    assert '<ul id="next-intervals"><li>Close 90 %: ' in html
    assert 'id="live"' in html and "beats the champion v3" in html
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org", "")
    assert resp.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert 'ticker/AMD">AMD</a>' in client.get("/").text  # linked from the table

    assert client.get("/ticker/NOSUCH").status_code == 404
    empty = client.get("/ticker/EURUSD=X")  # in the universe, nothing published or scored
    assert empty.status_code == 200 and "No published bars yet" in empty.text


def expected_inside(settings: Settings) -> int:
    """How many of the ledger fixture's scored Closes fell inside their 90 % interval, from the
    published bars themselves (the interval is last Close x [1 - 0.0075, 1 + 0.01])."""
    from ml.data.store import PriceStore
    from ml.universe import Instrument

    closes = list(PriceStore(settings.data_dir).load(Instrument("AMD", "stock", "AMD"))["Close"])
    pairs = list(zip(closes[-11:-1], closes[-10:], strict=True))[NO_QUANTILES:]
    lo, hi = (1 + (QUANTILES[c] - 1) * 0.25 for c in ("pred_close_q05", "pred_close_q95"))
    return sum(last * lo <= close <= last * hi for last, close in pairs)


def test_the_ticker_page_without_quantiles_says_so(client: Any, env_settings: Settings) -> None:
    """A ledger written before quantile forecasts (no such columns): the points, as before."""
    from ml.data.sources import SyntheticSource
    from ml.data.store import PriceStore
    from ml.forecasts.ledger import record_forecasts
    from ml.universe import Instrument

    amd = Instrument("AMD", "stock", "AMD")
    bars = SyntheticSource().fetch(amd, date(2026, 9, 1), D2)
    PriceStore(env_settings.data_dir).publish(amd, bars, D2, "{}")
    last = float(bars["Close"].iloc[-1])
    row = forecast_row("AMD", D2, last, model_version="2")
    record_forecasts(env_settings, [{**row, "last_bar_date": D2.isoformat()}])
    html = client.get("/ticker/AMD").text
    assert (
        '<p id="next-intervals">no intervals for model v2 (saved before quantile forecasts).'
        in html
    )
    assert '<p id="coverage">No scored forecast with intervals yet.</p>' in html
    assert "interval90" not in html and "close-inside" not in html and "legend" not in html


# --- the intervals' data functions, on hand-made rows ----------------------------------------------


def _bars(closes: list[float]) -> list[dict[str, Any]]:
    return [
        {"Date": f"2026-01-{i + 1:02d}", "High": c + 1, "Low": c - 1, "Close": c}
        for i, c in enumerate(closes)
    ]


def _forecast(day: int, last: float, q: tuple[Any, ...] | None, **more: Any) -> dict[str, Any]:
    """A ledger forecast made after bar `day` with Close quantiles q = (q05, q10, q90, q95)."""
    record = {
        "last_bar_date": f"2026-01-{day:02d}",
        "logical_date": f"2026-01-{day:02d}",
        "model_version": "2",
        "last_close": last,
        **more,
    }
    if q is not None:
        record.update(
            zip(
                ("pred_close_q05", "pred_close_q10", "pred_close_q90", "pred_close_q95"),
                q,
                strict=True,
            )
        )
    return record


def test_coverage_counts_the_intervals_that_held(plugin: ModuleType) -> None:
    from forecast_dashboard_app.intervals import coverage, interval_outcomes

    bars = _bars([100, 104, 100, 91, 100, 100, 100])
    records = [
        _forecast(1, 100, (95, 97, 103, 105)),  # bar 2: 104 inside 90 %, outside 80 %
        _forecast(2, 104, (99, 100, 108, 109)),  # bar 3: 100 inside both
        _forecast(3, 100, (92, 95, 105, 108)),  # bar 4: 91 outside both
        _forecast(4, 91, None),  # a model saved before quantiles: not scored
        _forecast(5, 100, (float("nan"), None, "", "x")),  # null in every form: not scored
        _forecast(6, 100, (90, 95, 105, 110), pred_high_q90=100.5, pred_low_q10=99.5),
        _forecast(7, 100, (90, 95, 105, 110)),  # the newest bar's: nothing to score yet
    ]
    # Bar 3 forecast again later by v3, whose interval misses: it replaces v2's.
    records.append(_forecast(3, 100, (99, 99.5, 100.5, 101), model_version="3"))
    records[-1]["logical_date"] = "2026-01-04"
    outcomes = interval_outcomes(records, bars)
    assert [o["target_date"][-2:] for o in outcomes] == ["02", "03", "04", "05", "06", "07"]
    assert [o["close_90"] for o in outcomes] == [True, True, False, None, None, True]
    assert [o["close_80"] for o in outcomes] == [False, True, False, None, None, True]
    assert outcomes[2]["model_version"] == "3"
    # the High (101) above its q90, the Low (99) below its q10
    assert (outcomes[5]["high_q90"], outcomes[5]["low_q10"]) == (False, False)
    assert coverage(outcomes) == {
        "close_90": (3, 4),
        "close_80": (2, 4),
        "high_q90": (0, 1),
        "low_q10": (0, 1),
    }
    assert coverage([]) == {k: (0, 0) for k in ("close_90", "close_80", "high_q90", "low_q10")}


def test_intervals_are_scaled_into_the_published_units(plugin: ModuleType) -> None:
    """A 2:1 split re-adjusted the published bars after the forecast: its quantiles are halved."""
    from forecast_dashboard_app.intervals import interval_outcomes

    bars = _bars([100, 101])  # published after the split; the forecast saw a last Close of 200
    (outcome,) = interval_outcomes([_forecast(1, 200, (196, 198, 204, 206))], bars)
    assert outcome["interval"] == (98, 99, 102, 103)
    assert outcome["close_90"] is True and outcome["close_80"] is True


def test_forecasts_without_quantiles_show_no_intervals(plugin: ModuleType) -> None:
    from forecast_dashboard_app.intervals import interval_outcomes
    from forecast_dashboard_app.models import coverage_lines, interval_lines

    assert interval_lines({"last_close": 10.0}, 2) == []  # the columns missing altogether
    nulls = dict.fromkeys(QUANTILES, float("nan")) | {"pred_close_q05": None}
    assert interval_lines(nulls, 2) == []
    lines = interval_lines(with_quantiles({"last_close": 600.0}), 2)
    assert lines == [
        "Close 90 %: 582.00 – 624.00",
        "Close 80 %: 588.00 – 618.00",
        "High q90: 627.00",
        "Low q10: 579.00",
    ]
    # Old ledger rows: no quantile column at all; nothing is scored, nothing breaks.
    old = [_forecast(1, 100, None), _forecast(2, 104, None)]
    outcomes = interval_outcomes(old, _bars([100, 104, 100]))
    assert len(outcomes) == 2 and all(o["interval"] is None for o in outcomes)
    assert coverage_lines(outcomes) == []
    assert coverage_lines(
        interval_outcomes([_forecast(1, 100, (95, 97, 103, 105))], _bars([100, 104]))
    ) == [
        "Close 90 % interval held on 1 of 1 scored bars (1.00; nominal 0.90)",
        "Close 80 % interval held on 0 of 1 scored bars (0.00; nominal 0.80)",
    ]


def test_the_json_api_carries_the_quantiles(client: Any, env_settings: Settings) -> None:
    write_fixture_data(env_settings)
    rows = {r["ticker"]: r for r in client.get("/api/forecasts").json()["rows"]}
    assert rows["AMD"]["pred_close_q95"] == pytest.approx(155.6043 * 1.04, abs=1e-5)
    assert rows["EURUSD=X"]["pred_close_q95"] is None  # null in the file
    older = client.get("/api/forecasts", params={"date": "2026-11-19"}).json()["rows"]
    assert all(r["pred_high_q90"] is None for r in older)
