"""Scores of the next bar's quantiles (`ml.model.quantiles`) and the two baselines they must beat.

On one block of bars, in PRICES:

- coverage: the share of bars inside Close's 80 % and 90 % intervals, below High's 0.90 and 0.95
  quantiles, above Low's 0.10 and 0.05 quantiles (each should be its nominal level);
- the interval score of Close's intervals (Gneiting and Raftery 2007: width plus 2/alpha times
  the miss) and the pinball loss of every quantile, from `scoringrules`;
- the same for two baselines on the same bars, and each score as a ratio to theirs:
  **historical simulation** (per target, the empirical quantiles of the log-ratios of the
  trailing 250 bars) and a **Gaussian** from the trailing 20 bars (Close: mean 0 and the
  realized volatility, the root mean square of the returns; High and Low: the mean and standard
  deviation of their own log-ratios);
- the binomial 99 % band of a 90 % coverage for the block's size, and the Diebold-Mariano test of
  Close's 90 % interval score against historical simulation's: what the gate reads.

The baselines of a bar read only the log-ratios realized up to its last bar (point in time).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ml.model.features import TARGETS
from ml.model.quantiles import QUANTILE_TARGETS, QUANTILES, column

if TYPE_CHECKING:
    import numpy as np

    from ml.model.windows import SplitData

HISTORICAL_BARS = 250
GAUSSIAN_BARS = 20
BASELINES = ("historical", "gaussian")
# Close's central intervals: nominal coverage -> (lower, upper) quantile level.
INTERVALS = {"close_80": (0.10, 0.90), "close_90": (0.05, 0.95)}
# One-sided tails: name -> (target, level); covered when High <= q (High) or Low >= q (Low).
TAILS = {
    "high_q90": ("High", 0.90),
    "high_q95": ("High", 0.95),
    "low_q10": ("Low", 0.10),
    "low_q05": ("Low", 0.05),
}
NOMINAL = {
    "close_80": 0.80,
    "close_90": 0.90,
    **{k: (v if v > 0.5 else 1 - v) for k, (_, v) in TAILS.items()},
}
# The quantiles of the gate's second question and of the pinball figure.
TAIL_PAIR = (column("High", 0.90), column("Low", 0.10))
BAND_LEVEL = 0.99


def binomial_band(n: int, p: float = 0.90, level: float = BAND_LEVEL) -> tuple[float, float]:
    """The central `level` band of the share of hits among `n` bars that each hit with
    probability `p`: outside it, the intervals are miscalibrated (or the bars are not
    independent)."""
    from scipy.stats import binom

    if n <= 0:
        return (0.0, 1.0)
    low, high = binom.interval(level, n, p)
    return (float(low) / n, float(high) / n)


def baseline_log_quantiles(past: np.ndarray, positions: np.ndarray) -> dict[str, dict[str, Any]]:
    """Baseline -> quantile column -> (n,) log-ratios for the bars whose windows sit at
    `positions` of `past`: (m, 3) realized log-ratios in QUANTILE_TARGETS order, one per window
    in date order, so window g may read `past[:g]` (its own target is `past[g]`)."""
    import numpy as np

    positions = np.asarray(positions, dtype=int)
    out: dict[str, dict[str, Any]] = {
        b: {column(t, q): np.full(len(positions), np.nan) for t in QUANTILES for q in QUANTILES[t]}
        for b in BASELINES
    }
    # A bar with both full trailing windows is one of many (the ledger scores every past
    # forecast again on each run): those are computed at once on strided views of `past`; the
    # first bars of a series, with shorter windows, one at a time.
    full = positions >= max(HISTORICAL_BARS, GAUSSIAN_BARS)
    if full.any():
        at = positions[full]
        _fill(out, full, _trailing(past, at, HISTORICAL_BARS), _trailing(past, at, GAUSSIAN_BARS))
    for i in np.flatnonzero(~full & (positions >= 2)):
        g = int(positions[i])
        history = past[max(0, g - HISTORICAL_BARS) : g].T[None]
        recent = past[max(0, g - GAUSSIAN_BARS) : g].T[None]
        _fill(out, np.arange(len(positions)) == i, history, recent)
    return out


def _trailing(past: np.ndarray, positions: np.ndarray, bars: int) -> np.ndarray:
    """(k, 3, bars) the `bars` rows of `past` before each of `positions` (each >= bars)."""
    from numpy.lib.stride_tricks import sliding_window_view

    return sliding_window_view(past, bars, axis=0)[positions - bars]


def _fill(
    out: dict[str, dict[str, Any]], rows: np.ndarray, history: np.ndarray, recent: np.ndarray
) -> None:
    """Write both baselines' quantiles of the bars `rows` (a mask of `out`'s bars) from their
    trailing log-ratios `history` and `recent`, each (k, 3, bars) in QUANTILE_TARGETS order."""
    import numpy as np
    from scipy.stats import norm

    for j, target in enumerate(QUANTILE_TARGETS):
        if target == "Close":
            mean, sd = 0.0, np.sqrt(np.mean(recent[:, j] ** 2, axis=-1))
        else:
            mean, sd = recent[:, j].mean(axis=-1), recent[:, j].std(axis=-1, ddof=1)
        for q in QUANTILES[target]:
            name = column(target, q)
            out["historical"][name][rows] = np.quantile(history[:, j], q, axis=-1)
            out["gaussian"][name][rows] = mean + sd * norm.ppf(q)


def block_baselines(split: SplitData, block: str = "test") -> dict[str, dict[str, Any]]:
    """The baselines' quantiles in prices for the windows of `split`'s `block`, from the
    log-ratios of every window before each (train, validation and the block's own past)."""
    import numpy as np

    parts = [split.train, split.val, split.test]
    names = ["train", "val", "test"]
    index = names.index(block)
    order = [TARGETS.index(t) for t in QUANTILE_TARGETS]
    past = np.concatenate([p.y[:, order] for p in parts[: index + 1]])
    start = sum(len(p) for p in parts[:index])
    part = parts[index]
    logs = baseline_log_quantiles(past, np.arange(start, start + len(part)))
    return {
        b: {name: part.last_close * np.exp(v) for name, v in cols.items()}
        for b, cols in logs.items()
    }


def interval_score(actual: Any, lower: Any, upper: Any, nominal: float) -> np.ndarray:
    """Per bar, the interval score of central `nominal` intervals [lower, upper] (Gneiting and
    Raftery 2007: the width plus 2 / (1 - nominal) times the miss), in the prices' units."""
    import numpy as np
    import scoringrules as sr

    return np.asarray(sr.interval_score(actual, lower, upper, 1 - nominal))


def _scores(actual: np.ndarray, quantiles: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-bar coverage hits, interval scores and pinball losses of one forecast."""
    import numpy as np
    import scoringrules as sr

    by_target = {t: actual[:, TARGETS.index(t)] for t in QUANTILE_TARGETS}
    close = by_target["Close"]
    hits, interval = {}, {}
    for name, (lo, hi) in INTERVALS.items():
        lower, upper = quantiles[column("Close", lo)], quantiles[column("Close", hi)]
        hits[name] = (close >= lower) & (close <= upper)
        interval[name] = interval_score(close, lower, upper, NOMINAL[name])
    for name, (target, level) in TAILS.items():
        q = quantiles[column(target, level)]
        hits[name] = by_target[target] <= q if level > 0.5 else by_target[target] >= q
    pinball = {
        column(t, q): np.asarray(sr.quantile_score(by_target[t], quantiles[column(t, q)], q))
        for t in QUANTILE_TARGETS
        for q in QUANTILES[t]
    }
    return {"coverage": hits, "interval_score": interval, "pinball": pinball}


def _means(scores: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    import numpy as np

    return {kind: {k: float(np.mean(v)) for k, v in per.items()} for kind, per in scores.items()}


@dataclass(frozen=True)
class IntervalReport:
    """A forecast's quantiles scored on one block, beside the baselines on the same bars."""

    n: int
    coverage: dict[str, float]
    interval_score: dict[str, float]
    pinball: dict[str, float]
    # baseline -> {"coverage" | "interval_score" | "pinball" -> name -> mean}
    baselines: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    # Close's 90 % interval score against historical simulation's: {"stat", "p_worse", "p_better"}
    dm_historical: dict[str, float] = field(default_factory=dict)

    @property
    def band(self) -> tuple[float, float]:
        return binomial_band(self.n)

    def ratio(self, score: str, name: str, baseline: str = "historical") -> float:
        ours = getattr(self, score)[name]
        theirs = self.baselines[baseline][score][name]
        return ours / theirs if theirs > 0 else math.nan

    def tail_ratio(self, baseline: str = "historical") -> float:
        """Pinball loss of High q90 + Low q10 over the baseline's."""
        theirs = sum(self.baselines[baseline]["pinball"][c] for c in TAIL_PAIR)
        return sum(self.pinball[c] for c in TAIL_PAIR) / theirs if theirs > 0 else math.nan

    def as_metrics(self, prefix: str = "test") -> dict[str, float]:
        """Flat MLflow metrics, e.g. "test_coverage_close_90", "test_pinball_high_q90_vs_historical"."""

        def key(*parts: str) -> str:
            return "_".join(p.lower().replace(" ", "_") for p in (prefix, *parts) if p)

        out = {key("coverage", k): v for k, v in self.coverage.items()}
        out.update({key("interval_score", k): v for k, v in self.interval_score.items()})
        out.update({key("pinball", k): v for k, v in self.pinball.items()})
        for b in self.baselines:
            out.update({key("coverage", k, b): v for k, v in self.baselines[b]["coverage"].items()})
            for score in ("interval_score", "pinball"):
                for name in getattr(self, score):
                    out[key(score, name, "vs", b)] = self.ratio(score, name, b)
            out[key("pinball_tails_vs", b)] = self.tail_ratio(b)
        for name, value in self.dm_historical.items():
            out[key("dm_interval_score_historical", name)] = value
        return out

    def to_tag(self) -> str:
        """The gate's inputs as a model-version tag (JSON, NaN as null)."""

        def clean(value: float) -> float | None:
            return round(value, 6) if math.isfinite(value) else None

        return json.dumps(
            {
                "n": self.n,
                "band": [clean(v) for v in self.band],
                "coverage": {k: clean(v) for k, v in self.coverage.items()},
                "interval_score_close_90_vs_historical": clean(
                    self.ratio("interval_score", "close_90")
                ),
                "pinball_tails_vs_historical": clean(self.tail_ratio()),
                "dm_historical": {k: clean(v) for k, v in self.dm_historical.items()},
            },
            sort_keys=True,
        )


def score_intervals(
    actual: np.ndarray, quantiles: dict[str, Any], baselines: dict[str, dict[str, Any]]
) -> IntervalReport:
    """`quantiles` (column -> (n,) prices) scored against `actual` (n, 4) prices in TARGETS order,
    beside each baseline's quantiles on the same bars. Bars where a baseline has no quantile
    (too little history before them) are left out of every figure."""
    import numpy as np

    from ml.model.evaluation import diebold_mariano_losses

    keep = np.ones(len(actual), dtype=bool)
    for cols in baselines.values():
        for values in cols.values():
            keep &= np.isfinite(values)
    actual = actual[keep]
    ours = _scores(actual, {k: np.asarray(v)[keep] for k, v in quantiles.items()})
    theirs = {
        b: _scores(actual, {k: np.asarray(v)[keep] for k, v in cols.items()})
        for b, cols in baselines.items()
    }
    mean = _means(ours)
    dm = {}
    if "historical" in theirs and len(actual) >= 3:
        dm = diebold_mariano_losses(
            ours["interval_score"]["close_90"], theirs["historical"]["interval_score"]["close_90"]
        )
    return IntervalReport(
        n=len(actual),
        coverage=mean["coverage"],
        interval_score=mean["interval_score"],
        pinball=mean["pinball"],
        baselines={b: _means(s) for b, s in theirs.items()},
        dm_historical=dm,
    )


def score_block(forecaster: Any, split: SplitData, block: str = "test") -> IntervalReport | None:
    """`forecaster`'s quantiles on `split`'s `block`, scored beside both baselines (None when
    the forecaster has no quantiles)."""
    part = getattr(split, block)
    _, quantiles = forecaster.forecast_windows(
        part.x, part.last_close, part.last_adj_close, part.high_ratio, part.low_ratio
    )
    if not quantiles:
        return None
    return score_intervals(part.actual, quantiles, block_baselines(split, block))
