"""
### price_forecast: daily prices -> validated store -> LSTM/GRU per ticker -> MLflow champion -> forecast

For the logical date **D** of the run (or the `as_of` param of a manual run), each ticker of the
universe goes through one mapped task group:

1. **ingest**: fetch the due bars (full history once, then a short trailing window) into staging;
2. **validate_publish**: Great Expectations suite for the ticker's asset class; a passing batch is
   merged into the store atomically, a failing one goes to quarantine with its report. When no
   bar changed and the version, gate decision and forecast for these bars already exist, it
   skips the three steps below (a no-new-data day costs the fetch and the validation only);
3. **train**: LSTM and GRU candidates on bars dated <= D, best checkpoint by validation loss,
   logged to MLflow and registered as `challenger`;
4. **promote**: `champion` moves only if the candidate beats persistence and the current champion
   on the same held-out block;
5. **forecast**: the champion predicts the next bar's High, Low, Close and Adj Close.

`report` runs when every ticker is done, writes the run summary to `DATA_DIR/reports/<D>.json`,
and fails the run if any ticker failed, after the good ones finished.

Manual runs take a params form: a subset of tickers, model kinds, max epochs, force retrain.
The business logic lives in the `ml` package; this file is wiring only.
"""

from __future__ import annotations

import os
from datetime import date, datetime, timedelta

from airflow.sdk import Asset, Param, dag, get_current_context, task, task_group
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
from airflow.timetables.trigger import CronTriggerTimetable

from ml.universe import TICKER_PATTERN

DATA_DIR = os.environ.get("DATA_DIR", "")
FORECASTS = Asset(
    name="price_forecasts",
    uri=f"file://{DATA_DIR or '/price-forecast'}/forecasts/forecasts.csv",
)
SOURCE_POOL = "price_source"
TRAINING_POOL = "training"

default_args = {
    "owner": "mlops",
    "retries": 2,
    "retry_delay": timedelta(seconds=20),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
    "execution_timeout": timedelta(minutes=20),
}


def _settings(params: dict | None = None):
    """Settings from the environment, with the run's params applied."""
    from ml.config import get_settings
    from ml.pipeline import settings_with_overrides

    params = params or {}
    return settings_with_overrides(
        get_settings(), kinds=params.get("model_kinds"), max_epochs=params.get("max_epochs")
    )


def _as_of() -> date:
    """The run's logical date (never the wall clock); a manual run may pin it with `as_of`."""
    context = get_current_context()
    pinned = (context["params"] or {}).get("as_of")
    if pinned:
        return date.fromisoformat(pinned)
    stamp = context.get("logical_date") or context["dag_run"].run_after
    return stamp.date()


def _name_instance(ticker: str) -> None:
    get_current_context()["ticker_name"] = ticker


def _run_key() -> str:
    return get_current_context()["run_id"]


@dag(
    dag_id="price_forecast",
    schedule=CronTriggerTimetable("30 22 * * *", timezone="UTC"),
    start_date=datetime(2024, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=default_args,
    tags=["forecasting", "mlflow", "great-expectations", "keras"],
    doc_md=__doc__,
    params={
        "tickers": Param(
            [],
            type="array",
            items={"type": "string", "pattern": TICKER_PATTERN.pattern},
            title="Tickers",
            description="Subset of the universe to run (empty = all tickers in the universe file).",
        ),
        "model_kinds": Param(
            [
                k.strip()
                for k in (os.environ.get("MODEL_KINDS") or "lstm,gru").split(",")
                if k.strip()
            ],
            type="array",
            items={"type": "string", "enum": ["lstm", "gru"]},
            minItems=1,
            title="Model kinds",
            description="Candidates to train; the best on validation loss is registered.",
        ),
        "max_epochs": Param(
            int(os.environ.get("MODEL_MAX_EPOCHS") or 40),
            type="integer",
            minimum=1,
            maximum=500,
            title="Max epochs",
            description="Upper bound on epochs; early stopping on validation loss usually ends sooner.",
        ),
        "force_retrain": Param(
            False,
            type="boolean",
            title="Force retrain",
            description="Train even if the ticker's data did not change since its last model.",
        ),
        "as_of": Param(
            None,
            type=["null", "string"],
            format="date",
            title="As-of date",
            description="Optional: process bars up to this date instead of the run's logical date.",
        ),
    },
)
def price_forecast():
    @task(retries=0)
    def resolve_tickers() -> list[str]:
        """Validate the params and expand the universe; a bad ticker fails the run before any work."""
        from ml.universe import UniverseError, load_universe

        params = get_current_context()["params"]
        try:
            settings = _settings(params)
            universe = load_universe(settings.universe_file)
            chosen = universe.select(params.get("tickers") or None)
        except (UniverseError, ValueError) as exc:
            raise AirflowFailException(f"invalid run parameters: {exc}") from exc
        return [i.ticker for i in chosen]

    @task_group(group_id="ticker")
    def per_ticker(ticker: str):
        @task(pool=SOURCE_POOL, map_index_template="{{ ticker_name }}")
        def ingest(ticker: str) -> dict:
            from ml.pipeline import ingest_step, run_recorded

            _name_instance(ticker)
            settings = _settings(get_current_context()["params"])
            return run_recorded(
                "ingest", ticker, _run_key(), settings, ingest_step, ticker, _as_of(), settings
            )

        @task(map_index_template="{{ ticker_name }}")
        def validate_publish(ticker: str, staged: dict) -> dict:
            """Validate and publish; skip train/promote/forecast when nothing is left to do."""
            from ml.pipeline import publish_and_check, run_recorded
            from ml.validation import PriceValidationError

            _name_instance(ticker)
            params = get_current_context()["params"]
            settings = _settings(params)
            try:
                published = run_recorded(
                    "publish",
                    ticker,
                    _run_key(),
                    settings,
                    publish_and_check,
                    ticker,
                    _as_of(),
                    settings,
                    force=bool(params.get("force_retrain")),
                )
            except PriceValidationError as exc:
                raise AirflowFailException(str(exc)) from exc  # bad data: retrying cannot help
            if published.get("up_to_date"):
                # No new bar: the version, gate decision and forecast for these bars exist.
                raise AirflowSkipException(published["up_to_date"]["reason"])
            return published

        @task(
            pool=TRAINING_POOL,
            map_index_template="{{ ticker_name }}",
            execution_timeout=timedelta(minutes=45),
        )
        def train(ticker: str, published: dict) -> dict:
            from ml.pipeline import run_recorded, train_step

            _name_instance(ticker)
            params = get_current_context()["params"]
            settings = _settings(params)
            return run_recorded(
                "train",
                ticker,
                _run_key(),
                settings,
                train_step,
                ticker,
                _as_of(),
                settings,
                force=bool(params.get("force_retrain")),
            )

        @task(map_index_template="{{ ticker_name }}")
        def promote(ticker: str, trained: dict) -> dict:
            from ml.pipeline import promote_step, run_recorded

            _name_instance(ticker)
            settings = _settings(get_current_context()["params"])
            return run_recorded(
                "promote",
                ticker,
                _run_key(),
                settings,
                promote_step,
                ticker,
                _as_of(),
                trained,
                settings,
            )

        @task(map_index_template="{{ ticker_name }}", outlets=[FORECASTS])
        def forecast(ticker: str, decision: dict) -> dict | None:
            from ml.pipeline import forecast_step, run_recorded

            _name_instance(ticker)
            settings = _settings(get_current_context()["params"])
            return run_recorded(
                "forecast", ticker, _run_key(), settings, forecast_step, ticker, _as_of(), settings
            )

        staged = ingest(ticker)
        published = validate_publish(ticker, staged)
        trained = train(ticker, published)
        decision = promote(ticker, trained)
        return forecast(ticker, decision)

    @task(trigger_rule="all_done", retries=0)
    def report(tickers: list[str]) -> dict:
        """Write the run summary; fail the run if any ticker failed (the others are finished)."""
        from ml.pipeline import format_table, summarize_run

        if tickers is None:
            raise AirflowFailException(
                "resolve_tickers failed: see its log for the invalid parameter"
            )
        settings = _settings(get_current_context()["params"])
        rows, path = summarize_run(settings, _run_key(), list(tickers), _as_of())
        print(format_table(rows))
        print(f"run summary written to {path}")
        failed = [r for r in rows if r["state"] == "failed"]
        if failed:
            details = "; ".join(
                f"{r['ticker']} ({r.get('failed_step')}): {r.get('error')}" for r in failed
            )
            raise AirflowFailException(f"{len(failed)} of {len(rows)} ticker(s) failed: {details}")
        return {"report": str(path), "tickers": len(rows), "failed": 0}

    tickers = resolve_tickers()
    outcomes = per_ticker.expand(ticker=tickers)
    summary = report(tickers)
    outcomes >> summary


price_forecast()
