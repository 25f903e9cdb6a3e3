"""The forecasts CSV export (`DATA_DIR/forecasts/forecasts.csv`): one row per (ticker, logical date),
written in one atomic write. The ledger (`ml.forecasts.ledger`) is the store of record."""

from __future__ import annotations

import csv
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.data.store import CorruptFile
from ml.model.forecaster import PriceForecaster, forecast_next_bar
from ml.model.quantiles import QUANTILES, RECORD_KEYS, column, record_key

if TYPE_CHECKING:
    import pandas as pd

    from ml.config import Settings
    from ml.universe import Instrument


# The columns every row fills in; an export without one of them is not a forecasts table.
REQUIRED_COLUMNS = [
    "ticker",
    "logical_date",
    "last_bar_date",
    "last_close",
    "pred_high",
    "pred_low",
    "pred_close",
    "pred_adj_close",
    "model_name",
    "model_version",
    "source",
]
# The quantiles of the next bar: empty where the model had none (a champion saved before them),
# and absent from an export written before them (read as empty).
QUANTILE_COLUMNS = list(RECORD_KEYS)
FORECAST_COLUMNS = [*REQUIRED_COLUMNS, *QUANTILE_COLUMNS]


def _row_widths(path: Path) -> set[int]:
    """The numbers of fields of the file's rows (one, for a table)."""
    with path.open(newline="", encoding="utf-8") as fh:
        return {len(row) for row in csv.reader(fh) if row}


def forecasts_path(settings: Settings) -> Path:
    return settings.data_dir / "forecasts" / "forecasts.csv"


def read_forecasts(settings: Settings) -> pd.DataFrame:
    """The forecasts export (every required column filled in: the ledger holds nothing less;
    the quantile columns may be empty, and are added empty to an export written before them). A
    file that is not such a table (garbage, a cut-off row, a value that is not a number) raises
    CorruptForecastsFile naming it and the way out; it is left in place, never overwritten."""
    import pandas as pd

    path = forecasts_path(settings)
    if not path.exists():
        return pd.DataFrame(columns=FORECAST_COLUMNS)
    # Text columns stay text: a ticker such as "NA" or "NULL" is not a missing value.
    text = ["ticker", "logical_date", "last_bar_date", "model_name", "model_version", "source"]
    try:
        table = pd.read_csv(
            path, dtype=dict.fromkeys(text, str), keep_default_na=False, na_values=[""]
        )
        widths = _row_widths(path)
    except (ValueError, csv.Error) as exc:  # not UTF-8, not CSV, empty (ParserError, ...)
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        raise _corrupt_forecasts(settings, path, error) from exc
    if len(widths) > 1:
        # pandas fills a row cut short with empty values, and the quantile columns at the end
        # may be empty: only the number of fields tells a cut-off row.
        raise _corrupt_forecasts(settings, path, "rows of different lengths (a row cut short)")
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise _corrupt_forecasts(settings, path, f"no column(s) {', '.join(missing)}")
    for name in FORECAST_COLUMNS:
        if name not in table.columns:
            table[name] = float("nan")
            continue
        values = table[name]
        if name not in text:
            values = pd.to_numeric(values, errors="coerce")
        missed = values.isna()
        if name in QUANTILE_COLUMNS:  # may be empty (a model without quantiles), not a word
            missed &= table[name].notna()
        bad = missed.to_numpy().nonzero()[0]
        if len(bad):
            what = "empty" if name in text else "empty or not a number"
            what = "not a number" if name in QUANTILE_COLUMNS else what
            more = f", {len(bad) - 1} more row(s) too" if len(bad) > 1 else ""
            where = f"line {int(bad[0]) + 2}: {name} is {what}{more}"
            raise _corrupt_forecasts(settings, path, where)
        if name not in text:
            table[name] = values
    return table


class CorruptForecastsFile(CorruptFile):
    """The forecasts export could not be read; it is left in place (see the message)."""


def _corrupt_forecasts(settings: Settings, path: Path, error: str) -> CorruptForecastsFile:
    from ml.forecasts.ledger import ledger_location

    return CorruptForecastsFile(
        f"the forecasts export {path} is not a readable forecasts table ({error}). It is "
        "left as it is and nothing is written over it. It is an export: every forecast is in "
        f"the ledger ({ledger_location(settings)}), the store of record: rebuild it from there "
        "with `python -m ml export` (the unreadable file is kept beside it as .corrupt-<time>), "
        "or restore it from a backup.",
        path,
    )


def upsert_forecasts(settings: Settings, rows: list[dict[str, Any]]) -> Path:
    """Insert or replace the (ticker, logical_date) rows of the forecasts table in one write."""
    import pandas as pd

    from ml.data.store import PriceStore, atomic_write

    store = PriceStore(settings.data_dir)
    path = forecasts_path(settings)
    new = pd.DataFrame(rows, columns=FORECAST_COLUMNS)
    new[QUANTILE_COLUMNS] = new[QUANTILE_COLUMNS].astype("float64")  # None: NaN, not objects
    with store.lock("forecasts"):
        table = read_forecasts(settings)
        replaced = table.set_index(["ticker", "logical_date"]).index.isin(
            new.set_index(["ticker", "logical_date"]).index
        )
        keep = table.loc[~replaced]
        table = pd.concat([keep, new], ignore_index=True) if len(keep) else new
        table = table.drop_duplicates(["ticker", "logical_date"], keep="last")
        table = table.sort_values(["logical_date", "ticker"], kind="stable").reset_index(drop=True)
        atomic_write(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6f"))
    return path


def rebuild_export(settings: Settings) -> tuple[Path, int, Path | None]:
    """Write the export again from the ledger's forecasts, in one atomic write: every forecast,
    one row per (ticker, logical date) (the newest model version's where a date was forecast
    again). An export that cannot be read is first moved aside (`.corrupt-<time>`). Returns
    (the export, its rows, where an unreadable old export went or None)."""
    import time

    from ml.data.store import PriceStore, atomic_write
    from ml.forecasts.ledger import read_table

    ledger = read_table(settings, "forecasts")
    table = ledger.assign(_version=ledger["model_version"].astype(int))[
        [*FORECAST_COLUMNS, "_version"]
    ]
    table = table.sort_values(["logical_date", "ticker", "_version"], kind="stable")
    table = table.drop_duplicates(["ticker", "logical_date"], keep="last")
    table = table.drop(columns="_version").reset_index(drop=True)
    path = forecasts_path(settings)
    moved = None
    with PriceStore(settings.data_dir).lock("forecasts"):
        try:
            read_forecasts(settings)
        except CorruptForecastsFile:
            moved = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            path.rename(moved)
        atomic_write(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6f"))
    return path, len(table), moved


def upsert_forecast(settings: Settings, row: dict[str, Any]) -> Path:
    """Insert or replace one (ticker, logical_date) row of the forecasts table, atomically."""
    return upsert_forecasts(settings, [row])


def forecast_row(
    instrument: Instrument,
    as_of: date,
    history: pd.DataFrame,
    forecaster: PriceForecaster,
    version: str,
    settings: Settings,
) -> dict[str, Any]:
    """The forecasts-table row of `forecaster` (model `version`) for the bar after `history`."""
    last_date, prices = forecast_next_bar(forecaster, history)
    return {
        "ticker": instrument.ticker,
        "logical_date": as_of.isoformat(),
        "last_bar_date": last_date.date().isoformat(),
        "last_close": float(history["Close"].iloc[-1]),
        "pred_high": prices["High"],
        "pred_low": prices["Low"],
        "pred_close": prices["Close"],
        "pred_adj_close": prices["Adj Close"],
        "model_name": instrument.model_name,
        "model_version": str(version),
        "source": settings.price_source,
        **{
            record_key(t, q): prices.get(column(t, q))
            for t, levels in QUANTILES.items()
            for q in levels
        },
    }
