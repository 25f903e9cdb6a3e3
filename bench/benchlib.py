"""Helpers shared by the benchmark scripts: paths, the synthetic histories, Theil's U2, JSON I/O.

Nothing here imports TensorFlow, Airflow or MLflow: the scripts that are timed pay their own imports.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The notebook's period: about 2,500 daily bars per weekday ticker.
HISTORY_START = date(2015, 1, 2)
AS_OF = date(2024, 6, 28)
TARGETS = ("High", "Low", "Close", "Adj Close")


@dataclass(frozen=True)
class TickerSpec:
    ticker: str
    asset_class: str


def read_universe(path: Path | None = None) -> list[TickerSpec]:
    """The tickers of a universe CSV (ticker, asset_class[, name]), in file order."""
    path = path or ROOT / "universe.csv"
    with open(path, newline="") as fh:
        return [TickerSpec(r["ticker"], r["asset_class"]) for r in csv.DictReader(fh)]


def write_histories(
    directory: Path, tickers: list[TickerSpec], start: date = HISTORY_START, end: date = AS_OF
) -> Path:
    """Write each ticker's synthetic history (the project's SyntheticSource) to Parquet.

    Both training scripts read these files, so they train on byte-identical data and neither pays
    for generating it. Returns the manifest path.
    """
    from ml.data.sources import SyntheticSource
    from ml.universe import Instrument

    directory.mkdir(parents=True, exist_ok=True)
    source = SyntheticSource()
    entries = []
    for spec in tickers:
        frame = source.fetch(Instrument(spec.ticker, spec.asset_class), start, end)
        path = directory / f"{spec.ticker.replace('=', '_')}.parquet"
        frame.to_parquet(path, index=False)
        entries.append(
            {
                "ticker": spec.ticker,
                "asset_class": spec.asset_class,
                "path": str(path),
                "bars": len(frame),
            }
        )
    manifest = directory / "manifest.json"
    manifest.write_text(
        json.dumps({"start": start.isoformat(), "end": end.isoformat(), "tickers": entries})
    )
    return manifest


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def theil_u2(actual: Any, predicted: Any, reference: Any) -> list[float]:
    """RMSE(predicted) / RMSE(reference) per column (the same formula as ml.model.evaluation.theil_u2)."""
    import numpy as np

    a = np.asarray(actual, dtype="float64")
    p = np.asarray(predicted, dtype="float64")
    r = np.asarray(reference, dtype="float64")
    model = np.sqrt(np.mean((p - a) ** 2, axis=0))
    ref = np.sqrt(np.mean((r - a) ** 2, axis=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(ref > 0, model / ref, np.nan)
    return [float(v) for v in out]


def persistence(last_close: Any, last_adj_close: Any) -> Any:
    """Every target = the window's last Close (Adj Close: the last Adj Close)."""
    import numpy as np

    c = np.asarray(last_close, dtype="float64")
    return np.column_stack([c, c, c, np.asarray(last_adj_close, dtype="float64")])


def u2_dict(values: list[float]) -> dict[str, float]:
    return {t: round(v, 6) for t, v in zip(TARGETS, values, strict=True)}


def write_json(path: Path, payload: Any) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


def write_side_report(
    path: Path,
    *,
    started: float,
    import_seconds: float,
    rows: list[dict[str, Any]],
    **settings: Any,
) -> None:
    """The JSON one training side (notebook or ours) leaves for `run.py`: its `settings`, the
    import time, the seconds since `started` (perf_counter at interpreter start), the bench's own
    scoring time (excluded from the wall) and the per-ticker rows."""
    write_json(
        path,
        {
            **settings,
            "import_seconds": round(import_seconds, 3),
            "seconds_in_process": round(time.perf_counter() - started, 3),
            "score_seconds": round(sum(r["score_seconds"] for r in rows), 3),
            "tickers": rows,
        },
    )
