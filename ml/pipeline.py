"""The day, declared once: its stages in order, each a function of the records the stages
before it returned (`ml.steps.records`).

    resolve_tickers -> ingest -> validate_and_publish -> find_versions -> plan_training
        -> train (one per TrainOrder) -> promote -> forecast -> report

- **resolve_tickers**: the run's params checked, the universe (or a subset) expanded: a
  `DayRequest`;
- **ingest**: every ticker's due bars fetched into staging (a few downloads at a time); a split
  or dividend that re-scaled the vendor's earlier bars makes it fetch the whole history:
  `Ingested`;
- **validate_and_publish**: each staged batch through its Great Expectations suite, merged into
  the store atomically or quarantined with its report: `Published`;
- **find_versions**: for the tickers whose bars did not change, the registered version trained
  on exactly these bars and this config, and the retrains the ledger's monitor asked for:
  `Registered`;
- **plan_training**: which tickers train and why (new bars, no version, the monitor, `force`):
  a tuple of `TrainOrder`, the list `train` is mapped over;
- **train**: one ticker's candidates fitted on bars <= D, the best on validation logged and
  registered as `challenger`: a `TrainOutcome`;
- **promote**: the gate on each new version, one at a time (one process moves aliases):
  `Promoted`;
- **forecast**: the ledger scored, then the next bar with each champion, in one write:
  `Forecasted`;
- **report**: one row per ticker from all of the above, written and printed: `DayReport`.

The DAG (`dags/price_forecast.py`) runs one task per stage and hands each its inputs as
arguments (the records' plain form); `run_day` walks the same stages in one process (`python -m
ml run`). One ticker's failure never stops the others; a stage that fails as a whole leaves
None, and the later stages run on what is left.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from datetime import date
from typing import Any, TypeVar

from ml.config import Settings
from ml.steps.records import (
    DayReport,
    DayRequest,
    DayResults,
    Forecasted,
    Ingested,
    Promoted,
    Published,
    Registered,
    Trained,
    TrainOrder,
    TrainOutcome,
    forecast_record,
    record,
)

STAGES = (
    "resolve_tickers",
    "ingest",
    "validate_and_publish",
    "find_versions",
    "plan_training",
    "train",
    "promote",
    "forecast",
    "report",
)
R = TypeVar("R")


def stage_settings(request: DayRequest, settings: Settings) -> Settings:
    """`settings` with the run's model overrides (`model_kinds`, `max_epochs` params)."""
    from ml.steps.common import settings_with_overrides

    kinds = list(request.kinds) if request.kinds else None
    return settings_with_overrides(settings, kinds=kinds, max_epochs=request.max_epochs)


def resolve_tickers(
    as_of: date,
    tickers: Sequence[str] | None,
    settings: Settings,
    *,
    force_retrain: bool = False,
    full_refresh: bool = False,
    kinds: Sequence[str] | None = None,
    max_epochs: int | None = None,
) -> DayRequest:
    """The day's request: `tickers` (None or empty: the whole universe) checked against the
    universe file, the model kinds against the known ones. Raises UniverseError or
    ConfigError (a ValueError) before any work."""
    from ml.config import _parse_kinds
    from ml.universe import load_universe

    chosen = load_universe(settings.universe_file).select(list(tickers or ()) or None)
    return DayRequest(
        as_of=as_of,
        tickers=tuple(i.ticker for i in chosen),
        force_retrain=bool(force_retrain),
        full_refresh=bool(full_refresh),
        kinds=_parse_kinds(",".join(kinds)) if kinds else None,
        max_epochs=int(max_epochs) if max_epochs else None,
    )


def ingest(request: DayRequest, settings: Settings, *, strict: bool = False) -> Ingested:
    from ml.data.ingest import StagedBatch
    from ml.steps.data import ingest_all

    out = ingest_all(
        request.tickers, request.as_of, settings, strict=strict, full_refresh=request.full_refresh
    )
    staged = {t: record(StagedBatch, batch) for t, batch in out["staged"].items()}
    return Ingested(staged, out["failed"])


def validate_and_publish(request: DayRequest, settings: Settings, ingested: Ingested) -> Published:
    from ml.steps.data import publish_all

    return publish_all(list(ingested.staged), request.as_of, settings)


def find_versions(request: DayRequest, settings: Settings, published: Published) -> Registered:
    from ml.steps.data import registered_versions

    return registered_versions(published, request.as_of, settings, force=request.force_retrain)


def plan_training(
    request: DayRequest, settings: Settings, published: Published, registered: Registered | None
) -> tuple[TrainOrder, ...]:
    from ml.steps.data import plan_training as plan

    return plan(published, registered, request.as_of, settings, force=request.force_retrain)


def train(request: DayRequest, settings: Settings, order: TrainOrder) -> TrainOutcome:
    from ml.steps.model import train_step

    out = train_step(
        order.ticker, request.as_of, settings, force=request.force_retrain, seed=order.seed
    )
    return record(TrainOutcome, {**out, "intervals": out.get("intervals") or None})


def promote(
    request: DayRequest,
    settings: Settings,
    registered: Registered | None,
    trained: Trained,
    *,
    strict: bool = False,
) -> Promoted:
    """The gate on this run's new versions, and on versions whose gate never ran (a run that
    died between train and promote)."""
    from ml.steps.model import promote_candidates

    versions = registered.versions if registered else {}
    waiting = {t: c.version for t, c in versions.items() if c and not c.gate_status}
    new = {o.ticker: o.version for o in trained.outcomes if o.version}
    decisions, failed = promote_candidates(waiting, new, request.as_of, settings, strict=strict)
    return Promoted(decisions, failed)


def forecast(
    request: DayRequest, settings: Settings, published: Published | None, *, strict: bool = False
) -> Forecasted:
    """Every published ticker with a champion: the ledger scored, the next bar forecast."""
    from ml.steps.forecast import forecast_all
    from ml.steps.records import Watch

    tickers = sorted(published.tickers) if published else []
    out = forecast_all(tickers, request.as_of, settings, strict=strict)
    return Forecasted(
        forecasts={t: forecast_record(row) for t, row in out["forecasts"].items()},
        kept=tuple(out["kept"]),
        no_champion=tuple(out["no_champion"]),
        failed=out["failed"],
        monitor={t: record(Watch, w) for t, w in out["monitor"].items()},
        kinds=out["kinds"],
    )


def report(day: DayResults, settings: Settings, run_id: str) -> DayReport:
    """The run report from every stage's result: written atomically (a read-only or full
    DATA_DIR is said in one line, and the printed table is then all there is)."""
    from ml.steps.common import error_text
    from ml.steps.report import format_table, report_path, summarize_day, write_run_report

    rows = summarize_day(day)
    table = format_table(rows)
    print(table)
    path = None
    try:
        path = str(write_run_report(settings, day.request.as_of, rows, run_id))
        print(f"report: {path}")
    except OSError as exc:
        print(
            f"error: the run report {report_path(settings, day.request.as_of)} could not be "
            f"written ({error_text(exc)}): the table above is its summary; make DATA_DIR writable",
            file=sys.stderr,
        )
    failed = {r["ticker"]: (r["failed_step"], r["error"]) for r in rows if r["state"] == "failed"}
    for ticker, (stage, error) in failed.items():
        print(f"{ticker} failed at {stage}: {error}", file=sys.stderr)
    return DayReport(path, failed, table)


def run_day(request: DayRequest, settings: Settings) -> DayReport:
    """The stages in order in this process: each ticker's failure recorded and the others
    carried on; a stage that raises leaves None and its error (like a DAG task that returned
    nothing), and the report is always written and printed."""
    settings = stage_settings(request, settings)
    errors: dict[str, str] = {}

    def stage(name: str, call: Callable[[], R]) -> R | None:
        from ml.steps.common import error_text

        try:
            return call()
        except Exception as exc:
            errors[name] = error_text(exc)
            print(f"error: the {name} step failed: {errors[name]}", file=sys.stderr)
            return None

    ingested = stage("ingest", lambda: ingest(request, settings))
    published = registered = orders = None
    if ingested is not None:
        published = stage(
            "validate_and_publish", lambda: validate_and_publish(request, settings, ingested)
        )
    if published is not None:
        registered = stage("find_versions", lambda: find_versions(request, settings, published))
        orders = stage(
            "plan_training", lambda: plan_training(request, settings, published, registered)
        )
    trained = train_all(request, settings, orders or ())
    promoted = stage("promote", lambda: promote(request, settings, registered, trained))
    forecasted = stage("forecast", lambda: forecast(request, settings, published))
    day = DayResults(
        request,
        ingested=ingested,
        published=published,
        registered=registered,
        orders=orders,
        trained=trained,
        promoted=promoted,
        forecasted=forecasted,
        step_errors=errors,
    )
    return report(day, settings, run_id=f"cli__{request.as_of}")


def train_all(request: DayRequest, settings: Settings, orders: Sequence[TrainOrder]) -> Trained:
    """Every order's `train`, one after another (the DAG maps them over its workers)."""
    from ml.steps.common import error_text

    outcomes, errors = [], {}
    for order in orders:
        try:
            outcomes.append(train(request, settings, order))
        except Exception as exc:
            errors[order.ticker] = error_text(exc)
    return Trained(tuple(outcomes), errors)


def gathered(outcomes: Sequence[Any], errors: Sequence[Any]) -> Trained:
    """The mapped `train` instances' results (plain TrainOutcome, None for a failed one) and
    their errors ({"ticker", "error"}) as one `Trained` (the DAG's promote and report)."""
    from ml.steps.records import from_plain

    return Trained(
        tuple(from_plain(TrainOutcome, o) for o in outcomes or () if o),
        {e["ticker"]: e["error"] for e in errors or () if e},
    )
