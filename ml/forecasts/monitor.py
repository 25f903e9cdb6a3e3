"""Scoring the ledger's forecasts when their bar arrives; live metrics and input drift per ticker.

Point in time: a run for D scores only bars dated <= D and computes metrics from outcomes whose
bar is dated <= D (`ml.forecasts.ledger` holds the tables).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any

from ml.config import Settings
from ml.forecasts.ledger import (
    COVERAGES,
    engine_for,
    ledger_errors,
    ledger_table,
    read_table,
    upsert,
)
from ml.model.features import JUDGED_TARGETS
from ml.model.probabilistic import INTERVALS, NOMINAL, TAILS
from ml.model.quantiles import QUANTILE_TARGETS, record_key

if TYPE_CHECKING:
    import pandas as pd


LIVE_WINDOWS = (20, 60)


# Input drift: a two-sample Kolmogorov-Smirnov test per input (returns, log range, log volume) of
# the last DRIFT_BARS bars against the champion's training block; drifted when an input's p-value
# is below DRIFT_ALPHA / 3 (Bonferroni over the three inputs) AND its KS statistic is at least
# DRIFT_MIN_KS. The effect size matters: volatility clusters, so 60 bars often differ
# significantly from years of history (p alone flagged 12-16 of the 31 synthetic GARCH tickers on
# each of four dates; with KS >= 0.5, 0-2), while four times the volatility gives KS ~0.9.
DRIFT_BARS = 60


DRIFT_ALPHA = 0.01


DRIFT_MIN_KS = 0.5


# Retrain when the champion's live U2 on High or Low is >= 1 over the last LIVE_WINDOWS[0] bars.
LIVE_U2_LIMIT = 1.0


def outcome_row(
    forecast: dict[str, Any], bar: dict[str, Any], hs_close_90: tuple[float, float] | None = None
) -> dict[str, Any]:
    """The outcome of one forecast against the realized `bar` (the first bar after its
    last_bar_date): errors (prediction - actual) per target, persistence's, range and direction,
    and the scores of its quantiles (`interval_scores`; `hs_close_90` is historical
    simulation's 90 % interval of Close for the same bar, in the forecast's units)."""
    last = float(forecast["last_close"])
    row = {k: forecast[k] for k in ("ticker", "last_bar_date", "model_version")}
    row["target_date"] = bar["Date"]
    for target in JUDGED_TARGETS:
        actual = float(bar[target])
        row[f"actual_{target.lower()}"] = actual
        row[f"err_{target.lower()}"] = float(forecast[f"pred_{target.lower()}"]) - actual
        row[f"persistence_err_{target.lower()}"] = last - actual
    row["inside_range"] = bool(
        float(bar["High"]) <= float(forecast["pred_high"])
        and float(bar["Low"]) >= float(forecast["pred_low"])
    )
    moved = float(bar["Close"]) - last
    called = float(forecast["pred_close"]) - last
    row["direction_hit"] = None if moved == 0 or called == 0 else (moved > 0) == (called > 0)
    row.update(interval_scores(forecast, bar, hs_close_90))
    return row


def _quantile(forecast: dict[str, Any], target: str, level: float) -> float | None:
    """The forecast's `level` quantile of `target`, or None (a model without quantiles)."""
    import math

    value = forecast.get(record_key(target, level))
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _interval_score(actual: float, lower: float | None, upper: float | None) -> float | None:
    from ml.model.probabilistic import interval_score

    if lower is None or upper is None:
        return None
    return float(interval_score(actual, lower, upper, NOMINAL["close_90"]))


def interval_scores(
    forecast: dict[str, Any], bar: dict[str, Any], hs_close_90: tuple[float, float] | None = None
) -> dict[str, Any]:
    """`covered_<name>` per COVERAGES (Close inside its 80 % / 90 % interval, High <= its 0.90
    quantile, Low >= its 0.10 quantile), the interval score of Close's 90 % interval and that of
    historical simulation's (`hs_close_90`); None where the forecast has no quantiles."""
    row: dict[str, Any] = {}
    for name in COVERAGES:
        if name in INTERVALS:
            lower, upper = (_quantile(forecast, "Close", q) for q in INTERVALS[name])
            hit = None if lower is None or upper is None else lower <= float(bar["Close"]) <= upper
        else:
            target, level = TAILS[name]
            q, actual = _quantile(forecast, target, level), float(bar[target])
            hit = None if q is None else (actual <= q if level > 0.5 else actual >= q)
        row[f"covered_{name}"] = hit
    close = float(bar["Close"])
    ours = (_quantile(forecast, "Close", q) for q in INTERVALS["close_90"])
    row["interval_score_close_90"] = _interval_score(close, *ours)
    theirs = hs_close_90 if hs_close_90 is not None else (None, None)
    row["hs_interval_score_close_90"] = _interval_score(close, *theirs)
    return row


def hs_close_intervals(
    history: pd.DataFrame, positions: Sequence[int], last_closes: Sequence[float]
) -> list[tuple[float, float] | None]:
    """Historical simulation's 90 % interval of Close, in prices, for forecasts whose last bar
    is `history`'s bar at each of `positions` and whose last Close (in the forecast's units) is
    `last_closes`'s: from the log-ratios of the published bars up to that bar only. A log-ratio
    does not change when a split or dividend re-adjusts the history before it, so the interval
    is in the forecast's units once taken from its own last Close. None: too few bars."""
    import numpy as np

    from ml.model.probabilistic import baseline_log_quantiles
    from ml.model.quantiles import column

    if not len(positions):
        return []
    close = history["Close"].to_numpy(dtype="float64")
    ends = {"Close": close, "High": history["High"].to_numpy(dtype="float64")}
    ends["Low"] = history["Low"].to_numpy(dtype="float64")
    past = np.column_stack([np.log(ends[t][1:] / close[:-1]) for t in QUANTILE_TARGETS])
    logs = baseline_log_quantiles(past, np.asarray(positions))["historical"]
    lower, upper = (logs[column("Close", q)] for q in INTERVALS["close_90"])
    return [
        (float(last * np.exp(lo)), float(last * np.exp(hi))) if np.isfinite(lo + hi) else None
        for last, lo, hi in zip(last_closes, lower, upper, strict=True)
    ]


def forecast_units(forecast: Any, dates: Any, closes: Any, i: int) -> float:
    """The factor that brings the published bar `i` into the units `forecast` was made in.

    A split or dividend re-adjusts the published history after a forecast was made from it
    (`ml.data.revisions`): the bar it forecast then arrives, or is re-read, at the new scale.
    The forecast's last Close against the published Close of the same date gives the factor,
    so the bar is scored as the return the forecast was about; 1.0 when nothing was re-adjusted
    (the realized values are then used exactly as published)."""
    import math

    j = i - 1
    if j < 0 or dates[j] != forecast["last_bar_date"]:
        return 1.0
    then, now = float(forecast["last_close"]), float(closes[j])
    if not (math.isfinite(then) and math.isfinite(now) and then > 0 and now > 0) or then == now:
        return 1.0
    return then / now


def score_outcomes(
    settings: Settings, histories: dict[str, pd.DataFrame], as_of: date
) -> dict[str, int]:
    """Score every forecast of these tickers whose next bar is now published (dated <= as_of).

    `histories` are the published bars per ticker up to `as_of`. Returns the number of scored
    outcomes per ticker (all of them, so a re-run reports the same). One transaction.
    """
    from sqlalchemy import select

    forecasts = ledger_table("forecasts")
    rows: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    with ledger_errors(settings), engine_for(settings).begin() as connection:
        for ticker, history in histories.items():
            found = connection.execute(
                select(forecasts).where(
                    forecasts.c.ticker == ticker, forecasts.c.last_bar_date < as_of.isoformat()
                )
            ).mappings()
            scored = _ticker_outcomes([dict(f) for f in found], history)
            rows.extend(scored)
            counts[ticker] = len(scored)
        upsert(connection, "outcomes", rows)
    return counts


def _ticker_outcomes(found: list[dict[str, Any]], history: pd.DataFrame) -> list[dict[str, Any]]:
    """The outcomes of one ticker's forecasts `found` whose bar is in `history`, each bar in the
    units its forecast was made in (`forecast_units`)."""
    import pandas as pd

    dates = history["Date"].dt.strftime("%Y-%m-%d").to_numpy()
    closes = history["Close"].to_numpy(dtype="float64")
    due = []
    for forecast in found:
        i = int(pd.Index(dates).searchsorted(forecast["last_bar_date"], side="right"))
        if i < len(dates):  # else its bar has not arrived yet (as of this run)
            due.append((forecast, i))
    # The baseline only where there are quantiles to compare it with (its cost grows with the
    # ledger: every run scores every forecast again).
    banded = [
        (f, i)
        for f, i in due
        if None not in (_quantile(f, "Close", q) for q in INTERVALS["close_90"])
    ]
    hs = hs_close_intervals(
        history, [i - 1 for _, i in banded], [float(f["last_close"]) for f, _ in banded]
    )
    baseline = {id(f): interval for (f, _), interval in zip(banded, hs, strict=True)}
    rows = []
    for forecast, i in due:
        bar = history.iloc[i]
        scale = forecast_units(forecast, dates, closes, i)
        realized = {"Date": dates[i], **{t: float(bar[t]) * scale for t in JUDGED_TARGETS}}
        rows.append(outcome_row(forecast, realized, baseline.get(id(forecast))))
    return rows


def live_metrics(outcomes: pd.DataFrame, windows: Sequence[int] = LIVE_WINDOWS) -> dict[str, Any]:
    """Over the last `w` scored bars (by target date) for each w in `windows`: MAE and U2 against
    persistence per target, range coverage and directional accuracy of Close, the count, and
    the quantiles' figures on those of them that had quantiles (`interval_stats`)."""
    import numpy as np

    ordered = outcomes.sort_values("target_date", kind="stable")
    out: dict[str, Any] = {}
    for w in windows:
        last = ordered.tail(w)
        stats: dict[str, Any] = {"n": len(last)}
        for target in JUDGED_TARGETS:
            err = last[f"err_{target.lower()}"].to_numpy(dtype=float)
            ref = last[f"persistence_err_{target.lower()}"].to_numpy(dtype=float)
            stats[f"mae_{target.lower()}"] = float(np.mean(np.abs(err))) if len(err) else None
            ref_rmse = float(np.sqrt(np.mean(ref**2))) if len(ref) else 0.0
            stats[f"u2_{target.lower()}"] = (
                float(np.sqrt(np.mean(err**2))) / ref_rmse if ref_rmse > 0 else None
            )
        stats["coverage"] = float(last["inside_range"].astype(bool).mean()) if len(last) else None
        calls = last["direction_hit"].dropna()
        stats["directional_accuracy"] = float(calls.astype(bool).mean()) if len(calls) else None
        stats.update(interval_stats(last))
        out[str(w)] = stats
    return out


def interval_stats(outcomes: pd.DataFrame) -> dict[str, Any]:
    """`coverage_<name>` per COVERAGES and `n_intervals` (the outcomes whose forecast had
    quantiles), the mean interval score of Close's 90 % interval and its ratio to historical
    simulation's on the same bars (`interval_score_close_90_vs_hs`); None where nothing to
    average (outcomes scored before the quantiles have no such columns)."""
    import numpy as np

    stats: dict[str, Any] = {}
    for name in COVERAGES:
        column = f"covered_{name}"
        flags = outcomes[column].dropna() if column in outcomes else ()
        stats[f"coverage_{name}"] = (
            float(np.mean(np.asarray(flags, dtype=bool))) if len(flags) else None
        )
        if name == "close_90":
            stats["n_intervals"] = len(flags)
    ours, theirs = (
        outcomes[c].to_numpy(dtype="float64") if c in outcomes else np.full(len(outcomes), np.nan)
        for c in ("interval_score_close_90", "hs_interval_score_close_90")
    )
    mine = np.isfinite(ours)
    both = mine & np.isfinite(theirs)
    stats["interval_score_close_90"] = float(ours[mine].mean()) if mine.any() else None
    hs = float(theirs[both].mean()) if both.any() else 0.0
    stats["interval_score_close_90_vs_hs"] = float(ours[both].mean()) / hs if hs > 0 else None
    return stats


def _drift_inputs(bars: pd.DataFrame) -> dict[str, Any]:
    import numpy as np

    close = bars["Close"].to_numpy(dtype=float)
    return {
        "return": np.diff(np.log(close)),
        "log_range": np.log(bars["High"].to_numpy(dtype=float) / bars["Low"].to_numpy(dtype=float))[
            1:
        ],
        "log_volume": np.log1p(bars["Volume"].to_numpy(dtype=float))[1:],
    }


def input_drift(history: pd.DataFrame, train_end: date, bars: int = DRIFT_BARS) -> dict[str, Any]:
    """Two-sample Kolmogorov-Smirnov tests of the last `bars` bars of `history` against the
    training block (bars dated <= `train_end`), per input: returns, log range, log volume.

    KS because it needs no binning and no distribution, and reacts to a change of location or of
    scale (a regime of larger ranges is a change of scale); a constant input (forex volume) is
    skipped. Drifted when one input has p < DRIFT_ALPHA / 3 (Bonferroni) and KS >= DRIFT_MIN_KS.
    """
    import pandas as pd
    from scipy.stats import ks_2samp

    train = history.loc[history["Date"] <= pd.Timestamp(train_end)]
    recent = history.tail(bars + 1)
    if len(train) < bars or len(recent) < bars // 2:
        return {"tested": False, "reason": "too few bars", "drifted": False}
    before, after = _drift_inputs(train), _drift_inputs(recent)
    tests = {}
    for name in before:
        if before[name].std() == 0 and after[name].std() == 0:
            continue
        result = ks_2samp(after[name], before[name])
        tests[name] = {"ks": float(result.statistic), "p": float(result.pvalue)}
    return {
        "tested": True,
        "bars": bars,
        "train_end": train_end.isoformat(),
        "tests": tests,
        "drifted": any(
            t["p"] < DRIFT_ALPHA / 3 and t["ks"] >= DRIFT_MIN_KS for t in tests.values()
        ),
    }


def retrain_reason(live: dict[str, Any], drift: dict[str, Any]) -> str | None:
    """Why the next run should retrain this ticker, or None: live U2 >= 1 on High or Low over
    the first live window (when full), Close's 90 % coverage outside its binomial band over the
    last window (`coverage_reason`), or input drift."""
    w = str(LIVE_WINDOWS[0])
    stats = live.get(w) or {}
    reasons = []
    if stats.get("n", 0) >= LIVE_WINDOWS[0]:
        for target in ("High", "Low"):
            value = stats.get(f"u2_{target.lower()}")
            if value is not None and value >= LIVE_U2_LIMIT:
                reasons.append(f"live U2 {target} {value:.3f} >= {LIVE_U2_LIMIT} over {w} bars")
    coverage = coverage_reason(live)
    if coverage:
        reasons.append(coverage)
    if drift.get("drifted"):
        worst = min(drift["tests"].items(), key=lambda kv: kv[1]["p"])
        reasons.append(
            f"input drift: {worst[0]} KS {worst[1]['ks']:.3f} (p {worst[1]['p']:.2g}) over the "
            f"last {drift['bars']} bars vs the training block"
        )
    return "; ".join(reasons) or None


def coverage_reason(live: dict[str, Any]) -> str | None:
    """Close's 90 % coverage over the last LIVE_WINDOWS[-1] scored bars outside the binomial
    99 % band of a calibrated interval, when every one of those bars had quantiles (fewer
    bars, or a mix with an older model's forecasts, cannot be told from chance)."""
    from ml.model.probabilistic import BAND_LEVEL, binomial_band

    w = LIVE_WINDOWS[-1]
    stats = live.get(str(w)) or {}
    n, coverage = stats.get("n_intervals") or 0, stats.get("coverage_close_90")
    if n < w or coverage is None:
        return None
    low, high = binomial_band(n, NOMINAL["close_90"], BAND_LEVEL)
    if low <= coverage <= high:
        return None
    return (
        f"Close 90 % coverage {coverage:.2f} over {n} bars outside its "
        f"{BAND_LEVEL * 100:.0f} % band {low:.2f}-{high:.2f}"
    )


@dataclass(frozen=True)
class Monitor:
    ticker: str
    as_of: str
    model_version: str | None
    live: dict[str, Any]
    drift: dict[str, Any]
    retrain_reason: str | None

    def row(self) -> dict[str, Any]:
        return {
            "ticker": self.ticker,
            "as_of": self.as_of,
            "model_version": self.model_version,
            "live": json.dumps(self.live, sort_keys=True),
            "drift": json.dumps(self.drift, sort_keys=True),
            "retrain_reason": self.retrain_reason,
        }


def monitor(
    settings: Settings,
    histories: dict[str, pd.DataFrame],
    champions: dict[str, tuple[str, date] | None],
    as_of: date,
) -> dict[str, Monitor]:
    """Score what can be scored, then live metrics and drift per ticker; one monitor row each.

    `champions` maps a ticker to its champion's (version, logical date) as of this run, or None.
    Live metrics cover every scored forecast of the ticker (the forecasts users saw, whichever
    version made them) with a bar dated <= as_of.
    """
    score_outcomes(settings, histories, as_of)
    outcomes = read_table(settings, "outcomes")
    outcomes = outcomes.loc[outcomes["target_date"] <= as_of.isoformat()]
    result: dict[str, Monitor] = {}
    for ticker, history in histories.items():
        champion = champions.get(ticker)
        live = live_metrics(outcomes.loc[outcomes["ticker"] == ticker])
        drift = (
            input_drift(history, _train_end(history, champion[1], settings))
            if champion
            else {"tested": False, "reason": "no champion", "drifted": False}
        )
        result[ticker] = Monitor(
            ticker,
            as_of.isoformat(),
            champion[0] if champion else None,
            live,
            drift,
            retrain_reason(live, drift) if champion else None,
        )
    with ledger_errors(settings), engine_for(settings).begin() as connection:
        upsert(connection, "monitor", [m.row() for m in result.values()])
    return result


def _train_end(history: pd.DataFrame, trained_for: date, settings: Settings) -> date:
    """The last bar date of the champion's training block: the first `split[0]` share of the
    bars it was trained on (those dated <= its logical date)."""
    import pandas as pd

    seen = history.loc[history["Date"] <= pd.Timestamp(trained_for)]
    if seen.empty:
        return trained_for
    n_train = max(1, int(len(seen) * settings.model.split[0]))
    return seen["Date"].iloc[n_train - 1].date()


def pending_retrains(
    settings: Settings, tickers: Iterable[str], as_of: date
) -> dict[str, tuple[str, str]]:
    """Tickers whose latest monitor row from before `as_of` asks for a retrain: (reason, the
    date of that row)."""
    from sqlalchemy import func, select

    table = ledger_table("monitor")
    tickers = list(tickers)
    if not tickers:
        return {}
    latest = (
        select(table.c.ticker, func.max(table.c.as_of).label("as_of"))
        .where(table.c.ticker.in_(tickers), table.c.as_of < as_of.isoformat())
        .group_by(table.c.ticker)
        .subquery()
    )
    query = select(table.c.ticker, table.c.retrain_reason, table.c.as_of).join(
        latest, (table.c.ticker == latest.c.ticker) & (table.c.as_of == latest.c.as_of)
    )
    with ledger_errors(settings), engine_for(settings).connect() as connection:
        return {t: (r, day) for t, r, day in connection.execute(query) if r}
