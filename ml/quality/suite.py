"""The Great Expectations 1.x suites for daily price bars: rules per asset class, the helper
columns the checks read, and one suite per instrument (`build_suite`; `build_schema_suite` when
the columns themselves are wrong)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from ml.data.schema import OUTPUT_COLUMNS
from ml.universe import Instrument

if TYPE_CHECKING:
    import great_expectations as gx


# Yahoo's daily bars are not always internally consistent: adjustments and rounding put Open or
# Close slightly outside [Low, High] now and then (typically by a tick, well under 0.1%). Those
# bars are real data, so Open/Close may exceed High, or undercut Low, by this relative amount.
# High >= Low gets no tolerance: an inverted range is always an error.
DEFAULT_OHLC_TOLERANCE = 0.005


MAX_OHLC_TOLERANCE = 0.1


PRICE_VALUE_COLUMNS = ["Open", "High", "Low", "Close", "Adj Close"]


NUMERIC_COLUMNS = [*PRICE_VALUE_COLUMNS, "Volume"]


DATE_DTYPES = ["datetime64[ns]", "datetime64[us]", "datetime64[ms]", "datetime64[s]"]


NUMERIC_DTYPES = ["float64", "float32", "int64", "int32", "Float64", "Int64"]


WEEKDAY_NAMES = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


# Derived by `prepare_frame`, asserted by the suite.
HIGH_TOLERANT = "_high_with_tolerance"


LOW_TOLERANT = "_low_with_tolerance"


WEEKDAY = "_weekday"


GAP_DAYS = "_gap_days"


AGE_DAYS = "_age_days"


LOG_RETURN = "_close_log_return"


# The largest |log(price / previous price)| of Open, High, Low and Adj Close: a bad tick or a
# non-finite value in any price column, not only in Close.
PRICE_JUMP = "_price_log_jump"


# The largest |log(price / the same bar's Close)| of Open, High and Low: High = 1e308 or
# Low = 1e-300 are ordered (High >= Close > Low > 0) but absurd.
RANGE_TO_CLOSE = "_range_log_to_close"


# |log(Adj Close / Close)|: dividends over decades keep Adj Close within a few times Close.
ADJ_TO_CLOSE = "_adj_log_to_close"


# Volume over the median Volume of the VOLUME_MEDIAN_BARS bars before it (published bars too).
VOLUME_TO_MEDIAN = "_volume_to_median"


HELPER_COLUMNS = [
    HIGH_TOLERANT,
    LOW_TOLERANT,
    WEEKDAY,
    GAP_DAYS,
    AGE_DAYS,
    LOG_RETURN,
    PRICE_JUMP,
    RANGE_TO_CLOSE,
    ADJ_TO_CLOSE,
    VOLUME_TO_MEDIAN,
]


# Every value must be finite: the bounds of the positivity and volume checks.
FINITE_MAX = sys.float_info.max


# |log(Adj Close / Close)| at most log(100): a hundredfold adjustment is a unit error, not
# dividends.
MAX_ABS_LOG_ADJ_TO_CLOSE = math.log(100)


# Volume at most this many times its trailing median: real spikes (index inclusion, news) reach
# tens of times the median, a thinly traded fund's creation day hundreds or more. The bound only
# has to stop what no market prints (1e308, a parsing error), because a refused bar blocks its
# ticker until the vendor or the file changes: it stays in every later trailing window.
MAX_VOLUME_TO_MEDIAN = 10_000.0


VOLUME_MEDIAN_BARS = 20


# GX result formats: verdicts for the whole suite, then COMPLETE (every offending row's Date and
# values, and up to REPORT_ROWS whole rows) for the expectations that failed. MESSAGE_ROWS example
# rows per failed expectation go into the error message.
VERDICT_FORMAT = "BOOLEAN_ONLY"


@dataclass(frozen=True)
class ClassRules:
    """Calendar, freshness and jump limits of one asset class."""

    weekdays_only: bool
    max_gap_days: int  # calendar days between consecutive bars
    max_age_days: int  # calendar days from the newest bar to as_of
    max_abs_log_return: float  # |log(Close_t / Close_t-1)|


# Weekday classes: a gap of 7 days is a full week off (9/11 closed US markets Tue-Fri); the newest
# bar may be 5 days old on a run after a weekend plus a holiday. Crypto trades every day. A 100x
# error moves log(Close) by 4.6; the limits sit well above real daily moves of each class.
CLASS_RULES: dict[str, ClassRules] = {
    "stock": ClassRules(True, 7, 5, math.log(3)),
    "etf": ClassRules(True, 7, 5, math.log(3)),
    "future": ClassRules(True, 7, 5, math.log(3)),
    "forex": ClassRules(True, 7, 5, 0.2),
    "crypto": ClassRules(False, 3, 3, math.log(4)),
}


def rules_for(instrument: Instrument) -> ClassRules:
    try:
        return CLASS_RULES[instrument.asset_class]
    except KeyError:
        raise ValueError(
            f"{instrument.ticker}: no validation rules for asset class {instrument.asset_class!r}"
        ) from None


def _expectation(cls_name: str, check: str, reason: str, show: list[str], **kwargs: Any):
    import great_expectations as gx

    cls = getattr(gx.expectations, cls_name)
    return cls(**kwargs, meta={"check": check, "reason": reason, "show": show})


def _columns_expectation(columns: list[str], reason: str):
    return _expectation(
        "ExpectTableColumnsToMatchSet",
        "columns",
        reason,
        [],
        column_set=list(columns),
        exact_match=True,
    )


def build_schema_suite(
    instrument: Instrument, present: list[str] | None = None
) -> gx.ExpectationSuite:
    """Columns and dtypes, for a raw frame whose shape is wrong (the full suite cannot run on it).

    Dtype expectations are made only for the `present` columns (all when None): GX raises on an
    expectation about a missing column, and the column-set expectation already reports it.
    """
    import great_expectations as gx

    present_set = set(OUTPUT_COLUMNS if present is None else present)
    exps = [
        _columns_expectation(
            OUTPUT_COLUMNS, f"columns must be exactly: {', '.join(OUTPUT_COLUMNS)}"
        )
    ]
    if "Date" in present_set:
        exps.append(
            _expectation(
                "ExpectColumnValuesToBeInTypeList",
                "Date_dtype",
                "Date must be a datetime column without time zone",
                ["Date"],
                column="Date",
                type_list=DATE_DTYPES,
            )
        )
    exps += [
        _expectation(
            "ExpectColumnValuesToBeInTypeList",
            f"{col}_dtype",
            f"{col} must be numeric",
            [col],
            column=col,
            type_list=NUMERIC_DTYPES,
        )
        for col in NUMERIC_COLUMNS
        if col in present_set
    ]
    # Passing the expectations to the constructor, unlike `add_expectation`, needs no active context.
    return gx.ExpectationSuite(name=f"prices.schema.{instrument.slug}", expectations=exps)


def build_suite(
    instrument: Instrument, *, tolerance: float = DEFAULT_OHLC_TOLERANCE
) -> gx.ExpectationSuite:
    """The full suite for one instrument, following its asset class (see `CLASS_RULES`).

    It validates the frame made by `prepare_frame`: the standard columns plus `HELPER_COLUMNS`.
    Dtypes and a non-empty frame are established before it runs (see `validate_prices`).
    """
    import great_expectations as gx

    rules = rules_for(instrument)
    exps = [
        *_column_checks(instrument),
        *_value_checks(tolerance),
        *_bound_checks(rules.max_abs_log_return),
        *_calendar_checks(instrument, rules),
    ]
    checks = [e.meta["check"] for e in exps]
    if len(checks) != len(set(checks)):
        raise ValueError(f"check names must be unique: {sorted(checks)}")
    return gx.ExpectationSuite(
        name=f"prices.{instrument.asset_class}.{instrument.slug}",
        expectations=exps,
        meta={"asset_class": instrument.asset_class, "tolerance": tolerance},
    )


def _column_checks(instrument: Instrument) -> list:
    """The columns, no missing values, the ticker."""
    exps = [
        _columns_expectation(
            [*OUTPUT_COLUMNS, *HELPER_COLUMNS],
            f"columns must be exactly: {', '.join(OUTPUT_COLUMNS)} (plus the derived _ columns)",
        )
    ]
    exps += [
        _expectation(
            "ExpectColumnValuesToNotBeNull",
            f"{col}_not_null",
            f"{col} must not be missing",
            [col],
            column=col,
        )
        for col in OUTPUT_COLUMNS
    ]
    exps.append(
        _expectation(
            "ExpectColumnValuesToBeInSet",
            "ticker",
            f"Ticker must be {instrument.ticker}",
            ["Ticker"],
            column="Ticker",
            value_set=[instrument.ticker],
        )
    )
    return exps


def _value_checks(tolerance: float) -> list:
    """Prices finite and positive, OHLC consistent (within `tolerance`), Volume finite, >= 0."""
    exps: list = []
    pct = f"{tolerance:.2%}"
    exps += [
        _expectation(
            "ExpectColumnValuesToBeBetween",
            f"{col}_positive",
            f"{col} must be a finite number > 0",
            [col],
            column=col,
            min_value=0,
            strict_min=True,
            max_value=FINITE_MAX,
        )
        for col in PRICE_VALUE_COLUMNS
    ]
    exps.append(
        _expectation(
            "ExpectColumnPairValuesAToBeGreaterThanB",
            "high_ge_low",
            "High must be >= Low (no tolerance)",
            ["High", "Low"],
            column_A="High",
            column_B="Low",
            or_equal=True,
            ignore_row_if="either_value_is_missing",
        )
    )
    for bound, side, col in (
        (HIGH_TOLERANT, "High", "Open"),
        (HIGH_TOLERANT, "High", "Close"),
        (LOW_TOLERANT, "Low", "Open"),
        (LOW_TOLERANT, "Low", "Close"),
    ):
        above = side == "High"
        exps.append(
            _expectation(
                "ExpectColumnPairValuesAToBeGreaterThanB",
                f"{side.lower()}_{'ge' if above else 'le'}_{col.lower()}",
                f"{side} must be {'>=' if above else '<='} {col} (within {pct} tolerance)",
                [side, col],
                column_A=bound if above else col,
                column_B=col if above else bound,
                or_equal=True,
                ignore_row_if="either_value_is_missing",
            )
        )
    exps.append(
        _expectation(
            "ExpectColumnValuesToBeBetween",
            "volume_non_negative",
            "Volume must be a finite number >= 0",
            ["Volume"],
            column="Volume",
            min_value=0,
            max_value=FINITE_MAX,
        )
    )
    return exps


def _bound_checks(max_log: float) -> list:
    """Values no market prints although they are ordered and positive: Open, High and Low far
    from the bar's Close, Adj Close far from Close, Volume far above its trailing median."""
    return [
        _expectation(
            "ExpectColumnValuesToBeBetween",
            "range_to_close",
            f"Open, High and Low must be within x{math.exp(max_log):.3g} of the bar's Close "
            f"(|log(price / Close)| <= {max_log:.3g})",
            ["Open", "High", "Low", "Close", RANGE_TO_CLOSE],
            column=RANGE_TO_CLOSE,
            max_value=max_log,
        ),
        _expectation(
            "ExpectColumnValuesToBeBetween",
            "adj_close_to_close",
            f"Adj Close must be within x{math.exp(MAX_ABS_LOG_ADJ_TO_CLOSE):.3g} of Close",
            ["Close", "Adj Close", ADJ_TO_CLOSE],
            column=ADJ_TO_CLOSE,
            max_value=MAX_ABS_LOG_ADJ_TO_CLOSE,
        ),
        _expectation(
            "ExpectColumnValuesToBeBetween",
            "volume_spike",
            f"Volume must be at most {MAX_VOLUME_TO_MEDIAN:g} times the median of the "
            f"{VOLUME_MEDIAN_BARS} bars before it",
            ["Volume", VOLUME_TO_MEDIAN],
            column=VOLUME_TO_MEDIAN,
            max_value=MAX_VOLUME_TO_MEDIAN,
        ),
    ]


def _calendar_checks(instrument: Instrument, rules: ClassRules) -> list:
    """Dates unique and increasing, weekdays, gaps, point in time, freshness, jumps."""
    exps: list = []
    exps += [
        _expectation(
            "ExpectColumnValuesToBeUnique",
            "dates_unique",
            "dates must be unique",
            ["Date"],
            column="Date",
        ),
        _expectation(
            "ExpectColumnValuesToBeIncreasing",
            "dates_increasing",
            "dates must be strictly increasing",
            ["Date"],
            column="Date",
            strictly=True,
        ),
    ]
    if rules.weekdays_only:
        exps.append(
            _expectation(
                "ExpectColumnValuesToBeInSet",
                "no_weekend",
                f"no weekend bars for {instrument.asset_class}",
                [WEEKDAY],
                column=WEEKDAY,
                value_set=WEEKDAY_NAMES[:5],
            )
        )
    exps += [
        _expectation(
            "ExpectColumnValuesToBeBetween",
            "max_gap",
            f"at most {rules.max_gap_days} calendar days between consecutive bars",
            [GAP_DAYS],
            column=GAP_DAYS,
            max_value=rules.max_gap_days,
        ),
        _expectation(
            "ExpectColumnValuesToBeBetween",
            "not_after_as_of",
            "no bar may be dated after as_of (point-in-time)",
            [AGE_DAYS],
            column=AGE_DAYS,
            min_value=0,
        ),
        _expectation(
            "ExpectColumnMinToBeBetween",
            "fresh",
            f"the newest bar must be at most {rules.max_age_days} days before as_of (stale data)",
            [AGE_DAYS],
            column=AGE_DAYS,
            max_value=rules.max_age_days,
        ),
        _expectation(
            "ExpectColumnValuesToBeBetween",
            "close_jump",
            f"|log(Close / previous Close)| must be <= {rules.max_abs_log_return:.3g} "
            f"(x{math.exp(rules.max_abs_log_return):.3g}); larger jumps are bad ticks, unit (100x) "
            "errors, or a split the published history does not reflect yet",
            ["Close", LOG_RETURN],
            column=LOG_RETURN,
            min_value=-rules.max_abs_log_return,
            max_value=rules.max_abs_log_return,
        ),
        _expectation(
            "ExpectColumnValuesToBeBetween",
            "price_jump",
            f"|log(price / previous price)| of Open, High, Low and Adj Close must be <= "
            f"{rules.max_abs_log_return:.3g}, as for Close (the published bar before the batch "
            "counts: a jump at the seam fails too)",
            ["Open", "High", "Low", "Adj Close", PRICE_JUMP],
            column=PRICE_JUMP,
            max_value=rules.max_abs_log_return,
        ),
    ]
    return exps


@lru_cache(maxsize=256)
def cached_suite(instrument: Instrument, tolerance: float) -> gx.ExpectationSuite:
    return build_suite(instrument, tolerance=tolerance)
