"""ml.registry against a real `mlflow server`: logging, registration, aliases, the promotion gate.

The registered model names are global on the (session-wide) test server, so this module uses its
own universe file with tickers no other test registers; the data are the synthetic source's.
"""

from __future__ import annotations

import json
import math
import os
import threading
import uuid
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import pytest

from ml.config import GateConfig, Settings
from ml.model.features import TARGETS
from ml.model.quantiles import quantile_columns
from ml.registry.client import CHALLENGER, CHAMPION, get_alias, get_client
from ml.registry.gate import gate_failures, read_dm, score
from ml.registry.promotion import promote_if_better
from ml.registry.tracking import log_candidate
from tests.conftest import ingest as _ingest
from tests.conftest import isolated_settings
from tests.conftest import published_history as _history

AS_OF = date(2023, 12, 29)  # a Friday
SATURDAY = date(2023, 12, 30)
MAIN = "TREG"  # the main flow: first train, reuse, skip, a worse candidate
RACE = "TRACE"  # two good versions racing to promote
PIT = "TPIT"  # point in time: a later date first, then a backfill of an earlier one
NAIVE = "TNAIVE"  # a first candidate that fails the gate: the range-aware naive is the champion
OLD = "TOLD"  # a model logged the way models were before "models from code"
SVG_NS = "http://www.w3.org/2000/svg"


# --------------------------------------------------------------------------------------------------
# Gate (pure)
# --------------------------------------------------------------------------------------------------


def _dm(high: float = 0.001, low: float = 0.001, close: float = float("nan")) -> dict:
    """DM results: p_better of High and Low, p_worse of Close (NaN: Close = persistence)."""
    return {
        "High": {"stat": -3.0, "p_better": high, "p_worse": 1 - high},
        "Low": {"stat": -3.0, "p_better": low, "p_worse": 1 - low},
        "Close": {"stat": 0.0, "p_better": 1 - close, "p_worse": close},
    }


def test_gate_passes_a_candidate_that_beats_persistence() -> None:
    assert gate_failures({"High": 0.7, "Low": 0.8, "Close": 0.99}, _dm(), GateConfig()) == []


def test_gate_high_and_low_are_strict() -> None:
    failures = gate_failures({"High": 1.0, "Low": 0.5, "Close": 0.5}, _dm(), GateConfig())
    assert len(failures) == 1 and "High" in failures[0] and "<" in failures[0]
    failures = gate_failures({"High": 0.5, "Low": 1.0, "Close": 0.5}, _dm(), GateConfig())
    assert len(failures) == 1 and "Low" in failures[0]


def test_gate_high_and_low_must_be_significantly_better_than_persistence() -> None:
    u2 = {"High": 0.98, "Low": 0.97, "Close": 1.0}
    failures = gate_failures(u2, _dm(high=0.2), GateConfig())
    assert failures == [
        "High not significantly better than persistence (Diebold-Mariano p 0.2 not < 0.05)"
    ]
    assert gate_failures(u2, _dm(high=0.2), GateConfig(p_value=0.25)) == []
    assert len(gate_failures(u2, _dm(high=float("nan")), GateConfig())) == 1  # fails closed


def test_gate_close_fails_only_when_significantly_worse_than_persistence() -> None:
    # A Close U2 of 1.012 that is noise passes (the raw U2 <= 1 rule rejected it).
    assert (
        gate_failures({"High": 0.9, "Low": 0.9, "Close": 1.012}, _dm(close=0.3), GateConfig()) == []
    )
    assert gate_failures({"High": 0.9, "Low": 0.9, "Close": 1.0}, _dm(), GateConfig()) == []
    failures = gate_failures(
        {"High": 0.9, "Low": 0.9, "Close": 1.013}, _dm(close=0.025), GateConfig()
    )
    assert len(failures) == 1 and failures[0].startswith("Close significantly worse")


@pytest.mark.parametrize("target", ["High", "Low", "Close"])
def test_gate_fails_closed_on_nan_and_missing_values(target: str) -> None:
    u2 = {"High": 0.5, "Low": 0.5, "Close": 0.5}
    assert len(gate_failures({**u2, target: math.nan}, _dm(), GateConfig())) == 1
    del u2[target]
    assert len(gate_failures(u2, _dm(), GateConfig())) == 1


def test_gate_without_dm_statistics_fails_closed() -> None:
    """A version registered before the gate used Diebold-Mariano has no `test_dm` tag."""
    failures = gate_failures({"High": 0.5, "Low": 0.5, "Close": 1.0}, {}, GateConfig())
    assert len(failures) == 2 and all("significantly better" in f for f in failures)


@pytest.mark.slow
def test_gate_refuses_a_candidate_significantly_worse_than_the_range_aware_naive() -> None:
    u2 = {"High": 0.7, "Low": 0.8, "Close": 1.0}
    naive = {
        "High": {"stat": 2.5, "p_worse": 0.01, "p_better": 0.99},
        "Low": {"stat": -1.0, "p_worse": 0.84, "p_better": 0.16},
    }
    failures = gate_failures(u2, _dm(), GateConfig(), naive)
    assert failures == [
        "High significantly worse than the range-aware naive (Diebold-Mariano p 0.01 < 0.05)"
    ]
    # Not significantly worse, or equal to the naive (no test: NaN), passes.
    naive["High"] = {"stat": 1.0, "p_worse": 0.16, "p_better": 0.84}
    assert gate_failures(u2, _dm(), GateConfig(), naive) == []
    equal = {t: {"stat": math.nan, "p_worse": math.nan, "p_better": math.nan} for t in naive}
    assert gate_failures(u2, _dm(), GateConfig(), equal) == []
    # A version registered before the test existed (no tag) is judged without it.
    assert gate_failures(u2, _dm(), GateConfig(), None) == []


def test_unreachable_registry_is_an_error_not_a_missing_champion(monkeypatch) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from ml.servers import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    down = f"http://127.0.0.1:{free_port()}"
    client = MlflowClient(tracking_uri=down, registry_uri=down)  # get_client would not get this far
    try:
        get_alias(client, f"price-forecast-{MAIN}", CHAMPION)
    except MlflowException:
        return
    raise AssertionError("get_alias returned instead of raising on an unreachable server")


def test_mlflow_retries_of_a_request_fit_in_the_unreachable_timeout() -> None:
    """MLflow's backoff (0, 4, 8, 16, 32, 64, 120 s ...) cut at the last retry that fits; at
    least one retry, at most MLflow's 10."""
    from ml.registry.client import mlflow_retries_within, mlflow_retry_budget

    assert [mlflow_retry_budget(n) for n in range(1, 8)] == [0, 4, 12, 28, 60, 124, 244]
    assert mlflow_retries_within(60) == 5
    assert mlflow_retries_within(123) == 5 and mlflow_retries_within(124) == 6
    assert mlflow_retries_within(0.5) == 1 and mlflow_retries_within(1e6) == 10
    assert (
        mlflow_retries_within(60, factor=1) == 5
    )  # 0, 2, 4, 8, 16 s; a sixth (32 s) would not fit


def _stub_health_server(port: int, after: float) -> threading.Thread:
    """An HTTP server on `port` that starts listening `after` seconds from now and answers one
    request (a tracking server coming back from a restart)."""
    import time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args: Any) -> None:
            pass

    def serve() -> None:
        time.sleep(after)
        with HTTPServer(("127.0.0.1", port), Health) as server:
            server.handle_request()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_a_tracking_server_back_within_the_timeout_is_waited_for(monkeypatch) -> None:
    import time

    from ml.config import get_settings
    from ml.registry import client
    from ml.servers import free_port

    monkeypatch.setattr(client, "_REACHED", {})
    port = free_port()
    settings = replace(
        get_settings({}),
        mlflow_tracking_uri=f"http://127.0.0.1:{port}",
        mlflow_unreachable_timeout=30,
    )
    server = _stub_health_server(port, after=1.5)
    started = time.monotonic()
    client.ensure_reachable(settings)
    assert 1.5 <= time.monotonic() - started < 15
    server.join(5)
    client.ensure_reachable(settings)  # answered once: not asked again (nothing listens now)


def test_an_unreachable_tracking_server_fails_once_within_the_timeout(monkeypatch) -> None:
    """One line naming the URI after the timeout; the process's later steps fail at once."""
    import time

    from ml.config import get_settings
    from ml.registry import client
    from ml.servers import free_port

    monkeypatch.setattr(client, "_REACHED", {})
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    uri = f"http://127.0.0.1:{free_port()}"
    settings = replace(get_settings({}), mlflow_tracking_uri=uri, mlflow_unreachable_timeout=1)
    for bound in (1 + 5, 0.1):  # the timeout (and a last try of at most 0.5 s), then at once
        started = time.monotonic()
        with pytest.raises(client.MlflowUnreachable) as excinfo:
            get_client(settings)
        assert time.monotonic() - started < bound
        assert uri in str(excinfo.value) and "\n" not in str(excinfo.value)
    # A request that meets the server away later gives up within the timeout too (1 s: one
    # retry, at once), unless MLFLOW_HTTP_REQUEST_MAX_RETRIES was set.
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"


def test_gate_reports_every_failing_target() -> None:
    u2 = {"High": 1.2, "Low": 1.1, "Close": 1.05}
    failures = gate_failures(u2, _dm(high=0.9, low=0.9, close=0.001), GateConfig())
    assert len(failures) == 5


def test_gate_honours_configured_thresholds() -> None:
    gate = GateConfig(u2_high_max=0.8, u2_low_max=0.9)
    assert gate_failures({"High": 0.79, "Low": 0.89, "Close": 0.95}, _dm(), gate) == []
    assert len(gate_failures({"High": 0.85, "Low": 0.89, "Close": 0.95}, _dm(), gate)) == 1
    assert len(gate_failures({"High": 0.79, "Low": 0.9, "Close": 0.95}, _dm(), gate)) == 1
    loose = GateConfig(u2_high_max=1.2, u2_low_max=1.2)
    assert gate_failures({"High": 1.1, "Low": 1.1, "Close": 1.1}, _dm(), loose) == []


def test_score_is_the_mean_u2_over_high_low_close() -> None:
    assert score({"High": 0.6, "Low": 0.9, "Close": 1.2, "Adj Close": 99.0}) == pytest.approx(0.9)


# --------------------------------------------------------------------------------------------------
# Fixtures: a universe, a data dir and an experiment of our own on the shared MLflow server
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reg_settings(tmp_path_factory: pytest.TempPathFactory, mlflow_server) -> Settings:
    return isolated_settings(
        tmp_path_factory.mktemp("registry"),
        mlflow_server.uri,
        f"test-registry-{uuid.uuid4().hex[:8]}",
        {
            MAIN: "Registry test",
            RACE: "Race test",
            PIT: "Point-in-time test",
            NAIVE: "Naive fallback test",
            OLD: "Old-format model test",
        },
    )


def _versions(settings: Settings, ticker: str) -> list:
    from ml.steps.common import instrument_for

    name = instrument_for(ticker, settings).model_name
    return get_client(settings).search_model_versions(f"name = '{name}'")


@pytest.fixture(scope="module")
def first_run(reg_settings: Settings) -> dict[str, Any]:
    """Ingest MAIN, then the first train_step + promote_step for it."""
    from ml.steps.model import promote_step, train_step

    _ingest(MAIN, AS_OF, reg_settings)
    trained = train_step(MAIN, AS_OF, reg_settings)
    client = get_client(reg_settings)
    name = f"price-forecast-{MAIN}"
    challenger_after_train = get_alias(client, name, CHALLENGER)
    promoted = promote_step(MAIN, AS_OF, trained, reg_settings)
    return {
        "trained": trained,
        "promoted": promoted,
        "name": name,
        "challenger_after_train": challenger_after_train,
    }


# --------------------------------------------------------------------------------------------------
# First training: version, tags, aliases, run contents, logged model
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_first_train_registers_version_one_as_challenger(
    first_run: dict[str, Any], reg_settings: Settings
) -> None:
    trained = first_run["trained"]
    assert trained["status"] == "trained"
    assert trained["version"] == "1"
    assert trained["ticker"] == MAIN
    assert trained["logical_date"] == AS_OF.isoformat()
    assert set(trained["candidates"]) == {"lstm", "gru"}
    assert trained["chosen_kind"] in ("lstm", "gru")
    assert set(trained["metrics"]) == set(TARGETS)  # the test U2 per target
    assert first_run["challenger_after_train"].version == "1"
    # The newest version always holds `challenger`.
    client = get_client(reg_settings)
    newest = max(int(v.version) for v in _versions(reg_settings, MAIN))
    assert get_alias(client, first_run["name"], CHALLENGER).version == str(newest)


@pytest.mark.slow
def test_first_version_tags(first_run: dict[str, Any], reg_settings: Settings) -> None:
    from ml.data.store import data_fingerprint

    client = get_client(reg_settings)
    mv = client.get_model_version(first_run["name"], "1")
    tags = mv.tags
    assert tags["ticker"] == MAIN
    assert tags["logical_date"] == AS_OF.isoformat()
    assert tags["data_fingerprint"] == data_fingerprint(_history(reg_settings, MAIN, AS_OF))
    assert tags["config_fingerprint"] == reg_settings.model.fingerprint()
    assert tags["code_version"]
    assert tags["model_kind"] == first_run["trained"]["chosen_kind"]
    assert tags["run_id"] == first_run["trained"]["run_id"] == mv.run_id
    u2 = json.loads(tags["test_u2"])
    assert set(u2) == set(TARGETS)
    naive = json.loads(tags["test_u2_range_naive"])
    assert set(naive) == {"High", "Low"}
    assert naive == first_run["trained"]["metrics_range_naive"]
    assert f"U2 vs range-aware naive High {naive['High']:.4f}" in tags["gate_reason"]
    intervals = json.loads(tags["test_intervals"])  # what the gate's interval questions read
    assert intervals == first_run["trained"]["intervals"]
    assert intervals["n"] == int(client.get_run(mv.run_id).data.params["n_test"])
    low, high = intervals["band"]
    assert 0.0 < low < 0.9 < high < 1.0
    assert set(intervals["coverage"]) >= {"close_80", "close_90", "high_q90", "low_q10"}
    assert "Close 90 % coverage" in tags["gate_reason"]
    # Decision tags are written by promotion.
    assert tags["gate_status"] in ("promoted", "rejected")
    assert tags["gate_reason"]
    assert tags["validation_status"] in ("passed", "failed")
    assert tags["validation_reason"]


@pytest.mark.slow
def test_first_version_passes_the_gate_and_becomes_champion(
    first_run: dict[str, Any], reg_settings: Settings
) -> None:
    promoted = first_run["promoted"]
    tags = get_client(reg_settings).get_model_version(first_run["name"], "1").tags
    u2 = json.loads(tags["test_u2"])
    dm = read_dm(tags["test_dm"])
    # synthetic High/Low are predictable
    assert gate_failures(u2, dm, reg_settings.gate) == [], (u2, dm)
    assert promoted["promoted"] is True
    assert promoted["champion_version"] == "1"
    assert "first champion" in promoted["reason"]
    assert tags["gate_status"] == "promoted"
    assert tags["validation_status"] == "passed"
    assert tags["gate_reason"] == promoted["reason"]
    assert get_alias(get_client(reg_settings), first_run["name"], CHAMPION).version == "1"


@pytest.mark.slow
def test_run_has_params_epoch_metrics_and_test_metrics(
    first_run: dict[str, Any], reg_settings: Settings
) -> None:
    client = get_client(reg_settings)
    run_id = first_run["trained"]["run_id"]
    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == reg_settings.experiment_name

    params = run.data.params
    assert params["units"] == "16"
    assert params["max_epochs"] == "4"
    assert params["window"] == str(reg_settings.model.window)
    assert params["kinds"] == "lstm,gru"
    assert params["chosen_kind"] == first_run["trained"]["chosen_kind"]
    assert int(params["n_train"]) > int(params["n_val"]) > int(params["n_test"]) > 0
    assert params["history_end"] == AS_OF.isoformat()

    candidates = first_run["trained"]["candidates"]
    for kind in ("lstm", "gru"):
        for key in ("loss", "val_loss"):
            history = client.get_metric_history(run_id, f"{kind}_{key}")
            steps = sorted(m.step for m in history)
            assert len(steps) == candidates[kind]["epochs"] >= 2
            assert steps == list(range(1, len(steps) + 1))
        val = sorted(client.get_metric_history(run_id, f"{kind}_val_loss"), key=lambda m: m.step)
        assert min(m.value for m in val) == pytest.approx(candidates[kind]["best_val_loss"])

    metrics = run.data.metrics
    for key in (
        "test_u2_high",
        "test_u2_low",
        "test_u2_close",
        "test_rmse_close",
        "test_mae_high",
        "test_mase_low",
        "test_baseline_persistence_rmse_close",
        "test_baseline_range_naive_rmse_high",
        "test_u2_range_naive_high",
        "test_directional_n",
        "test_range_inside",
        "test_n_test",
        "test_coverage_close_90",
        "test_coverage_close_90_historical",
        "test_interval_score_close_90",
        "test_interval_score_close_90_vs_historical",
        "test_interval_score_close_90_vs_gaussian",
        "test_pinball_high_q90_vs_historical",
        "test_pinball_tails_vs_historical",
        "test_dm_interval_score_historical_p_worse",
    ):
        assert key in metrics, key
    assert metrics["test_n_test"] == float(params["n_test"])
    tag_u2 = json.loads(client.get_model_version(first_run["name"], "1").tags["test_u2"])
    assert metrics["test_u2_high"] == pytest.approx(tag_u2["High"], abs=1e-6)
    # U2 is the model RMSE relative to persistence.
    assert metrics["test_u2_close"] == pytest.approx(
        metrics["test_rmse_close"] / metrics["test_baseline_persistence_rmse_close"], rel=1e-6
    )


@pytest.mark.slow
def test_run_artifacts_plot_and_validation_report(
    first_run: dict[str, Any], reg_settings: Settings, tmp_path: Path
) -> None:
    import mlflow

    client = get_client(reg_settings)
    run_id = first_run["trained"]["run_id"]
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"plots", "validation", "training_summary.json"} <= top

    svg = mlflow.artifacts.download_artifacts(
        run_id=run_id,
        artifact_path="plots/test_predictions.svg",
        dst_path=str(tmp_path / "svg"),
        tracking_uri=reg_settings.mlflow_tracking_uri,
    )
    # A standalone SVG document: one chart per judged target, each with the three series drawn
    # over the test block's dates.
    root = ElementTree.parse(svg).getroot()
    assert root.tag == f"{{{SVG_NS}}}svg"
    charts = root.findall(f"{{{SVG_NS}}}svg")
    assert [c.get("aria-label") for c in charts] == ["High", "Low", "Close"]
    for chart in charts:
        lines = chart.findall(f"{{{SVG_NS}}}polyline")
        assert [line.findtext(f"{{{SVG_NS}}}title") for line in lines] == [
            "actual",
            "model",
            "persistence",
        ]
        assert all(len(line.get("points").split()) > 10 for line in lines)

    reports = [a.path for a in client.list_artifacts(run_id, "validation")]
    assert reports == [f"validation/{AS_OF.isoformat()}.json"]
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id,
        artifact_path=reports[0],
        dst_path=str(tmp_path / "report"),
        tracking_uri=reg_settings.mlflow_tracking_uri,
    )
    from ml.data.store import PriceStore
    from ml.steps.common import instrument_for

    store_report = PriceStore(reg_settings.data_dir).report_path(
        instrument_for(MAIN, reg_settings), AS_OF
    )
    assert Path(local).read_text() == store_report.read_text()
    assert json.loads(Path(local).read_text())  # a real JSON document

    mlflow.set_tracking_uri(reg_settings.mlflow_tracking_uri)
    summary = mlflow.artifacts.load_dict(f"runs:/{run_id}/training_summary.json")
    assert {c["kind"] for c in summary["candidates"]} == {"lstm", "gru"}


@pytest.mark.slow
def test_logged_model_has_signature_and_input_example(
    first_run: dict[str, Any], reg_settings: Settings, tmp_path: Path
) -> None:
    import mlflow
    from mlflow.models import Model

    from ml.data.sources import PRICE_COLUMNS

    mlflow.set_tracking_uri(reg_settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(reg_settings.mlflow_tracking_uri)
    uri = f"models:/{first_run['name']}/1"
    info = mlflow.models.get_model_info(uri)
    assert info.signature is not None
    assert info.signature.inputs.input_names() == PRICE_COLUMNS
    assert set(TARGETS) | set(quantile_columns()) <= set(info.signature.outputs.input_names())
    assert info.saved_input_example_info is not None

    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path))
    example = Model.load(local).load_input_example(local)
    assert list(example.columns) == PRICE_COLUMNS
    model = reg_settings.model  # the window, the longest memory horizon, one bar for the return
    assert len(example) == model.window + max(*model.vol_horizons, model.naive_lookback) + 1
    history = _history(reg_settings, MAIN, AS_OF)
    np.testing.assert_allclose(
        example["Close"].to_numpy(dtype=float), history["Close"].iloc[-len(example) :].to_numpy()
    )


@pytest.mark.slow
def test_champion_loads_through_pyfunc_and_predicts_prices(
    first_run: dict[str, Any], reg_settings: Settings
) -> None:
    import mlflow

    from ml.data.sources import PRICE_COLUMNS

    mlflow.set_tracking_uri(reg_settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(reg_settings.mlflow_tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{first_run['name']}@{CHAMPION}")
    assert model.metadata.run_id == first_run["trained"]["run_id"]
    bars = _history(reg_settings, MAIN, AS_OF)[PRICE_COLUMNS].tail(30).reset_index(drop=True)
    out = model.predict(bars)
    assert list(out.columns) == ["Date", *TARGETS, *quantile_columns()]
    assert (out["Close q05"] < out["Close q95"]).all() and (out["High q90"] > out["Low q10"]).all()
    assert len(out) == len(bars) - reg_settings.model.window
    assert out["Date"].iloc[-1] == bars["Date"].iloc[-1]
    closes = bars["Close"].iloc[reg_settings.model.window :].to_numpy()
    values = out[list(TARGETS)].to_numpy()
    assert np.isfinite(values).all() and (values > 0).all()
    ratio = values / closes[:, None]
    assert ((ratio > 0.8) & (ratio < 1.2)).all()
    assert (out["High"] >= out["Low"]).all()


# --------------------------------------------------------------------------------------------------
# Idempotency and skips
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_step_again_for_the_same_date_is_reused(
    first_run: dict[str, Any], reg_settings: Settings
) -> None:
    from ml.steps.model import promote_step, train_step

    before = len(_versions(reg_settings, MAIN))
    again = train_step(MAIN, AS_OF, reg_settings)
    assert again["status"] == "reused"
    assert again["version"] == first_run["trained"]["version"]
    assert again["run_id"] == first_run["trained"]["run_id"]
    assert len(_versions(reg_settings, MAIN)) == before
    # Promoting the reused version again changes nothing.
    decision = promote_step(MAIN, AS_OF, again, reg_settings)
    assert decision["promoted"] is True
    assert decision["champion_version"] == "1"
    assert len(_versions(reg_settings, MAIN)) == before


@pytest.mark.slow
def test_no_new_bar_skips_training_and_keeps_the_champion(
    first_run: dict[str, Any], reg_settings: Settings
) -> None:
    from ml.steps.model import promote_step, train_step

    client = get_client(reg_settings)
    champion_before = get_alias(client, first_run["name"], CHAMPION).version
    before = len(_versions(reg_settings, MAIN))

    published = _ingest(MAIN, SATURDAY, reg_settings)  # a stock has no Saturday bar
    assert published["rows_added"] == 0 and published["rows_updated"] == 0
    assert published["last_date"] == AS_OF.isoformat()

    trained = train_step(MAIN, SATURDAY, reg_settings)
    assert trained["status"] == "skipped"
    assert trained["version"] == first_run["trained"]["version"]
    decision = promote_step(MAIN, SATURDAY, trained, reg_settings)
    assert decision["promoted"] is False
    assert decision["champion_version"] == champion_before
    assert "champion kept" in decision["reason"]
    assert len(_versions(reg_settings, MAIN)) == before
    assert get_alias(client, first_run["name"], CHAMPION).version == champion_before


# --------------------------------------------------------------------------------------------------
# A deliberately worse candidate is registered but not promoted
# --------------------------------------------------------------------------------------------------


def _sabotaged_result(settings: Settings, ticker: str, as_of: date):
    """A TrainResult whose network ignores its input and predicts +5 std on every target."""
    from ml.model.evaluation import evaluate, mase_scale
    from ml.model.training import train_on_history

    cheap = replace(settings.model, kinds=("lstm",), max_epochs=1)
    result = train_on_history(ticker, as_of, _history(settings, ticker, as_of), cheap)
    model = result.forecaster.model
    weights = [np.zeros_like(w) for w in model.get_weights()]
    weights[-1][:] = 5.0  # output bias, in standardized log-ratio units
    model.set_weights(weights)
    result.forecaster.skill_weights = (1.0, 1.0, 1.0, 1.0)
    split = result.split
    test, train = split.test, split.train
    result.test_predictions = result.forecaster.predict_windows(
        test.x, test.last_close, test.last_adj_close, test.high_ratio, test.low_ratio
    )
    result.evaluation = evaluate(
        test.actual,
        result.test_predictions,
        test.last_close,
        test.last_adj_close,
        test.high_ratio,
        test.low_ratio,
        mase_scale(train.actual, train.last_close, train.last_adj_close),
    )
    return result


@pytest.mark.slow
def test_worse_candidate_is_registered_but_not_promoted(
    first_run: dict[str, Any], reg_settings: Settings
) -> None:
    import mlflow

    from ml.steps.common import instrument_for

    instrument = instrument_for(MAIN, reg_settings)
    client = get_client(reg_settings)
    name = first_run["name"]
    champion_before = get_alias(client, name, CHAMPION)
    assert champion_before is not None
    before = {v.version for v in _versions(reg_settings, MAIN)}

    result = _sabotaged_result(reg_settings, MAIN, AS_OF)
    assert result.evaluation.u2()["Low"] > 1.5  # clearly worse than persistence
    outcome = log_candidate(result, instrument, reg_settings)
    assert outcome.status == "trained"
    assert outcome.version not in before
    assert {v.version for v in _versions(reg_settings, MAIN)} == before | {outcome.version}
    assert get_alias(client, name, CHALLENGER).version == outcome.version

    decision = promote_if_better(instrument, AS_OF, outcome.version, reg_settings)
    assert decision.promoted is False
    assert decision.champion_version == champion_before.version
    assert "gate against the baselines" in decision.reason
    assert f"champion v{champion_before.version} kept" in decision.reason

    tags = client.get_model_version(name, outcome.version).tags
    assert tags["gate_status"] == "rejected"
    assert "U2" in tags["gate_reason"]
    assert tags["validation_status"] == "failed"
    assert tags["validation_reason"] == tags["gate_reason"]

    # Still the old champion, through the registry and through pyfunc.
    assert get_alias(client, name, CHAMPION).version == champion_before.version
    assert get_alias(client, name, CHALLENGER).version == outcome.version
    mlflow.set_tracking_uri(reg_settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(reg_settings.mlflow_tracking_uri)
    loaded = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
    assert loaded.metadata.run_id == champion_before.run_id != outcome.run_id

    # Deciding again is a no-op that reports the earlier decision.
    again = promote_if_better(instrument, AS_OF, outcome.version, reg_settings)
    assert again.promoted is False
    assert again.reason == f"decided earlier: {decision.reason}"
    assert get_alias(client, name, CHAMPION).version == champion_before.version


# --------------------------------------------------------------------------------------------------
# Concurrency: two good versions race to become champion
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_concurrent_promotions_leave_exactly_one_champion(reg_settings: Settings) -> None:
    """Two threads of this process promote two versions at once: the registry lock serializes
    them. (Threads, not processes: two processes with their own DATA_DIRs racing on one ticker
    are in tests/faults/test_race_and_restart.py.)"""
    from ml.model.training import train_on_history
    from ml.steps.common import instrument_for

    _ingest(RACE, AS_OF, reg_settings)
    instrument = instrument_for(RACE, reg_settings)
    result = train_on_history(RACE, AS_OF, _history(reg_settings, RACE, AS_OF), reg_settings.model)
    dm = dict(result.evaluation.dm_vs_persistence)
    assert gate_failures(result.evaluation.u2(), dm, reg_settings.gate) == []
    versions = [log_candidate(result, instrument, reg_settings).version for _ in range(2)]
    assert len(set(versions)) == 2
    client = get_client(reg_settings)
    assert get_alias(client, instrument.model_name, CHAMPION) is None

    barrier = threading.Barrier(len(versions))
    decisions: dict[str, Any] = {}
    errors: list[BaseException] = []

    def promote(version: str) -> None:
        try:
            barrier.wait(timeout=30)
            decisions[version] = promote_if_better(instrument, AS_OF, version, reg_settings)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert set(decisions) == set(versions)

    winners = [v for v, d in decisions.items() if d.promoted]
    assert len(winners) == 1, {v: d.reason for v, d in decisions.items()}
    (winner,) = winners
    (loser,) = set(versions) - {winner}
    assert "first champion" in decisions[winner].reason
    # The loser was judged against the winner, i.e. after it: the promotions were serialized.
    assert "does not beat champion" in decisions[loser].reason
    assert decisions[loser].champion_version == winner
    assert decisions[loser].champion_score is not None

    assert get_alias(client, instrument.model_name, CHAMPION).version == winner
    statuses = {
        v: client.get_model_version(instrument.model_name, v).tags.get("gate_status")
        for v in versions
    }
    assert statuses == {winner: "promoted", loser: "rejected"}
    for v in versions:
        tags = client.get_model_version(instrument.model_name, v).tags
        assert tags["gate_reason"] and tags["validation_status"] and tags["validation_reason"]


@pytest.mark.slow
def test_backfilled_date_uses_and_keeps_the_champion_of_its_own_date(
    reg_settings: Settings,
) -> None:
    """Run a later date first, then backfill an earlier one: the earlier date's gate and forecast
    never use the model trained on later bars, and the alias is not moved back in time."""
    from ml.registry.versions import champion_as_of
    from ml.steps.common import instrument_for
    from ml.steps.forecast import forecast_step
    from ml.steps.model import promote_step, train_step

    later, earlier = date(2024, 1, 12), date(2024, 1, 5)
    name = instrument_for(PIT, reg_settings).model_name
    client = get_client(reg_settings)

    _ingest(PIT, later, reg_settings)
    late = train_step(PIT, later, reg_settings)
    late_decision = promote_step(PIT, later, late, reg_settings)
    assert late_decision["promoted"], late_decision["reason"]
    assert get_alias(client, name, CHAMPION).version == late["version"]

    # Backfill: the store already holds bars up to `later`; the run for `earlier` must not see them.
    early = train_step(PIT, earlier, reg_settings)
    assert early["status"] == "trained" and early["version"] != late["version"]
    early_decision = promote_step(PIT, earlier, early, reg_settings)
    # No champion existed as of `earlier`, so the candidate is judged on the persistence gate only.
    assert early_decision["promoted"], early_decision["reason"]
    assert "first champion" in early_decision["reason"]
    # ... and the live alias stays on the model of the later date.
    assert get_alias(client, name, CHAMPION).version == late["version"]
    assert champion_as_of(client, name, earlier).version == early["version"]
    assert champion_as_of(client, name, later).version == late["version"]

    row = forecast_step(PIT, earlier, reg_settings)
    assert row is not None and row["model_version"] == early["version"]
    assert row["last_bar_date"] <= earlier.isoformat()
    assert forecast_step(PIT, later, reg_settings)["model_version"] == late["version"]


def test_versus_champion_flags_a_candidate_significantly_worse_on_a_target() -> None:
    """Pure: two forecasters on one test block. The champion forecasts the baselines (skill
    weights 0); the candidate adds a network whose output bias is far off on High."""
    from ml.config import ModelConfig
    from ml.data.sources import SyntheticSource
    from ml.model.windows import prepare
    from ml.registry.gate import versus_champion
    from ml.universe import Instrument
    from tests.test_memory_features import _forecaster

    config = ModelConfig()
    bars = SyntheticSource().fetch(Instrument("AMD", "stock"), date(2022, 1, 3), AS_OF)
    history = bars.drop(columns="Ticker")
    test = prepare(history, config.window, config.split, config.naive_lookback).test
    champion = _forecaster(config, 15, (0.0, 0.0, 0.0, 0.0))
    candidate = _forecaster(config, 15, (1.0, 0.0, 0.0, 0.0))
    weights = [np.zeros_like(w) for w in candidate.model.get_weights()]
    weights[-1][:] = 10.0  # output bias: a High 10 % above the last Close on every bar
    candidate.model.set_weights(weights)

    champ_u2, dm = versus_champion(candidate, champion, history, test)
    assert set(dm) == {"High", "Low", "Close"}
    assert champ_u2["Close"] == pytest.approx(1.0)  # the champion's Close is persistence
    assert dm["High"]["p_worse"] < 1e-6
    assert all(math.isnan(v) for v in dm["Low"].values())  # identical Low forecasts: no test
    same_u2, same = versus_champion(champion, champion, history, test)
    assert same_u2 == champ_u2 and all(math.isnan(p["p_worse"]) for p in same.values())


@pytest.mark.slow
def test_a_run_left_running_by_a_killed_try_is_marked_failed(reg_settings: Settings) -> None:
    """A task killed inside `start_run` leaves its MLflow run RUNNING; the next try of the same
    ticker, date, bars and config marks it FAILED before starting its own. Others are left alone."""
    from ml.registry.client import ensure_experiment
    from ml.registry.tracking import fail_orphan_runs

    client = get_client(reg_settings)
    experiment_id = ensure_experiment(client, reg_settings.experiment_name)
    tags = {
        "ticker": "ORPHN",
        "logical_date": "2024-06-28",
        "data_fingerprint": "abc",
        "config_fingerprint": "def",
    }
    orphan = client.create_run(experiment_id, tags=tags).info.run_id
    other_day = client.create_run(experiment_id, tags={**tags, "logical_date": "2024-06-27"})
    assert client.get_run(orphan).info.status == "RUNNING"

    assert fail_orphan_runs(client, experiment_id, tags) == [orphan]
    assert client.get_run(orphan).info.status == "FAILED"
    assert client.get_run(other_day.info.run_id).info.status == "RUNNING"
    assert fail_orphan_runs(client, experiment_id, tags) == []
    client.set_terminated(other_day.info.run_id)


def test_a_version_creates_its_registered_model_first_time_even_in_a_race(
    reg_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`_create_version` asks for the version at once; the first version of a model creates the
    registered model, also when another process creates it between the two requests."""
    from types import SimpleNamespace

    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    from ml.registry.client import ensure_experiment
    from ml.registry.tracking import _create_version
    from ml.universe import MODEL_NAME_PREFIX

    client = get_client(reg_settings)
    experiment_id = ensure_experiment(client, reg_settings.experiment_name)

    def logged() -> SimpleNamespace:
        model_id = client.create_logged_model(experiment_id).model_id
        return SimpleNamespace(model_id=model_id, model_uri=f"models:/{model_id}")

    fresh = f"{MODEL_NAME_PREFIX}NEW{uuid.uuid4().hex[:6].upper()}"
    first = _create_version(client, fresh, logged(), {"logical_date": "2024-06-28"})
    assert (first.name, first.version, first.tags["logical_date"]) == (fresh, "1", "2024-06-28")
    second = _create_version(client, fresh, logged(), {"logical_date": "2024-07-01"})
    assert second.version == "2"

    raced = f"{MODEL_NAME_PREFIX}RACE{uuid.uuid4().hex[:6].upper()}"
    create_model_version = client.create_model_version
    calls: list[str] = []

    def another_process_first(name: str, *args, **kwargs):
        calls.append(name)
        if len(calls) == 1:  # our request fails; before we create it, someone else does
            get_client(reg_settings).create_registered_model(name)
            raise MlflowException("no such model", error_code=RESOURCE_DOES_NOT_EXIST)
        return create_model_version(name, *args, **kwargs)

    monkeypatch.setattr(client, "create_model_version", another_process_first)
    version = _create_version(client, raced, logged(), {"logical_date": "2024-06-28"})
    assert (version.name, version.version, calls) == (raced, "1", [raced, raced])


@pytest.mark.slow
def test_metrics_the_server_refuses_fail_the_run_and_register_nothing(
    first_run: dict[str, Any], reg_settings: Settings, monkeypatch
) -> None:
    """The metrics are sent from a second thread while the plot is drawn; a batch the tracking
    server refuses (here a metric name it does not accept) still fails `log_candidate`: the run
    ends FAILED and no version is registered."""
    import time

    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    import ml.registry.tracking as tracking
    from ml.steps.common import instrument_for

    real = tracking._run_metrics

    def with_a_bad_name(*args: Any) -> list[Any]:
        return [*real(*args), Metric("no good!", 1.0, int(time.time() * 1000), 0)]

    monkeypatch.setattr(tracking, "_run_metrics", with_a_bad_name)
    result = _sabotaged_result(reg_settings, MAIN, AS_OF)
    before = {v.version for v in _versions(reg_settings, MAIN)}
    with pytest.raises(MlflowException, match="no good!"):
        log_candidate(result, instrument_for(MAIN, reg_settings), reg_settings)
    assert {v.version for v in _versions(reg_settings, MAIN)} == before
    client = get_client(reg_settings)
    experiment = client.get_experiment_by_name(reg_settings.experiment_name)
    [last] = client.search_runs(
        [experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1
    )
    assert last.info.status == "FAILED" and last.data.tags["ticker"] == MAIN


# --------------------------------------------------------------------------------------------------
# Batch reads: one request for many models, the same answers as one read per model
# --------------------------------------------------------------------------------------------------


def _version(client: Any, name: str, **tags: str) -> str:
    return client.create_model_version(
        name, f"s3://bucket/{name}/{len(tags)}", tags=tags, await_creation_for=0
    ).version


def test_batch_registry_reads_give_the_per_model_answers(
    reg_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ml.registry import versions
    from ml.registry.client import newest_versions
    from ml.registry.versions import (
        champion_and_alias,
        champions_as_of,
        trained_version,
        trained_versions,
    )
    from ml.universe import MODEL_NAME_PREFIX, Instrument

    client = get_client(reg_settings)
    run = uuid.uuid4().hex[:6].upper()
    a, b, c, d = (f"{MODEL_NAME_PREFIX}B{run}{k}" for k in "ABCD")
    for name in (a, b, c, d):
        client.create_registered_model(name)
    day1, day2, later = "2024-01-02", "2024-01-03", "2024-02-01"
    # a: two versions on this config; the newer is the champion.
    _version(client, a, data_fingerprint="fa1", config_fingerprint="cfg", logical_date=day1)
    a2 = _version(client, a, data_fingerprint="fa2", config_fingerprint="cfg", logical_date=day2)
    client.set_registered_model_alias(a, CHAMPION, a2)
    # b: the champion is not the latest version (the gate refused the newer one).
    b1 = _version(client, b, data_fingerprint="fb1", config_fingerprint="cfg", logical_date=day1)
    b2 = _version(client, b, data_fingerprint="fb2", config_fingerprint="cfg", logical_date=day2)
    client.set_registered_model_alias(b, CHAMPION, b1)
    # c: trained on another config only, never promoted.
    _version(client, c, data_fingerprint="fc1", config_fingerprint="other", logical_date=day1)
    # d: the champion was trained for a later date; a backfill must use the older promoted one.
    d1 = _version(client, d, config_fingerprint="cfg", logical_date=day1, gate_status="promoted")
    d2 = _version(client, d, config_fingerprint="cfg", logical_date=later, gate_status="promoted")
    client.set_registered_model_alias(d, CHAMPION, d2)

    newest, complete = newest_versions(client, [a, b, c, d], 10, config_fingerprint="cfg")
    assert [(v.name, v.version) for v in newest] == [
        (d, d2),
        (d, d1),
        (b, b2),
        (b, b1),
        (a, a2),
        (a, "1"),
    ]
    assert complete
    cut, complete = newest_versions(client, [a, b], 3, config_fingerprint="cfg")
    assert [(v.name, v.version) for v in cut] == [(b, b2), (b, b1), (a, a2)] and not complete

    wanted = {a: "fa1", b: "fb2", c: "fc1", d: "none"}
    settled, rest = trained_versions(client, wanted, "cfg")
    assert rest == []
    assert {n: v.version if v else None for n, v in settled.items()} == {
        a: "1",
        b: b2,
        c: None,  # trained on another config
        d: None,
    }
    # The same answers when the models go in batches of one (each its own search).
    monkeypatch.setattr(versions, "BATCH_NAMES", 1)
    one_by_one, rest = versions.trained_versions(client, wanted, "cfg")
    assert rest == []
    assert {n: v.version if v else None for n, v in one_by_one.items()} == {
        n: v.version if v else None for n, v in settled.items()
    }
    for name, fingerprint in wanted.items():
        one = trained_version(
            client, Instrument(name.removeprefix(MODEL_NAME_PREFIX), "stock"), fingerprint, "cfg"
        )
        assert (one.version if one else None) == (settled[name].version if settled[name] else None)

    # e: the champion is an older promoted version (the newer candidate lost the gate): found
    # by the batch search of promoted versions, not read on its own like b's (never promoted:
    # an alias moved by hand).
    e = f"{MODEL_NAME_PREFIX}B{run}E"
    client.create_registered_model(e)
    e1 = _version(client, e, config_fingerprint="cfg", logical_date=day1, gate_status="promoted")
    _version(client, e, config_fingerprint="cfg", logical_date=day2, gate_status="rejected")
    client.set_registered_model_alias(e, CHAMPION, e1)
    read_alone: list[str] = []
    get_model_version = client.get_model_version

    def counted(name: str, version: str):
        read_alone.append(name)
        return get_model_version(name, version)

    with monkeypatch.context() as patched:
        patched.setattr(client, "get_model_version", counted)
        both = champions_as_of(client, [b, e], date(2024, 1, 10))
    assert read_alone == [b]
    assert {n: [v.version for v in pair] for n, pair in both.items()} == {b: [b1, b1], e: [e1, e1]}
    for day in (date(2024, 1, 10), date(2024, 3, 1), date(2023, 12, 1)):
        batch = champions_as_of(client, [a, b, c, d, e], day)
        for name in (a, b, c, d, e):
            expected = champion_and_alias(client, name, day)
            assert [v.version if v else None for v in batch[name]] == [
                v.version if v else None for v in expected
            ], (name, day)
    assert champions_as_of(client, [d], date(2024, 1, 10))[d][0].version == d1
    assert champions_as_of(client, [b], date(2024, 1, 10))[b][0].version == b1


# --------------------------------------------------------------------------------------------------
# Statistical kinds, the naive fallback champion, a model logged before "models from code"
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_ticker_whose_first_candidate_fails_gets_the_naive_as_champion(
    reg_settings: Settings,
) -> None:
    """A `har` candidate held to an impossible cap fails; the ticker has no champion, so the
    range-aware naive is registered and made champion. Both versions load through
    `mlflow.pyfunc.load_model` from the server (models from code) and answer."""
    import mlflow

    from ml.data.sources import PRICE_COLUMNS
    from ml.model.evaluation import range_naive_forecast
    from ml.registry.versions import load_forecaster
    from ml.steps.common import instrument_for
    from ml.steps.model import promote_step, train_step

    settings = replace(
        reg_settings,
        model=replace(reg_settings.model, kinds=("har",)),
        gate=replace(reg_settings.gate, u2_high_max=0.01),
    )
    _ingest(NAIVE, AS_OF, settings)
    trained = train_step(NAIVE, AS_OF, settings)
    assert trained["chosen_kind"] == "har" and trained["version"] == "1"
    decision = promote_step(NAIVE, AS_OF, trained, settings)
    assert decision["promoted"] is False
    assert "U2 High" in decision["reason"]
    assert "no champion yet: the range-aware naive is the champion (v2)" in decision["reason"]
    assert decision["champion_version"] == "2" and decision["fallback"] is True
    from ml.steps.report import summarize_day
    from tests.conftest import day_from_steps

    [row] = summarize_day(
        day_from_steps(
            [NAIVE],
            ingested={"staged": {NAIVE: {}}, "failed": {}},
            validated={"train": [NAIVE], "tickers": {NAIVE: {}}},
            trained=[trained],
            promoted={"decisions": {NAIVE: decision}, "failed": {}},
            forecasted={"forecasts": {}, "failed": {}},
        )
    )
    assert row["promotion"] == "naive v2 (fallback)", row

    client = get_client(settings)
    name = f"price-forecast-{NAIVE}"
    assert get_alias(client, name, CHAMPION).version == "2"
    assert get_alias(client, name, CHALLENGER).version == "1"  # the candidate, not the naive
    tags = client.get_model_version(name, "2").tags
    assert tags["model_kind"] == "naive"
    assert tags["gate_status"] == "promoted"
    assert tags["gate_reason"].startswith("fallback: no candidate passed the gate")
    assert tags["config_fingerprint"] != settings.model.fingerprint()  # never reused as trained
    assert client.get_model_version(name, "1").tags["gate_status"] == "rejected"

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    history = _history(settings, NAIVE, AS_OF)
    bars = history[PRICE_COLUMNS].tail(120).reset_index(drop=True)
    for version, kind in (("1", "har"), ("2", "naive")):
        flavor = mlflow.models.Model.load(f"models:/{name}/{version}").flavors["python_function"]
        assert "model_code_path" in flavor  # logged as code, nothing pickled
        served = mlflow.pyfunc.load_model(f"models:/{name}/{version}").predict(bars)
        forecaster, _ = load_forecaster(instrument_for(NAIVE, settings), settings, version=version)
        assert forecaster.kind == kind
        expected = forecaster.predict_frame(bars)
        np.testing.assert_allclose(served[list(TARGETS)], expected[list(TARGETS)])
    # The naive champion forecasts the range-aware naive: last Close x the trailing mean ratios.
    naive = load_forecaster(instrument_for(NAIVE, settings), settings)[0]
    frame = naive.predict_frame(bars)
    np.testing.assert_allclose(frame["Close"], bars["Close"].iloc[naive.window :].to_numpy())
    from ml.model.features import build_features
    from ml.model.windows import trailing_ratios

    high, low = trailing_ratios(build_features(bars), naive.naive_lookback)
    close = bars["Close"].iloc[naive.window :].to_numpy()
    expected = range_naive_forecast(close, close, high[naive.window - 1 :], low[naive.window - 1 :])
    np.testing.assert_allclose(frame[["High", "Low"]].to_numpy(), expected[:, :2])

    again = promote_step(NAIVE, AS_OF, trained, settings)
    assert again["reason"].startswith("decided earlier") and again["champion_version"] == "2"


@pytest.mark.slow
def test_a_model_logged_before_models_from_code_still_loads_and_answers(
    first_run: dict[str, Any], reg_settings: Settings
) -> None:
    """Models registered before this change hold the pyfunc class cloudpickled
    (`python_model.pkl`): logged that way here, it loads through `mlflow.pyfunc.load_model` and
    through the pipeline's own loader, and predicts what its forecaster predicts."""
    import tempfile

    import mlflow

    from ml.data.sources import PRICE_COLUMNS
    from ml.registry.pyfunc import PriceForecastModel, log_model, serving_code
    from ml.registry.tracking import PIP_REQUIREMENTS
    from ml.registry.versions import load_forecaster
    from ml.steps.common import instrument_for

    forecaster, _ = load_forecaster(instrument_for(MAIN, reg_settings), reg_settings)
    mlflow.set_tracking_uri(reg_settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(reg_settings.mlflow_tracking_uri)
    mlflow.set_experiment(reg_settings.experiment_name)
    name = f"price-forecast-{OLD}"
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run():
        info = log_model(
            name="model",
            python_model=PriceForecastModel(),  # the old way: the object, cloudpickled
            artifacts=forecaster.save(Path(tmp) / "model"),
            pip_requirements=PIP_REQUIREMENTS,
            code_paths=[str(serving_code(Path(tmp) / "code"))],
            validate_serving_input=False,
        )
    version = mlflow.register_model(info.model_uri, name).version
    flavor = mlflow.models.Model.load(f"models:/{name}/{version}").flavors["python_function"]
    assert "python_model" in flavor and "model_code_path" not in flavor
    bars = _history(reg_settings, MAIN, AS_OF)[PRICE_COLUMNS].tail(90).reset_index(drop=True)
    served = mlflow.pyfunc.load_model(f"models:/{name}/{version}").predict(bars)
    expected = forecaster.predict_frame(bars)
    np.testing.assert_allclose(served[list(TARGETS)], expected[list(TARGETS)], rtol=1e-6)
    loaded, _ = load_forecaster(instrument_for(OLD, reg_settings), reg_settings, version=version)
    np.testing.assert_allclose(
        loaded.predict_frame(bars)[list(TARGETS)], expected[list(TARGETS)], rtol=1e-6
    )
