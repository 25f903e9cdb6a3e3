"""`validate_prices`: a batch of daily bars against its Great Expectations suite (`ml.quality.suite`);
raises PriceValidationError with GX's report on bad data.

A batch is checked in three steps:

1. before GX: the frame must have rows (an empty batch fails with "no rows"), and its columns and
   dtypes must be the standard ones; if they are not, a schema-only suite runs on the raw frame so
   the report names the missing or unexpected columns;
2. `ml.quality.derived.prepare_frame` derives helper columns (prefixed `_`) for the checks GX
   cannot express on raw columns (tolerances, calendar, jumps, bounds), reading the published bars
   before the batch for the checks that look back;
3. one GX suite per instrument (`build_suite`, rules per asset class in `CLASS_RULES`) asserts
   everything on raw and helper columns alike, so the report is GX's own result: a verdict per
   expectation, and for each failed one GX's COMPLETE result with the offending rows.

Importing this module does nothing but define things: GX and pandas are imported on first use and
one ephemeral GX context is created per process on the first validation.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from ml.data.schema import OUTPUT_COLUMNS
from ml.quality.derived import prepare_frame
from ml.quality.suite import (
    AGE_DAYS,
    DEFAULT_OHLC_TOLERANCE,
    MAX_OHLC_TOLERANCE,
    NUMERIC_COLUMNS,
    VERDICT_FORMAT,
    build_schema_suite,
    cached_suite,
    rules_for,
)
from ml.universe import Instrument

if TYPE_CHECKING:
    import great_expectations as gx
    import pandas as pd


REPORT_ROWS = 20


MESSAGE_ROWS = 5


class PriceValidationError(ValueError):
    """A price batch failed validation. The message names the ticker, each failed check and
    example rows; `report` is the full JSON-serializable result (the quarantine report)."""

    def __init__(self, ticker: str, failures: list[dict], report: dict, headline: str) -> None:
        self.ticker = ticker
        self.failures = failures
        self.report = report
        super().__init__(_format_message(ticker, headline, failures))

    def __reduce__(self):  # picklable across processes (Airflow, multiprocessing)
        return (_rebuild_error, (self.ticker, self.failures, self.report, str(self)))


def _rebuild_error(ticker: str, failures: list[dict], report: dict, message: str):
    err = PriceValidationError.__new__(PriceValidationError)
    ValueError.__init__(err, message)
    err.ticker, err.failures, err.report = ticker, failures, report
    return err


@dataclass(frozen=True)
class ValidationReport:
    """GX's result for one batch, JSON-ready: one dict per expectation, in suite order.

    Passing expectations carry GX's verdict; failing ones its COMPLETE result (every offending
    row's Date and values, the first `REPORT_ROWS` rows in full). `meta` says what was validated.
    """

    ticker: str
    success: bool
    results: list[dict]
    statistics: dict
    meta: dict = field(default_factory=dict)

    def to_json(self) -> str:
        """The whole report (offending rows included) as deterministic JSON."""
        return json.dumps(asdict(self), sort_keys=True, indent=2, allow_nan=False)

    @property
    def failures(self) -> list[dict]:
        return [_summarize_failure(r) for r in self.results if not r.get("success")]


_CONTEXT_LOCK = threading.Lock()


@lru_cache(maxsize=1)
def _batch_definition():
    """The process's one ephemeral context, with a pandas data source for whole data frames."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_pandas("prices").add_dataframe_asset("bars")
    return asset.add_batch_definition_whole_dataframe("whole")


def warm_context() -> None:
    """Build the process's GX context now (a few ms; no threads), e.g. before forking workers
    that would each build their own."""
    with _CONTEXT_LOCK:
        _batch_definition()


def _check(result: dict) -> str:
    return result["expectation_config"]["meta"]["check"]


def _run_suite(frame: pd.DataFrame, suite: gx.ExpectationSuite) -> dict:
    """GX's result for `suite` on `frame`: verdicts for passing expectations, and for failing ones
    the COMPLETE result with the offending rows.

    GX's cost is mostly per-expectation bookkeeping, and it doubles for detailed result formats.
    So the whole suite runs once for verdicts only, and just the failed expectations run again in
    detail: a passing batch costs one cheap pass, a failing one a little more.
    """
    import great_expectations as gx

    with _CONTEXT_LOCK:
        batch_definition = _batch_definition()
    batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
    verdicts = batch.validate(suite, result_format=VERDICT_FORMAT).to_json_dict()
    if verdicts["success"]:
        return verdicts

    failed = {_check(r) for r in verdicts["results"] if not r["success"]}
    retry = gx.ExpectationSuite(
        name=suite.name,
        expectations=[e.configuration for e in suite.expectations if e.meta["check"] in failed],
    )
    detail_format = {
        "result_format": "COMPLETE",
        "unexpected_index_column_names": ["Date"] if "Date" in frame.columns else None,
        "include_unexpected_rows": True,
        "partial_unexpected_count": REPORT_ROWS,
    }
    detailed = batch.validate(retry, result_format=detail_format).to_json_dict()
    by_check = {_check(r): r for r in detailed["results"]}
    verdicts["results"] = [by_check.get(_check(r), r) for r in verdicts["results"]]
    passed = sum(bool(r["success"]) for r in verdicts["results"])
    total = len(verdicts["results"])
    verdicts["success"] = passed == total
    verdicts["statistics"] = {
        "evaluated_expectations": total,
        "successful_expectations": passed,
        "unsuccessful_expectations": total - passed,
        "success_percent": 100.0 * passed / total if total else None,
    }
    return verdicts


def _schema_ok(frame: pd.DataFrame) -> bool:
    import pandas as pd

    if set(frame.columns) != set(OUTPUT_COLUMNS) or frame.columns.duplicated().any():
        return False
    dtypes = frame.dtypes
    if not pd.api.types.is_datetime64_dtype(dtypes["Date"]) or isinstance(
        dtypes["Date"], pd.DatetimeTZDtype
    ):
        return False
    return all(
        pd.api.types.is_numeric_dtype(dtypes[c]) and not pd.api.types.is_bool_dtype(dtypes[c])
        for c in NUMERIC_COLUMNS
    )


def validate_prices(
    batch: pd.DataFrame,
    instrument: Instrument,
    as_of: date,
    *,
    previous: pd.DataFrame | None = None,
    tolerance: float = DEFAULT_OHLC_TOLERANCE,
) -> ValidationReport:
    """Validate one batch of bars of `instrument` as seen on the run's logical date `as_of`.

    `previous` is the already-published history (or None): its last bar before the batch anchors
    the gap and jump checks of the batch's first bar. Returns the report when every expectation
    passes, raises PriceValidationError (carrying the same report) otherwise.
    """
    import pandas as pd

    if not isinstance(batch, pd.DataFrame):
        raise TypeError(f"{instrument.ticker}: expected a pandas DataFrame, got {type(batch)}")
    if not 0 <= tolerance <= MAX_OHLC_TOLERANCE:
        raise ValueError(f"tolerance must be within [0, {MAX_OHLC_TOLERANCE}], got {tolerance}")
    if isinstance(as_of, datetime):
        as_of = as_of.date()
    rules_for(instrument)
    meta = {
        "asset_class": instrument.asset_class,
        "as_of": as_of.isoformat(),
        "rows": len(batch),
        "tolerance": tolerance,
    }

    if batch.empty:
        report = _empty_report(instrument, meta)
        raise PriceValidationError(
            instrument.ticker,
            report.failures,
            json.loads(report.to_json()),
            f"the batch has no rows (as_of {as_of})",
        )

    if _schema_ok(batch):
        frame = prepare_frame(batch, as_of, previous=previous, tolerance=tolerance)
        suite = cached_suite(instrument, tolerance)
    else:
        frame = batch
        suite = build_schema_suite(instrument, [str(c) for c in batch.columns])
    raw = _run_suite(frame, suite)
    report = _make_report(instrument, raw, suite, meta)
    if report.success:
        return report

    failures = [_summarize_failure(r, frame) for r in report.results if not r.get("success")]
    stats = report.statistics
    raise PriceValidationError(
        instrument.ticker,
        failures,
        json.loads(report.to_json()),
        f"{stats.get('unsuccessful_expectations')} of {stats.get('evaluated_expectations')} "
        f"checks of suite {suite.name!r} failed on {len(batch)} rows (as_of {as_of})",
    )


def recheck_published(
    batch: pd.DataFrame, history: pd.DataFrame, instrument: Instrument, as_of: date
) -> ValidationReport | None:
    """The report of a batch that brings nothing new, without running the GX suite again.

    A no-new-data day re-fetches a trailing window whose bars are all already published with
    equal values: every expectation on the bars themselves passed when they were published, so
    only the two checks that depend on the run's date are evaluated again, here in pandas: no bar
    after `as_of`, and the newest bar at most `max_age_days` old (a stale feed still fails).
    Returns None when the batch is empty, has another schema, adds or changes a bar, or fails an
    as-of check: the caller then runs the full suite, which writes the usual report.
    """
    import pandas as pd

    from ml.data.store import count_changes

    if batch.empty or not _schema_ok(batch) or count_changes(history, batch) != (0, 0):
        return None
    if isinstance(as_of, datetime):
        as_of = as_of.date()
    rules = rules_for(instrument)
    ages = (pd.Timestamp(as_of) - batch["Date"]).dt.days
    checks = [
        ("not_after_as_of", "no bar may be dated after as_of (point-in-time)",
         "min_value", 0, int(ages.min()), bool(ages.min() >= 0)),
        ("fresh", f"the newest bar must be at most {rules.max_age_days} days before as_of",
         "max_value", rules.max_age_days, int(ages.min()), bool(ages.min() <= rules.max_age_days)),
    ]  # fmt: skip
    if not all(ok for *_, ok in checks):
        return None
    results = [
        {
            "success": True,
            "expectation_config": {
                "type": "expect_column_min_to_be_between",
                "kwargs": {"column": AGE_DAYS, bound: limit},
                "meta": {"check": check, "reason": reason},
            },
            "result": {"observed_value": observed},
        }
        for check, reason, bound, limit, observed, _ in checks
    ]
    return ValidationReport(
        ticker=instrument.ticker,
        success=True,
        results=results,
        statistics={
            "evaluated_expectations": len(results),
            "successful_expectations": len(results),
            "unsuccessful_expectations": 0,
            "success_percent": 100.0,
        },
        meta={
            "asset_class": instrument.asset_class,
            "as_of": as_of.isoformat(),
            "rows": len(batch),
            "unchanged": "every bar of the batch is already published with equal values and "
            "passed the full suite then; only the as-of checks ran again",
        },
    )


def _make_report(
    instrument: Instrument, raw: dict, suite: gx.ExpectationSuite, meta: dict
) -> ValidationReport:
    order = {exp.meta["check"]: i for i, exp in enumerate(suite.expectations)}
    results = sorted(
        raw["results"],
        key=lambda r: order.get(r["expectation_config"]["meta"].get("check"), len(order)),
    )
    gx_meta = raw.get("meta") or {}
    markers = gx_meta.get("batch_markers") or {}
    return ValidationReport(
        ticker=instrument.ticker,
        success=bool(raw["success"]),
        results=_json_safe(results),
        statistics=_json_safe(raw["statistics"]),
        meta={
            **meta,
            "suite_name": suite.name,
            "great_expectations_version": gx_meta.get("great_expectations_version"),
            # GX's load time is left out so that equal inputs give equal reports.
            "data_fingerprint": markers.get("pandas_data_fingerprint"),
            "result_format": {"passed": VERDICT_FORMAT, "failed": "COMPLETE"},
        },
    )


def _empty_report(instrument: Instrument, meta: dict) -> ValidationReport:
    result = {
        "success": False,
        "expectation_config": {
            "type": "expect_table_row_count_to_be_between",
            "kwargs": {"min_value": 1},
            "meta": {"check": "rows", "reason": "the batch must have rows: no rows", "show": []},
        },
        "result": {"observed_value": 0},
        "exception_info": {"raised_exception": False},
        "meta": {"checked_before_gx": True},
    }
    return ValidationReport(
        ticker=instrument.ticker,
        success=False,
        results=[result],
        statistics={
            "evaluated_expectations": 1,
            "successful_expectations": 0,
            "unsuccessful_expectations": 1,
            "success_percent": 0.0,
        },
        meta={**meta, "suite_name": None},
    )


def _json_safe(value: Any) -> Any:
    """GX's JSON dicts as strict JSON: NaN (a missing value) as None, an infinite value as the
    text "inf" or "-inf", so the report shows what the data held."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _summarize_failure(result: dict, frame: pd.DataFrame | None = None) -> dict:
    config = result.get("expectation_config") or {}
    kwargs = config.get("kwargs") or {}
    meta = config.get("meta") or {}
    body = result.get("result") or {}
    columns = [kwargs[k] for k in ("column", "column_A", "column_B") if k in kwargs]
    show = meta.get("show") or columns
    examples = [_pick(row, show) for row in (body.get("unexpected_rows") or [])[:MESSAGE_ROWS]]
    observed = body.get("observed_value")
    if not examples and frame is not None and observed is not None and "column" in kwargs:
        # An aggregate (e.g. the newest bar's age): show the rows that have the observed value.
        col = kwargs["column"]
        if col in frame.columns:
            hits = frame.loc[frame[col] == observed].head(MESSAGE_ROWS)
            examples = [_pick(_json_safe(row), show) for row in hits.to_dict("records")]
    failure = {
        "expectation": config.get("type"),
        "check": meta.get("check"),
        "columns": columns,
        "reason": meta.get("reason", ""),
        "unexpected_count": body.get("unexpected_count"),
        "observed_value": observed,
        "details": body.get("details"),
        "examples": examples,
    }
    info = result.get("exception_info") or {}
    if info.get("raised_exception"):
        failure["exception"] = info.get("exception_message")
    return _json_safe(failure)


def _pick(row: dict, show: list[str]) -> dict:
    picked = {"Date": _short_date(row.get("Date"))}
    for col in show:
        if col != "Date" and col in row:
            picked[col] = row[col]
    return picked


def _short_date(value: Any) -> Any:
    if isinstance(value, str) and value.endswith("T00:00:00"):
        return value[:10]
    if hasattr(value, "isoformat"):
        text = value.isoformat()
        return text[:10] if text.endswith("T00:00:00") else text
    return value


def _format_message(ticker: str, headline: str, failures: list[dict]) -> str:
    lines = [f"{ticker}: price validation failed: {headline}"]
    for f in failures:
        cols = ", ".join(str(c) for c in f["columns"]) or "table"
        line = f"  - [{f['check']}] {f['expectation']}({cols}): {f['reason']}"
        if f.get("unexpected_count"):
            line += f"; {f['unexpected_count']} bad row(s)"
        details = f.get("details") or {}
        mismatched = details.get("mismatched") if isinstance(details, dict) else None
        if mismatched:
            parts = [f"{k} {', '.join(map(str, v))}" for k, v in sorted(mismatched.items()) if v]
            line += f"; {'; '.join(parts)}"
        elif f.get("observed_value") is not None and not f.get("unexpected_count"):
            line += f"; observed {_fmt(f['observed_value'])}"
        if f.get("exception"):
            line += f"; raised {f['exception']}"
        lines.append(line)
        for row in f["examples"]:
            values = " ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "Date")
            lines.append(f"      {row.get('Date')}  {values}".rstrip())
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "NaN"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
