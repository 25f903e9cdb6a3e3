"""Shared fixtures: a real MLflow tracking server on a free port, settings on a temp store."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from ml.config import Settings, get_settings
from ml.servers import MlflowServer, sqlite_mlflow_server

REPO = Path(__file__).resolve().parent.parent


# Small, quick models: what the tests that train use unless they say otherwise.
SMALL_MODEL = {
    "kinds": ("lstm", "gru"),
    "units": 16,
    "max_epochs": 4,
    "patience": 2,
    "batch_size": 64,
}


def with_model(settings: Settings, **changes: object) -> Settings:
    """`settings` with these model config fields changed."""
    return replace(settings, model=replace(settings.model, **changes))


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """`mlflow server` with a SQLite backend and served artifacts in a temp folder."""
    with sqlite_mlflow_server(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    """Default settings (synthetic source) on an empty temp store."""
    return replace(get_settings({}), data_dir=data_dir)


@pytest.fixture
def fast_settings(settings: Settings, mlflow_server: MlflowServer, request) -> Settings:
    """Small, quick models logging to the test MLflow server, one experiment per test."""
    experiment = f"test-{request.node.name}"[:200]
    return with_model(
        replace(
            settings,
            mlflow_tracking_uri=mlflow_server.uri,
            experiment_name=experiment,
            history_start=date(2021, 1, 4),
        ),
        **SMALL_MODEL,
    )


def isolated_settings(
    root: Path, mlflow_uri: str, experiment: str, tickers: dict[str, str]
) -> Settings:
    """Small, quick models on their own store and universe of made-up `tickers` (ticker -> name, all
    stocks): registered model names are global on the shared server, so each module keeps its own."""
    universe = root / "universe.csv"
    universe.write_text(
        "ticker,asset_class,name\n" + "".join(f"{t},stock,{n}\n" for t, n in tickers.items())
    )
    (root / "data").mkdir()
    settings = replace(
        get_settings({}),
        data_dir=root / "data",
        universe_file=universe,
        mlflow_tracking_uri=mlflow_uri,
        experiment_name=experiment,
        history_start=date(2021, 1, 4),
    )
    return with_model(settings, **SMALL_MODEL)


def staged_with_a_bad_batch(root: Path, tickers: dict[str, str], bad: str, as_of: date) -> Settings:
    """`isolated_settings` under `root` (no tracking server) with every ticker's bars for `as_of`
    staged by the pipeline's ingest, and `bad`'s last staged bar broken (High below Low), so
    that validation quarantines that batch and publishes the others."""
    import pandas as pd

    from ml.data.store import PriceStore
    from ml.steps.common import instrument_for
    from ml.steps.data import ingest_all

    settings = isolated_settings(root, "http://127.0.0.1:9", "unused", tickers)
    ingest_all(list(tickers), as_of, settings)
    staged = PriceStore(settings.data_dir).staging_path(instrument_for(bad, settings), as_of)
    batch = pd.read_parquet(staged)
    batch.loc[batch.index[-1], "High"] = batch["Low"].iloc[-1] / 2
    batch.to_parquet(staged, index=False)
    return settings


def ingest(ticker: str, as_of: date, settings: Settings) -> dict:
    """Stage, validate and publish `ticker`'s bars due for `as_of` (the pipeline's own steps)."""
    from ml.steps.data import ingest_step, publish_step

    ingest_step(ticker, as_of, settings)
    return publish_step(ticker, as_of, settings)


def published_history(settings: Settings, ticker: str, as_of: date):
    """The published bars of `ticker` dated <= `as_of`."""
    from ml.data.store import PriceStore
    from ml.steps.common import instrument_for

    return PriceStore(settings.data_dir).load(instrument_for(ticker, settings), until=as_of)


def names_read_by_settings() -> set[str]:
    """Every environment variable `ml.config.get_settings` looks up (on an empty environment)."""
    from collections.abc import Mapping

    class RecordingEnv(Mapping[str, str]):
        """An empty environment that remembers every name looked up in it."""

        def __init__(self) -> None:
            self.names: set[str] = set()

        def __getitem__(self, key: str) -> str:
            self.names.add(key)
            raise KeyError(key)

        def __iter__(self) -> Iterator[str]:
            return iter(())

        def __len__(self) -> int:
            return 0

    env = RecordingEnv()
    get_settings(env)
    return env.names


def day_from_steps(
    tickers: list[str],
    *,
    ingested: dict | None = None,
    validated: dict | None = None,
    trained: list | tuple = (),
    train_errors: list | tuple = (),
    promoted: dict | None = None,
    forecasted: dict | None = None,
    registered: Any = None,
) -> Any:
    """The report's input (`ml.steps.records.DayResults`) from the steps' dict forms, with
    what a test leaves out filled in: `validated` is `validate_all`'s {"train", "tickers",
    "failed"}, `trained` the `train_step` dicts, `promoted` and `forecasted` those of
    `promote_all` and `forecast_all`."""
    from ml.data.ingest import StagedBatch
    from ml.registry.gate import PromotionDecision
    from ml.steps import records as r

    def publication(summary: dict) -> r.Publication:
        base = {"rows_added": 0, "rows_updated": 0, "total_rows": 0, "last_date": None}
        base |= {"validation": "passed", "checks": 0, "data_fingerprint": "", "last_bar_date": ""}
        return r.record(r.Publication, {**base, **summary})

    def decision(ticker: str, d: dict) -> PromotionDecision:
        base = {"ticker": ticker, "version": d.get("version", ""), "promoted": False}
        base |= {"reason": "", "champion_version": None, "candidate_score": None}
        return r.record(PromotionDecision, {**base, "champion_score": None, **d})

    def forecast(row: dict) -> r.ForecastRecord:
        base = dict.fromkeys(("pred_high", "pred_low", "pred_close", "pred_adj_close"), 0.0)
        base |= {"ticker": "", "logical_date": "", "last_bar_date": "", "last_close": 0.0}
        return r.forecast_record(
            {**base, "model_name": "", "model_version": "", "source": "", **row}
        )

    summaries = (validated or {}).get("tickers") or {}
    registered = registered or (
        r.Registered(
            {
                t: r.record(r.Coverage, {"trained_for": None, "gate_status": None, **s})
                for t, s in summaries.items()
                if s.get("version")
            },
            {},
            {},
        )
        if validated is not None
        else None
    )
    return r.DayResults(
        request=r.DayRequest(date(2024, 6, 28), tuple(tickers)),
        ingested=None
        if ingested is None
        else r.Ingested(
            {t: StagedBatch(t, "", "", "", 0, True, "test") for t in ingested["staged"]},
            ingested.get("failed") or {},
        ),
        published=None
        if validated is None
        else r.Published(
            {t: publication(s) for t, s in summaries.items()}, validated.get("failed") or {}
        ),
        registered=registered,
        orders=None
        if validated is None
        else tuple(
            r.TrainOrder(t, summaries.get(t, {}).get("train_reason", "new or revised bars"))
            for t in validated.get("train") or ()
        ),
        trained=r.Trained(
            tuple(
                r.record(
                    r.TrainOutcome,
                    {"run_id": None, "reason": "", "metrics": {}, **o, "intervals": None},
                )
                for o in trained
                if o
            ),
            {e["ticker"]: e["error"] for e in train_errors if e},
        ),
        promoted=None
        if promoted is None
        else r.Promoted(
            {t: decision(t, d) for t, d in (promoted.get("decisions") or {}).items()},
            promoted.get("failed") or {},
        ),
        forecasted=None
        if forecasted is None
        else r.Forecasted(
            {t: forecast(row) for t, row in (forecasted.get("forecasts") or {}).items()},
            tuple(forecasted.get("kept") or ()),
            tuple(forecasted.get("no_champion") or ()),
            forecasted.get("failed") or {},
            {t: r.record(r.Watch, w) for t, w in (forecasted.get("monitor") or {}).items()},
            forecasted.get("kinds") or {},
        ),
    )
