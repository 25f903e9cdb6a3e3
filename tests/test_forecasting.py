"""ml.forecasts.export and ml.model.forecaster: the forecasts table written by `forecast_step`, and PriceForecaster save/load.

Uses the real MLflow server fixture and its own universe (tickers nobody else registers, since
registered model names are global on the session-wide server).
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ml.config import Settings
from ml.model.features import TARGETS
from tests.conftest import ingest as _ingest
from tests.conftest import isolated_settings
from tests.conftest import published_history as _history

AS_OF = date(2023, 12, 29)  # Friday
NEXT = date(2024, 1, 2)  # Tuesday: two more business-day bars (synthetic data has no holidays)
TICKER = "TFCST"
NO_CHAMPION = "TNOCH"


@pytest.fixture(scope="module")
def fc_settings(tmp_path_factory: pytest.TempPathFactory, mlflow_server) -> Settings:
    return isolated_settings(
        tmp_path_factory.mktemp("forecasting"),
        mlflow_server.uri,
        f"test-forecasting-{uuid.uuid4().hex[:8]}",
        {TICKER: "Forecast test", NO_CHAMPION: "No model"},
    )


@pytest.fixture(scope="module")
def champion(fc_settings: Settings) -> dict[str, Any]:
    """TICKER ingested up to NEXT, trained on AS_OF and promoted to champion."""
    from ml.steps.model import promote_step, train_step

    _ingest(TICKER, AS_OF, fc_settings)
    trained = train_step(TICKER, AS_OF, fc_settings)
    decision = promote_step(TICKER, AS_OF, trained, fc_settings)
    assert decision["promoted"] is True, decision
    _ingest(TICKER, NEXT, fc_settings)  # later bars exist: forecasts must stay point-in-time
    return decision


def _table(settings: Settings):
    from ml.forecasts.export import read_forecasts

    return read_forecasts(settings)


def _rows(settings: Settings, ticker: str, as_of: date):
    table = _table(settings)
    return table.loc[(table["ticker"] == ticker) & (table["logical_date"] == as_of.isoformat())]


@pytest.mark.slow
def test_forecast_step_writes_one_row_and_is_idempotent(
    champion: dict[str, Any], fc_settings: Settings
) -> None:
    from ml.forecasts.export import FORECAST_COLUMNS, forecasts_path
    from ml.steps.forecast import forecast_step

    first = forecast_step(TICKER, AS_OF, fc_settings)
    assert first is not None
    path = forecasts_path(fc_settings)
    assert path == fc_settings.data_dir / "forecasts" / "forecasts.csv"
    assert path.exists()
    table = _table(fc_settings)
    assert list(table.columns) == FORECAST_COLUMNS
    assert len(_rows(fc_settings, TICKER, AS_OF)) == 1
    content = path.read_bytes()

    second = forecast_step(TICKER, AS_OF, fc_settings)  # the row kept, read back from the table
    assert second.keys() == first.keys()
    for key, value in first.items():
        assert second[key] == (
            pytest.approx(value, abs=1e-6) if isinstance(value, float) else value
        )
    assert len(_rows(fc_settings, TICKER, AS_OF)) == 1
    assert path.read_bytes() == content
    assert not table.duplicated(["ticker", "logical_date"]).any()


@pytest.mark.slow
def test_forecast_row_holds_prices_from_the_champion(
    champion: dict[str, Any], fc_settings: Settings
) -> None:
    from ml.steps.forecast import forecast_step

    row = forecast_step(TICKER, AS_OF, fc_settings)
    assert row is not None
    history = _history(fc_settings, TICKER, AS_OF)
    assert row["ticker"] == TICKER
    assert row["logical_date"] == AS_OF.isoformat()
    # Point in time: bars after AS_OF are published but not used.
    assert row["last_bar_date"] == AS_OF.isoformat()
    assert row["last_close"] == pytest.approx(float(history["Close"].iloc[-1]))
    assert row["model_name"] == f"price-forecast-{TICKER}"
    assert row["model_version"] == champion["champion_version"]
    assert row["source"] == "synthetic"

    last_close = row["last_close"]
    for key in ("pred_high", "pred_low", "pred_close", "pred_adj_close"):
        assert 0.8 * last_close < row[key] < 1.2 * last_close, (key, row[key], last_close)
    assert row["pred_high"] >= row["pred_low"]

    # The stored row matches the registered model served through pyfunc.
    import mlflow

    from ml.data.sources import PRICE_COLUMNS

    mlflow.set_tracking_uri(fc_settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(fc_settings.mlflow_tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/price-forecast-{TICKER}@champion")
    # At least the model's context (window + 66 bars of volatility memory + 1), as documented.
    served = model.predict(history[PRICE_COLUMNS].tail(100).reset_index(drop=True)).iloc[-1]
    stored = _rows(fc_settings, TICKER, AS_OF).iloc[0]
    for target, key in zip(
        TARGETS, ("pred_high", "pred_low", "pred_close", "pred_adj_close"), strict=True
    ):
        assert stored[key] == pytest.approx(served[target], abs=1e-6)
    assert str(stored["model_version"]) == champion["champion_version"]


@pytest.mark.slow
def test_forecasts_for_two_dates_are_both_kept(
    champion: dict[str, Any], fc_settings: Settings
) -> None:
    from ml.steps.forecast import forecast_step

    first = forecast_step(TICKER, AS_OF, fc_settings)
    second = forecast_step(TICKER, NEXT, fc_settings)
    assert first is not None and second is not None
    assert second["last_bar_date"] == NEXT.isoformat()
    assert second["last_close"] == pytest.approx(
        float(_history(fc_settings, TICKER, NEXT)["Close"].iloc[-1])
    )
    assert second["pred_close"] != first["pred_close"]

    table = _table(fc_settings)
    mine = table.loc[table["ticker"] == TICKER]
    assert sorted(mine["logical_date"]) == [AS_OF.isoformat(), NEXT.isoformat()]
    assert len(_rows(fc_settings, TICKER, AS_OF)) == 1
    assert len(_rows(fc_settings, TICKER, NEXT)) == 1
    # Re-running the earlier date does not disturb the later one.
    forecast_step(TICKER, AS_OF, fc_settings)
    again = _rows(fc_settings, TICKER, NEXT).iloc[0]
    assert again["pred_close"] == pytest.approx(second["pred_close"], abs=1e-6)
    assert list(_table(fc_settings)["logical_date"]) == sorted(_table(fc_settings)["logical_date"])
    for _, row in _table(fc_settings).iterrows():
        assert 0.8 * row["last_close"] < row["pred_close"] < 1.2 * row["last_close"]
        assert row["pred_high"] >= row["pred_low"]


@pytest.mark.slow
def test_ticker_without_champion_returns_none_and_writes_nothing(
    fc_settings: Settings, tmp_path: Path
) -> None:
    from ml.forecasts.export import forecasts_path
    from ml.steps.forecast import forecast_step

    # On a fresh store: no table is created.
    fresh = replace(fc_settings, data_dir=tmp_path / "data")
    _ingest(NO_CHAMPION, AS_OF, fresh)
    assert forecast_step(NO_CHAMPION, AS_OF, fresh) is None
    assert not forecasts_path(fresh).exists()

    # On the shared store: an existing table is left byte-identical.
    path = forecasts_path(fc_settings)
    before = path.read_bytes() if path.exists() else None
    assert forecast_step(NO_CHAMPION, AS_OF, fc_settings) is None
    after = path.read_bytes() if path.exists() else None
    assert after == before


@pytest.mark.slow
def test_a_champion_whose_files_are_gone_fails_alone_in_the_batch(
    tmp_path: Path, mlflow_server
) -> None:
    """forecast_all downloads the champions' files a few at a time before loading them one by
    one: a champion whose network file was deleted from the artifact store fails its ticker
    with the download's error; the other ticker is forecast and written."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from ml.registry.client import CHAMPION, get_client
    from ml.steps.forecast import forecast_all
    from ml.steps.model import train_step

    ok, broken = "TFOKB", "TFGONE"
    settings = isolated_settings(
        tmp_path, mlflow_server.uri, f"test-fc-gone-{uuid.uuid4().hex[:8]}", {ok: "A", broken: "B"}
    )
    client = get_client(settings)
    for ticker in (ok, broken):
        _ingest(ticker, AS_OF, settings)
        trained = train_step(ticker, AS_OF, settings)
        # The champion alias as the gate would set it (the gate's verdict is not under test).
        client.set_registered_model_alias(f"price-forecast-{ticker}", CHAMPION, trained["version"])
    location = client.get_model_version_download_uri(f"price-forecast-{broken}", "1")
    get_artifact_repository(location).delete_artifacts("artifacts/model.keras")

    result = forecast_all([ok, broken], AS_OF, settings)

    assert list(result["forecasts"]) == [ok], result
    assert list(result["failed"]) == [broken], result
    assert "model.keras" in result["failed"][broken], result["failed"]
    assert _rows(settings, ok, AS_OF).shape[0] == 1
    assert _rows(settings, broken, AS_OF).empty


@pytest.mark.slow
def test_forecast_with_unreachable_registry_fails_loudly(
    fc_settings: Settings, tmp_path: Path, monkeypatch
) -> None:
    from mlflow.exceptions import MlflowException

    from ml.forecasts.export import forecasts_path
    from ml.registry.client import MlflowUnreachable
    from ml.servers import free_port
    from ml.steps.forecast import forecast_step

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    down = replace(
        fc_settings,
        data_dir=tmp_path / "data",
        mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}",
        mlflow_unreachable_timeout=1,
    )
    _ingest(TICKER, AS_OF, down)
    try:
        result = forecast_step(TICKER, AS_OF, down)
    except (MlflowException, MlflowUnreachable):
        assert not forecasts_path(down).exists()
        return
    raise AssertionError(f"forecast_step returned {result!r} with the registry unreachable")


@pytest.mark.slow
def test_price_forecaster_save_load_round_trip(
    champion: dict[str, Any], fc_settings: Settings, tmp_path: Path
) -> None:
    from ml.model.forecaster import KERAS_FILE, PREPROCESSING_FILE, PriceForecaster
    from ml.registry.versions import load_forecaster
    from ml.steps.common import instrument_for

    loaded = load_forecaster(instrument_for(TICKER, fc_settings), fc_settings)
    assert loaded is not None
    forecaster, version = loaded
    assert version == champion["champion_version"]
    forecaster.skill_weights = (0.75, 0.5, 0.25, 1.0)  # non-default values must survive too

    paths = forecaster.save(tmp_path / "saved")
    assert Path(paths["keras_model"]).name == KERAS_FILE
    assert Path(paths["preprocessing"]).name == PREPROCESSING_FILE
    restored = PriceForecaster.load(paths["keras_model"], paths["preprocessing"])

    assert restored.kind == forecaster.kind
    assert restored.window == forecaster.window
    assert restored.skill_weights == forecaster.skill_weights
    np.testing.assert_array_equal(restored.x_scaler.mean, forecaster.x_scaler.mean)
    np.testing.assert_array_equal(restored.y_scaler.std, forecaster.y_scaler.std)
    for a, b in zip(forecaster.model.get_weights(), restored.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)

    history = _history(fc_settings, TICKER, NEXT).tail(120).reset_index(drop=True)
    expected = forecaster.predict_frame(history)
    actual = restored.predict_frame(history)
    assert list(actual["Date"]) == list(expected["Date"])
    np.testing.assert_allclose(
        actual[list(TARGETS)].to_numpy(), expected[list(TARGETS)].to_numpy(), rtol=1e-12
    )


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_champions_forecast(
    champion: dict[str, Any], fc_settings: Settings, tmp_path: Path
) -> None:
    """`mlflow models serve -m models:/<name>@champion` (as docs/operations.md documents it)
    from the test server, in this environment (`--env-manager local`); POST the last bars, get
    the forecast."""
    import json
    import os
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    from ml.config import without_pipeline_env
    from ml.data.sources import PRICE_COLUMNS
    from ml.registry.versions import load_forecaster
    from ml.servers import free_port
    from ml.steps.common import instrument_for

    port = free_port()
    env = without_pipeline_env(dict(os.environ))
    # As docs/operations.md says: the venv's bin on PATH (the server execs `uvicorn` by name).
    bin_dir = Path(sys.executable).parent
    env.update(
        MLFLOW_TRACKING_URI=fc_settings.mlflow_tracking_uri,
        MLFLOW_DISABLE_TELEMETRY="true",
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
    )
    mlflow_cli = bin_dir / "mlflow"
    model_uri = f"models:/price-forecast-{TICKER}@champion"
    address = ["--host", "127.0.0.1", "--port", str(port)]
    serve = subprocess.Popen(
        [str(mlflow_cli), "models", "serve", "-m", model_uri, "--env-manager", "local", *address],
        env=env,
        cwd=tmp_path,
        stdout=open(tmp_path / "serve.log", "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        bars = _history(fc_settings, TICKER, AS_OF)[PRICE_COLUMNS].tail(100).reset_index(drop=True)
        days = bars.assign(Date=bars["Date"].dt.strftime("%Y-%m-%d"))
        payload = {"dataframe_split": json.loads(days.to_json(orient="split", index=False))}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
            answer = json.loads(response.read())
        served = answer["predictions"][-1]
        forecaster, _ = load_forecaster(instrument_for(TICKER, fc_settings), fc_settings)
        expected = forecaster.predict_frame(bars).iloc[-1]
        from ml.model.quantiles import quantile_columns

        for target in (*TARGETS, *quantile_columns()):  # the points and the quantiles
            assert served[target] == pytest.approx(float(expected[target]), rel=1e-6)
    finally:
        os.killpg(serve.pid, 15)
        serve.wait(timeout=30)


@pytest.mark.slow
def test_the_registered_model_loads_and_predicts_without_the_project(
    champion: dict[str, Any], fc_settings: Settings, tmp_path: Path
) -> None:
    """The model carries the code it needs (`ml.registry.pyfunc.serving_code`: only the modules
    the pyfunc imports, not the whole package). In a process that cannot import this checkout's
    `ml` (editable-install finder removed, another working directory), `mlflow.pyfunc.load_model`
    imports `ml` from the model's own code folder and forecasts what the pipeline forecasts."""
    import json
    import os
    import subprocess
    import sys

    from ml.config import PROJECT_ROOT, without_pipeline_env
    from ml.data.sources import PRICE_COLUMNS
    from ml.registry.versions import load_forecaster
    from ml.steps.common import instrument_for

    bars = _history(fc_settings, TICKER, AS_OF)[PRICE_COLUMNS].tail(100).reset_index(drop=True)
    bars.to_parquet(tmp_path / "bars.parquet", index=False)
    script = (
        "import json, sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]\n"
        f"sys.path[:] = [p for p in sys.path if p not in ('', {str(PROJECT_ROOT)!r})]\n"
        "try:\n"
        "    import ml\n"
        "    sys.exit('the project is still importable: ' + ml.__file__)\n"
        "except ImportError:\n"
        "    pass\n"
        "import mlflow, pandas as pd\n"
        f"model = mlflow.pyfunc.load_model('models:/price-forecast-{TICKER}@champion')\n"
        "import ml\n"
        "shipped = sorted(m for m in sys.modules if m == 'ml' or m.startswith('ml.'))\n"
        "row = model.predict(pd.read_parquet(sys.argv[1])).iloc[-1]\n"
        "print(json.dumps({'ml': ml.__file__, 'modules': shipped,\n"
        "                  'row': {k: float(row[k]) for k in ('High', 'Low', 'Close')}}))\n"
    )
    env = without_pipeline_env(dict(os.environ))
    env.update(MLFLOW_TRACKING_URI=fc_settings.mlflow_tracking_uri, PYTHONPATH="")
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "bars.parquet")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert not out["ml"].startswith(str(PROJECT_ROOT)), out["ml"]
    assert "/code/ml/" in out["ml"], out["ml"]
    assert "ml.registry.pyfunc" in out["modules"] and "ml.steps.model" not in out["modules"]
    # the price schema comes from its own module: no data source or Yahoo client in the model
    assert "ml.data.schema" in out["modules"] and "ml.data.yahoo" not in out["modules"]
    forecaster, _ = load_forecaster(instrument_for(TICKER, fc_settings), fc_settings)
    expected = forecaster.predict_frame(bars).iloc[-1]
    for target, value in out["row"].items():
        assert value == pytest.approx(float(expected[target]), rel=1e-6)
