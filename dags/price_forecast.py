"""
### price_forecast: daily prices -> validated store -> a forecaster per ticker -> MLflow champion -> forecast

One pass per logical date **D** (or the `as_of` param of a manual run), one task per stage of
the day as `ml.pipeline` declares it; each task takes the records the stages before it
returned as arguments (their plain form, in XCom) and returns its own:

    resolve_tickers -> ingest -> validate_and_publish -> find_versions -> plan_training
        -> train (mapped: one instance per ticker that needs it, named by ticker) -> promote
        -> forecast -> report

A day without new bars maps no train instance. `promote`, `forecast` and `report` run whatever
happened before them; `report` lists every ticker (done, skipped for lack of new bars, or failed
and where), writes `DATA_DIR/reports/<D>.json`, and fails the run if any ticker failed, after
the good ones finished. One ticker's failure never stops the others.

Manual runs take a params form: a subset of tickers, model kinds, max epochs, force retrain,
full refresh, an as-of date. What each stage does: `ml/pipeline.py`; this file is wiring only.
The flow and the contracts every stage keeps (point in time, idempotence, the gate, one writer
per ticker in the registry): docs/architecture.md in the repository.
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


def _retries_left() -> bool:
    """Whether Airflow will retry this task if it fails now (a batch step then raises on an
    outage, where every ticker failed; on the last try it returns the per-ticker errors)."""
    ti = get_current_context()["ti"]
    return ti.try_number <= (ti.max_tries or 0)


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


def _logical_date() -> date:
    """The run's logical date (never the wall clock)."""
    context = get_current_context()
    stamp = context.get("logical_date") or context["dag_run"].run_after
    return stamp.date()


def _request(plain: dict):
    """The run's `DayRequest` from resolve_tickers' XCom."""
    from ml.steps.records import DayRequest, from_plain

    return from_plain(DayRequest, plain)


def _settings(request):
    """Settings from the environment, with the run's model overrides."""
    from ml.config import get_settings
    from ml.pipeline import stage_settings

    return stage_settings(request, get_settings())


def _plain(value):
    from ml.steps.records import to_plain

    return to_plain(value)


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
    @task(retries=0, multiple_outputs=False)
    def resolve_tickers() -> dict:
        """Validate the params and expand the universe; a bad ticker or a pinned `as_of` in the
        future or before HISTORY_START fails the run before any work."""
        from ml.config import parse_as_of
        from ml.pipeline import resolve_tickers
        from ml.steps.records import to_plain
        from ml.universe import UniverseError

        params = get_current_context()["params"]
        try:
            from ml.config import get_settings

            settings = get_settings()
            as_of = _logical_date()
            if params.get("as_of"):
                as_of = parse_as_of(params["as_of"], settings.history_start)
            request = resolve_tickers(
                as_of,
                params.get("tickers") or None,
                settings,
                force_retrain=bool(params.get("force_retrain")),
                full_refresh=bool(params.get("full_refresh")),
                kinds=params.get("model_kinds"),
                max_epochs=params.get("max_epochs"),
            )
        except (UniverseError, ValueError) as exc:
            raise AirflowFailException(f"invalid run parameters: {exc}") from exc
        _check_map_length(len(request.tickers))
        return to_plain(request)

    # multiple_outputs=False wherever a task returns a dict: from `-> dict` Airflow infers True
    # and pushes every key as an XCom of its own besides the return value (one API call and row
    # each). The tasks hand each other only the return value.
    @task(pool=SOURCE_POOL, multiple_outputs=False)
    def ingest(request: dict) -> dict:
        """Fetch every ticker's due bars into staging (concurrent downloads, bounded)."""
        from ml import pipeline

        day = _request(request)
        return _plain(pipeline.ingest(day, _settings(day), strict=_retries_left()))

    @task(multiple_outputs=False)
    def validate_and_publish(request: dict, ingested: dict) -> dict:
        """Each staged batch through its Great Expectations suite: published, or quarantined."""
        from ml import pipeline
        from ml.steps.records import Ingested, from_plain

        day = _request(request)
        staged = from_plain(Ingested, ingested)
        return _plain(pipeline.validate_and_publish(day, _settings(day), staged))

    @task(multiple_outputs=False)
    def find_versions(request: dict, published: dict) -> dict:
        """The registered versions that cover unchanged bars; the monitor's retrain asks."""
        from ml import pipeline
        from ml.steps.records import Published, from_plain

        day = _request(request)
        return _plain(pipeline.find_versions(day, _settings(day), from_plain(Published, published)))

    @task
    def plan_training(request: dict, published: dict, registered: dict) -> list:
        """The tickers to train and why: the list `train` maps over."""
        from ml import pipeline
        from ml.steps.records import Published, Registered, from_plain

        day = _request(request)
        checked, versions = from_plain(Published, published), from_plain(Registered, registered)
        return _plain(pipeline.plan_training(day, _settings(day), checked, versions))

    @task(
        pool=TRAINING_POOL,
        map_index_template="{{ ticker_name }}",
        execution_timeout=timedelta(minutes=45),
        multiple_outputs=False,
    )
    def train(request: dict, order: dict) -> dict:
        """Fit the candidates on bars <= D, log the run, register the best as `challenger`."""
        from ml import pipeline
        from ml.steps.records import TrainOrder, from_plain

        context = get_current_context()
        context["ticker_name"] = order["ticker"]
        day = _request(request)
        try:
            return _plain(pipeline.train(day, _settings(day), from_plain(TrainOrder, order)))
        except Exception as exc:
            # The report names the error; Airflow keeps the XComs of a task's last try.
            error = {"ticker": order["ticker"], "error": f"{type(exc).__name__}: {exc}"}
            context["ti"].xcom_push(key="error", value=error)
            raise

    @task(trigger_rule="all_done", multiple_outputs=False)
    def promote(request: dict | None, registered: dict | None, trained: list) -> dict:
        """Apply the gate to this run's new versions, one at a time: one process moves aliases."""
        from ml import pipeline
        from ml.steps.records import Promoted, Registered, from_plain

        if request is None:  # resolve_tickers failed: nothing to decide
            return _plain(Promoted({}, {}))
        day = _request(request)
        outcomes = pipeline.gathered(list(trained or []), [])
        versions = from_plain(Registered, registered)
        return _plain(
            pipeline.promote(day, _settings(day), versions, outcomes, strict=_retries_left())
        )

    @task(trigger_rule="all_done", outlets=[FORECASTS], multiple_outputs=False)
    def forecast(request: dict | None, published: dict | None, promoted: dict | None) -> dict:
        """Score the ledger, then forecast the next bar with every ticker's champion (after
        promote: `promoted` orders it, the champions are read from the registry)."""
        from ml import pipeline
        from ml.steps.records import Forecasted, Published, from_plain

        if request is None:  # resolve_tickers failed: no ticker to forecast
            return _plain(Forecasted({}, (), (), {}, {}, {}))
        day = _request(request)
        checked = from_plain(Published, published)
        return _plain(pipeline.forecast(day, _settings(day), checked, strict=_retries_left()))

    @task(trigger_rule="all_done", retries=0, multiple_outputs=False)
    def report(
        request: dict | None,
        ingested: dict | None,
        published: dict | None,
        registered: dict | None,
        orders: list | None,
        trained: list,
        train_errors: list,
        promoted: dict | None,
        forecasted: dict | None,
    ) -> dict:
        """Write the run summary; fail the run if any ticker failed (the others are finished)."""
        from ml import pipeline
        from ml.steps import records as r

        if request is None:
            raise AirflowFailException(
                "resolve_tickers failed: see its log for the invalid parameter"
            )
        day = _request(request)
        results = r.DayResults(
            request=day,
            ingested=r.from_plain(r.Ingested, ingested),
            published=r.from_plain(r.Published, published),
            registered=r.from_plain(r.Registered, registered),
            orders=r.from_plain(tuple[r.TrainOrder, ...], orders),
            trained=pipeline.gathered(list(trained or []), list(train_errors or [])),
            promoted=r.from_plain(r.Promoted, promoted),
            forecasted=r.from_plain(r.Forecasted, forecasted),
        )
        done = pipeline.report(results, _settings(day), get_current_context()["run_id"])
        if done.failed:
            details = "; ".join(
                f"{t} ({stage}): {error}" for t, (stage, error) in done.failed.items()
            )
            raise AirflowFailException(
                f"{len(done.failed)} of {len(day.tickers)} ticker(s) failed: {details}"
            )
        return {"report": done.path, "tickers": len(day.tickers), "failed": 0}

    request = resolve_tickers()
    ingested = ingest(request)
    published = validate_and_publish(request, ingested)
    registered = find_versions(request, published)
    orders = plan_training(request, published, registered)
    trained = train.partial(request=request).expand(order=orders)
    promoted = promote(request, registered, trained)
    forecasted = forecast(request, published, promoted)
    report(
        request,
        ingested,
        published,
        registered,
        orders,
        trained,
        trained["error"],
        promoted,
        forecasted,
    )


price_forecast()
