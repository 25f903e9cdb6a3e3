"""
### price_forecast: daily prices -> validated store -> a forecaster per ticker -> MLflow champion -> forecast

One pass per logical date **D** (or the `as_of` param of a manual run):

1. **resolve_tickers**: the params checked, the universe (or the chosen subset) expanded;
2. **ingest**: one task fetches every ticker's due bars (full history once, then a short
   trailing window) into staging, a few downloads at a time (`FETCH_CONCURRENCY`);
3. **validate**: one task runs each ticker's Great Expectations suite; a passing batch is merged
   into the store atomically, a failing one goes to quarantine with its report. A split or
   dividend that re-scaled the vendor's earlier bars is detected and the whole history fetched
   again and replaced (`full_refresh` forces it). It lists the tickers that need training: new
   or revised bars, no version for these bars and this config, or `force_retrain`;
4. **train**: one mapped instance per ticker of that list only (named by ticker in the grid):
   the candidates of `model_kinds` (HAR regression, gradient boosting, LSTM, GRU) on bars dated
   <= D, the best on the validation block logged to MLflow and registered as `challenger`. A day
   without new bars runs no train instance;
5. **promote**: one task walks the new versions one at a time; `champion` moves only if the
   candidate beats persistence, is not significantly worse than the range-aware naive and beats
   the current champion on the same held-out block (a ticker without any gets the naive);
6. **forecast**: one task forecasts the next bar's High, Low, Close and Adj Close with each
   ticker's champion and writes them in one write.

`report` runs when everything else is done, lists every ticker (done, skipped for lack of new
bars, or failed and where), writes `DATA_DIR/reports/<D>.json`, and fails the run if any ticker
failed, after the good ones finished. One ticker's failure never stops the others.

Manual runs take a params form: a subset of tickers, model kinds, max epochs, force retrain,
full refresh, an as-of date.
The business logic lives in the `ml` package (`ml.steps.*`); this file is wiring only. The flow
and the contracts every step keeps (point in time, idempotence, the gate, one writer per ticker
in the registry): docs/architecture.md in the repository.
"""

from __future__ import annotations

import os
from datetime import date, datetime, timedelta

from airflow.sdk import Asset, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException
from airflow.timetables.trigger import CronTriggerTimetable

from ml.config import MODEL_KINDS, model_settings
from ml.universe import TICKER_PATTERN

DATA_DIR = os.environ.get("DATA_DIR", "")
FORECASTS = Asset(
    name="price_forecasts",
    uri=f"file://{DATA_DIR or '/price-forecast'}/forecasts/forecasts.csv",
)
# The params' defaults are the validated settings of ml.config (MODEL_KINDS, MODEL_MAX_EPOCHS):
# an invalid value fails the DAG's import with the setting's message, not the first run's form.
MODEL = model_settings()
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
    from ml.steps.common import settings_with_overrides

    params = params or {}
    return settings_with_overrides(
        get_settings(), kinds=params.get("model_kinds"), max_epochs=params.get("max_epochs")
    )


def _as_of() -> date:
    """The run's logical date (never the wall clock); a manual run may pin it with `as_of`."""
    from ml.config import parse_day

    context = get_current_context()
    pinned = (context["params"] or {}).get("as_of")
    if pinned:
        return parse_day(pinned)
    stamp = context.get("logical_date") or context["dag_run"].run_after
    return stamp.date()


def _retries_left() -> bool:
    """Whether Airflow will retry this task if it fails now (a batch step then raises on an
    outage, where every ticker failed; on the last try it returns the per-ticker errors)."""
    ti = get_current_context()["ti"]
    return ti.try_number <= (ti.max_tries or 0)


def _validation_summary() -> dict | None:
    """What `validate` found per ticker (its XCom `summary`); None when validate did not finish.

    Pulled here rather than passed as an argument: Airflow resolves a missing custom-key XCom
    argument as an error, and promote, forecast and report must still run after a failure.
    """
    ti = get_current_context()["ti"]
    return ti.xcom_pull(task_ids="validate", key="summary", default=None)


def _check_map_length(tickers: int) -> None:
    """Fail before any work when `train` could not map over every ticker: Airflow fails the task
    that pushes a list longer than `[core] max_map_length` (validate, after the whole data phase)
    with a message that names neither the list nor the setting."""
    from airflow.sdk.configuration import conf

    limit = conf.getint("core", "max_map_length", fallback=1024)
    if tickers > limit:
        raise AirflowFailException(
            f"{tickers} tickers to run, more than Airflow's [core] max_map_length={limit} that "
            f"train can map over: set AIRFLOW__CORE__MAX_MAP_LENGTH to at least {tickers} in "
            "every Airflow component's environment (docs/scaling.md)"
        )


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
            list(MODEL.kinds),
            type="array",
            items={"type": "string", "enum": list(MODEL_KINDS)},
            minItems=1,
            title="Model kinds",
            description="Candidates to train; the best on validation is registered.",
        ),
        "max_epochs": Param(
            MODEL.max_epochs,
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
        "full_refresh": Param(
            False,
            type="boolean",
            title="Full refresh",
            description="Fetch each ticker's whole history again, validate it whole and replace "
            "the published one (a vendor's correction of old bars; splits and dividends are "
            "detected and healed without it).",
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
        """Validate the params and expand the universe; a bad ticker or a pinned `as_of` in the
        future or before HISTORY_START fails the run before any work."""
        from ml.config import parse_as_of
        from ml.universe import UniverseError, load_universe

        params = get_current_context()["params"]
        try:
            settings = _settings(params)
            if params.get("as_of"):
                parse_as_of(params["as_of"], settings.history_start)
            universe = load_universe(settings.universe_file)
            chosen = universe.select(params.get("tickers") or None)
        except (UniverseError, ValueError) as exc:
            raise AirflowFailException(f"invalid run parameters: {exc}") from exc
        _check_map_length(len(chosen))
        return [i.ticker for i in chosen]

    # multiple_outputs=False wherever a task returns a dict: from `-> dict` Airflow infers True
    # and pushes every key as an XCom of its own besides the return value (one API call and row
    # each, ten per train instance). The tasks hand each other only the return value.
    @task(pool=SOURCE_POOL, multiple_outputs=False)
    def ingest(tickers: list[str]) -> dict:
        """Fetch every ticker's due bars into staging (concurrent downloads, bounded)."""
        from ml.steps.data import ingest_all

        params = get_current_context()["params"]
        return ingest_all(
            tickers,
            _as_of(),
            _settings(params),
            strict=_retries_left(),
            full_refresh=bool(params.get("full_refresh")),
        )

    @task
    def validate(ingested: dict) -> list[str]:
        """GX suites; publish passing batches, quarantine failing ones.

        Returns the tickers that need training (what `train` maps over); the per-ticker summary
        and failures go to the XCom `summary` for promote, forecast and the report.
        """
        from ml.steps.data import validate_all

        context = get_current_context()
        params = context["params"]
        result = validate_all(
            list(ingested["staged"]),
            _as_of(),
            _settings(params),
            force=bool(params.get("force_retrain")),
        )
        context["ti"].xcom_push(key="summary", value=result)
        return result["train"]

    @task(
        pool=TRAINING_POOL,
        map_index_template="{{ ticker_name }}",
        execution_timeout=timedelta(minutes=45),
        multiple_outputs=False,
    )
    def train(ticker: str) -> dict:
        """Fit the candidates on bars <= D, log the run, register the best as `challenger`."""
        from ml.steps.model import train_step

        context = get_current_context()
        context["ticker_name"] = ticker
        params = context["params"]
        # The ledger's monitor may ask to retrain a ticker whose bars did not change (live U2,
        # input drift): validate then hands over the seed of that retrain.
        asked = ((_validation_summary() or {}).get("tickers") or {}).get(ticker) or {}
        try:
            return train_step(
                ticker,
                _as_of(),
                _settings(params),
                force=bool(params.get("force_retrain")),
                seed=asked.get("retrain_seed"),
            )
        except Exception as exc:
            # The report names the error; Airflow keeps the XComs of a task's last try.
            context["ti"].xcom_push(
                key="error", value={"ticker": ticker, "error": f"{type(exc).__name__}: {exc}"}
            )
            raise

    @task(trigger_rule="all_done", multiple_outputs=False)
    def promote(trained: list[dict]) -> dict:
        """Apply the gate to this run's new versions, one at a time: one process moves aliases."""
        from ml.steps.model import promote_all

        settings = _settings(get_current_context()["params"])
        return promote_all(
            _validation_summary(), list(trained or []), _as_of(), settings, strict=_retries_left()
        )

    @task(trigger_rule="all_done", outlets=[FORECASTS], multiple_outputs=False)
    def forecast(promoted: dict | None) -> dict:
        """Forecast the next bar with every ticker's champion; one write of the forecasts table."""
        from ml.steps.forecast import forecast_all

        settings = _settings(get_current_context()["params"])
        tickers = sorted((_validation_summary() or {}).get("tickers") or {})
        return forecast_all(tickers, _as_of(), settings, strict=_retries_left())

    @task(trigger_rule="all_done", retries=0, multiple_outputs=False)
    def report(
        tickers: list[str] | None,
        ingested: dict | None,
        trained: list[dict],
        train_errors: list[dict],
        promoted: dict | None,
        forecasted: dict | None,
    ) -> dict:
        """Write the run summary; fail the run if any ticker failed (the others are finished)."""
        from ml.steps.report import format_table, summarize_tickers, write_run_report

        if tickers is None:
            raise AirflowFailException(
                "resolve_tickers failed: see its log for the invalid parameter"
            )
        settings = _settings(get_current_context()["params"])
        rows = summarize_tickers(
            tickers,
            ingested=ingested,
            validated=_validation_summary(),
            trained=list(trained or []),
            train_errors=list(train_errors or []),
            promoted=promoted,
            forecasted=forecasted,
        )
        path = write_run_report(settings, _as_of(), rows, _run_key())
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
    ingested = ingest(tickers)
    trained = train.expand(ticker=validate(ingested))
    promoted = promote(trained)
    forecasted = forecast(promoted)
    report(tickers, ingested, trained, trained["error"], promoted, forecasted)


price_forecast()
