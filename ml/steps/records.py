"""What the stages of a day hand each other (`ml.pipeline`): frozen dataclasses, and their plain
form (JSON types only) for Airflow's XCom.

Each stage takes some of these and returns one; the DAG passes them between tasks as
`to_plain(record)` and rebuilds them with `from_plain(Type, plain)`, so the graph shows every
data flow and a task's input is its arguments.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import date
from typing import Any, TypeVar

from ml.data.ingest import StagedBatch
from ml.registry.gate import PromotionDecision

T = TypeVar("T")


def to_plain(value: Any) -> Any:
    """`value` as JSON types: a dataclass as a dict of its fields, tuples as lists, dates as
    ISO strings."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    if isinstance(value, date):
        return value.isoformat()
    return value


def from_plain(kind: Any, data: Any) -> Any:
    """The value of type `kind` whose plain form is `data` (the inverse of `to_plain`)."""
    if data is None or kind is Any:
        return data
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        return from_plain(options[0], data)
    if is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return kind(
            **{
                f.name: from_plain(hints[f.name], data[f.name])
                for f in fields(kind)
                if f.name in data
            }
        )
    if origin is tuple:
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_plain(args[0], v) for v in data)
        return tuple(from_plain(a, v) for a, v in zip(args, data, strict=True))
    if origin in (dict, Mapping):
        value_kind = typing.get_args(kind)[1]
        return {k: from_plain(value_kind, v) for k, v in data.items()}
    if kind is date:
        return date.fromisoformat(data)
    if kind in (int, float) and not isinstance(data, bool):
        return kind(data)
    return data


@dataclass(frozen=True)
class DayRequest:
    """What a day is asked to do: the run's params, checked (`ml.pipeline.resolve`)."""

    as_of: date
    tickers: tuple[str, ...]
    force_retrain: bool = False
    full_refresh: bool = False
    kinds: tuple[str, ...] | None = None  # None: the settings' MODEL_KINDS
    max_epochs: int | None = None


@dataclass(frozen=True)
class Ingested:
    staged: Mapping[str, StagedBatch]
    failed: Mapping[str, str]


@dataclass(frozen=True)
class Publication:
    """A ticker's bars after validation: what was added, and the fingerprint of the bars <= D."""

    rows_added: int
    rows_updated: int
    total_rows: int
    last_date: str | None
    validation: str
    checks: int
    data_fingerprint: str
    last_bar_date: str
    revision: str | None = None  # the corporate action or correction that was healed

    @property
    def changed(self) -> bool:
        return bool(self.rows_added or self.rows_updated)


@dataclass(frozen=True)
class Published:
    tickers: Mapping[str, Publication]
    failed: Mapping[str, str]


@dataclass(frozen=True)
class IntervalFigures:
    """A version's quantiles on its test block (`ml.model.probabilistic.IntervalReport.to_tag`)."""

    n: int
    band: tuple[float | None, float | None]
    coverage: Mapping[str, float | None]
    interval_score_close_90_vs_historical: float | None
    pinball_tails_vs_historical: float | None
    dm_historical: Mapping[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Coverage:
    """The registered version trained on exactly a ticker's bars and this config."""

    version: str
    trained_for: str | None
    gate_status: str | None
    metrics: Mapping[str, float]
    metrics_range_naive: Mapping[str, float]
    intervals: IntervalFigures | None = None


@dataclass(frozen=True)
class RetrainAsk:
    """The ledger's monitor asked for a retrain (live U2, coverage or input drift) on `flagged_on`."""

    reason: str
    flagged_on: str


@dataclass(frozen=True)
class Registered:
    """What the registry and the ledger say about the tickers whose bars did not change."""

    versions: Mapping[str, Coverage | None]  # None: no version covers these bars
    lookup_errors: Mapping[str, str]
    asks: Mapping[str, RetrainAsk]


@dataclass(frozen=True)
class TrainOrder:
    ticker: str
    reason: str
    seed: int | None = None  # a retrain the monitor asked for: a seed of the date


@dataclass(frozen=True)
class TrainOutcome:
    """What training did for one ticker: a new version, or one that covers its bars."""

    ticker: str
    status: str  # "trained" | "reused" | "skipped"
    version: str | None
    run_id: str | None
    reason: str
    metrics: Mapping[str, float]
    metrics_range_naive: Mapping[str, float] = field(default_factory=dict)
    intervals: IntervalFigures | None = None
    chosen_kind: str | None = None


@dataclass(frozen=True)
class Trained:
    outcomes: tuple[TrainOutcome, ...]
    errors: Mapping[str, str]  # ticker -> the error of its train


@dataclass(frozen=True)
class Promoted:
    decisions: Mapping[str, PromotionDecision]
    failed: Mapping[str, str]


@dataclass(frozen=True)
class ForecastRecord:
    """One forecast of the bar after `last_bar_date` (a row of the ledger and the export)."""

    ticker: str
    logical_date: str
    last_bar_date: str
    last_close: float
    pred_high: float
    pred_low: float
    pred_close: float
    pred_adj_close: float
    model_name: str
    model_version: str
    source: str
    # The quantiles (`ml.model.quantiles.RECORD_KEYS`); None from a model saved before them.
    quantiles: Mapping[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Watch:
    """The ledger's monitor on a ticker: live figures over the last 20 scored bars."""

    live: Mapping[str, float | None]
    drifted: bool
    retrain_reason: str | None


@dataclass(frozen=True)
class Forecasted:
    forecasts: Mapping[str, ForecastRecord]
    kept: tuple[str, ...]
    no_champion: tuple[str, ...]
    failed: Mapping[str, str]
    monitor: Mapping[str, Watch]
    kinds: Mapping[str, str]


@dataclass(frozen=True)
class DayReport:
    path: str | None  # None: it could not be written (the table was printed)
    failed: Mapping[str, tuple[str, str]]  # ticker -> (stage, error)
    table: str


@dataclass(frozen=True)
class DayResults:
    """Every stage's result of one day (None: the stage failed as a whole, or did not run):
    what the report reads."""

    request: DayRequest
    ingested: Ingested | None = None
    published: Published | None = None
    registered: Registered | None = None
    orders: tuple[TrainOrder, ...] | None = None
    trained: Trained | None = None
    promoted: Promoted | None = None
    forecasted: Forecasted | None = None
    step_errors: Mapping[str, str] = field(default_factory=dict)  # stage -> error (the CLI's)


def record(kind: type[T], data: Mapping[str, Any]) -> T:
    """A record from a step's dict (extra keys ignored)."""
    return from_plain(kind, {f.name: data[f.name] for f in fields(kind) if f.name in data})  # type: ignore[arg-type]


def forecast_record(row: Mapping[str, Any]) -> ForecastRecord:
    """A forecasts-table row as a record: the quantile columns gathered under `quantiles`."""
    from ml.model.quantiles import RECORD_KEYS

    quantiles = {k: (None if row.get(k) is None else float(row[k])) for k in RECORD_KEYS}
    return from_plain(ForecastRecord, {**dict(row), "quantiles": quantiles})


def forecast_row(forecast: ForecastRecord) -> dict[str, Any]:
    """The record as the forecasts-table row it came from."""
    plain = to_plain(forecast)
    return {**{k: v for k, v in plain.items() if k != "quantiles"}, **plain["quantiles"]}


def coverage_of(version: Any) -> Coverage:
    """A registered MLflow model version (trained on a ticker's bars) as a record."""
    from ml.registry.versions import version_figures

    metrics, metrics_range_naive, intervals = version_figures(version)
    return Coverage(
        version=str(version.version),
        trained_for=version.tags.get("logical_date"),
        gate_status=version.tags.get("gate_status"),
        metrics=metrics,
        metrics_range_naive=metrics_range_naive,
        intervals=from_plain(IntervalFigures, intervals) if intervals else None,
    )
