"""The promotion gate as pure functions of metrics and predictions: no MLflow call here.

A candidate passes against the baselines when High and Low have U2 below their caps and are
significantly better than persistence (Diebold-Mariano), neither is significantly worse than the
range-aware naive, Close is not significantly worse than persistence, and its quantiles hold:
Close's 90 % interval covers the test block's bars within the binomial 99 % band of 0.90 for the
block's size, with an interval score not significantly worse than historical simulation's
(`interval_failures`); it replaces the
champion when it is not significantly worse on any target on the same test block and its mean U2
is lower by at least `min_improvement` (docs/evaluation.md, "The gate").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ml.config import GateConfig
from ml.model.features import JUDGED_TARGETS, TARGETS

if TYPE_CHECKING:
    from ml.model.forecaster import PriceForecaster


@dataclass(frozen=True)
class PromotionDecision:
    ticker: str
    version: str
    promoted: bool
    reason: str
    champion_version: str | None
    candidate_score: float | None
    champion_score: float | None
    # The range-aware naive was registered as the ticker's first champion in this decision
    # (the candidate failed and there was none): `champion_version` is the naive's.
    fallback: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate_failures(
    u2: dict[str, float],
    dm: dict[str, dict[str, float]],
    gate: GateConfig,
    dm_range_naive: dict[str, dict[str, float]] | None = None,
) -> list[str]:
    """Reasons the candidate fails the gate against the baselines (empty when it passes).

    `u2` is the test-block U2 per target, `dm` the Diebold-Mariano test per target against
    persistence ({"stat", "p_worse", "p_better"}, `ml.model.evaluation.diebold_mariano`). High and Low
    must have U2 below their caps and be significantly better (p_better < p_value); Close must
    not be significantly worse (p_worse < p_value fails; a Close equal to persistence has no
    test, NaN, and passes). Missing or NaN values fail closed.

    `dm_range_naive` is the same test of High and Low against the range-aware naive: either one
    significantly worse (p_worse < p_value) fails; equal to the naive (NaN) passes. None: a
    version registered before that test existed (its tag is absent), judged without it.
    """
    import math

    nan = float("nan")
    failures = []
    for target, limit in (("High", gate.u2_high_max), ("Low", gate.u2_low_max)):
        value = u2.get(target, nan)
        if math.isnan(value) or not value < limit:
            failures.append(f"U2 {target} {value:.4f} not < {limit}")
        p_better = (dm.get(target) or {}).get("p_better", nan)
        if not p_better < gate.p_value:
            failures.append(
                f"{target} not significantly better than persistence "
                f"(Diebold-Mariano p {p_better:.3g} not < {gate.p_value})"
            )
    for target in ("High", "Low") if dm_range_naive is not None else ():
        p_worse = (dm_range_naive.get(target) or {}).get("p_worse", nan)
        if p_worse < gate.p_value:
            failures.append(
                f"{target} significantly worse than the range-aware naive "
                f"(Diebold-Mariano p {p_worse:.3g} < {gate.p_value})"
            )
    if math.isnan(u2.get("Close", nan)):
        failures.append("U2 Close missing")
    p_worse = (dm.get("Close") or {}).get("p_worse", nan)
    if p_worse < gate.p_value:
        failures.append(
            f"Close significantly worse than persistence "
            f"(Diebold-Mariano p {p_worse:.3g} < {gate.p_value}, U2 {u2.get('Close', nan):.4f})"
        )
    return failures


def interval_failures(intervals: dict[str, Any] | None, gate: GateConfig) -> list[str]:
    """Reasons the candidate's quantiles fail the gate, from its `test_intervals` tag
    (`ml.model.probabilistic.IntervalReport.to_tag`). None: a version registered before
    quantiles existed (no tag), judged without them. Missing figures fail closed."""
    if intervals is None:
        return []
    nan = float("nan")
    low, high = (v if v is not None else nan for v in intervals.get("band") or (None, None))
    coverage = (intervals.get("coverage") or {}).get("close_90")
    coverage = nan if coverage is None else coverage
    failures = []
    if not low <= coverage <= high:
        failures.append(
            f"Close 90 % interval coverage {coverage:.3f} on {intervals.get('n')} bars outside "
            f"its binomial 99 % band {low:.3f}-{high:.3f}"
        )
    p_worse = (intervals.get("dm_historical") or {}).get("p_worse")
    ratio = intervals.get("interval_score_close_90_vs_historical")
    if p_worse is not None and p_worse < gate.p_value:
        failures.append(
            f"Close 90 % interval score significantly worse than historical simulation "
            f"(ratio {ratio if ratio is not None else nan:.3f}, Diebold-Mariano p "
            f"{p_worse:.3g} < {gate.p_value})"
        )
    return failures


def interval_summary(intervals: dict[str, Any] | None) -> str:
    """The figures the interval questions read, for a decision's reason ('' without them)."""
    if not intervals:
        return ""

    def text(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    coverage = (intervals.get("coverage") or {}).get("close_90")
    band = intervals.get("band") or (None, None)
    return (
        f"Close 90 % coverage {text(coverage)} (band {text(band[0])}-{text(band[1])}), "
        f"interval score vs historical simulation "
        f"{text(intervals.get('interval_score_close_90_vs_historical'))}"
    )


def dm_table(dm: dict[str, dict[str, float]]) -> str:
    """The Diebold-Mariano statistics as a tag value (JSON, NaN as null)."""
    import math

    return json.dumps(
        {
            t: {k: (round(v, 6) if math.isfinite(v) else None) for k, v in stats.items()}
            for t, stats in dm.items()
        },
        sort_keys=True,
    )


def read_dm(tag: str | None) -> dict[str, dict[str, float]]:
    return {
        t: {k: (float("nan") if v is None else float(v)) for k, v in stats.items()}
        for t, stats in json.loads(tag or "{}").items()
    }


def score(u2: dict[str, float]) -> float:
    """One number to compare two models on the same block: the mean U2 over High, Low, Close."""
    return sum(u2[t] for t in JUDGED_TARGETS) / len(JUDGED_TARGETS)


def block_predictions(forecaster: PriceForecaster, history: Any, test: Any) -> Any:
    """(n, 4) predictions of `forecaster` for the test windows `test` of `history`."""
    import numpy as np

    frame = forecaster.predict_frame(history)
    by_end = dict(zip(frame["Date"].to_numpy(), frame[list(TARGETS)].to_numpy(), strict=True))
    dates = history["Date"].to_numpy()
    idx = np.searchsorted(dates, test.target_dates) - 1
    return np.stack([by_end[dates[i]] for i in idx])


def rescore_u2(forecaster: PriceForecaster, history: Any, test: Any) -> dict[str, float]:
    """U2 against persistence of `forecaster` on the test windows `test` of `history`."""
    from ml.model.evaluation import persistence_forecast, theil_u2

    predicted = block_predictions(forecaster, history, test)
    reference = persistence_forecast(test.last_close, test.last_adj_close)
    values = theil_u2(test.actual, predicted, reference)
    return {t: float(v) for t, v in zip(TARGETS, values, strict=True)}


def versus_champion(
    candidate: PriceForecaster, champion: PriceForecaster, history: Any, test: Any
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The champion's U2 against persistence on the candidate's test block, and the
    Diebold-Mariano test of the candidate against the champion per High/Low/Close."""
    from ml.model.evaluation import diebold_mariano, persistence_forecast, theil_u2

    ours = block_predictions(candidate, history, test)
    theirs = block_predictions(champion, history, test)
    reference = persistence_forecast(test.last_close, test.last_adj_close)
    u2 = {
        t: float(v) for t, v in zip(TARGETS, theil_u2(test.actual, theirs, reference), strict=True)
    }
    dm = {
        t: diebold_mariano(ours[:, j] - test.actual[:, j], theirs[:, j] - test.actual[:, j])
        for j, t in enumerate(TARGETS)
        if t in JUDGED_TARGETS
    }
    return u2, dm


@dataclass(frozen=True)
class Verdict:
    promoted: bool
    reason: str
    candidate_score: float | None
    champion_score: float | None


def decide(
    u2: dict[str, float],
    failures: list[str],
    champion_version: str | None,
    version: str,
    versus: tuple[dict[str, float], dict[str, dict[str, float]]] | None,
    gate: GateConfig,
    u2_range_naive: dict[str, float] | None = None,
) -> Verdict:
    """The decision on a candidate with test-block `u2` and gate `failures` against persistence.

    `versus` is (the champion's U2, the Diebold-Mariano test of the candidate against the
    champion) on the candidate's test block, when there is another champion to beat."""
    cand_score = score(u2) if all(t in u2 for t in JUDGED_TARGETS) else None
    champ_score = score(versus[0]) if versus is not None else None
    if failures:
        promoted, reason = False, "fails the gate against the baselines: " + "; ".join(failures)
    elif champion_version is None:
        promoted, reason = True, "first champion: beats persistence"
    elif champion_version == version:
        promoted, reason = True, "already champion"
    elif versus is None or cand_score is None or champ_score is None:
        raise ValueError(f"version {version}: no comparison with champion v{champion_version}")
    else:
        worse = [
            f"{t} (Diebold-Mariano p {versus[1][t]['p_worse']:.3g})"
            for t in JUDGED_TARGETS
            if versus[1][t]["p_worse"] < gate.p_value
        ]
        if worse:
            promoted = False
            reason = (
                f"significantly worse than champion v{champion_version} on the same test "
                f"block: {', '.join(worse)}"
            )
        elif cand_score < champ_score - gate.min_improvement:
            promoted = True
            reason = (
                f"beats persistence and champion v{champion_version} "
                f"(mean U2 {cand_score:.4f} < {champ_score:.4f})"
            )
        else:
            promoted = False
            reason = (
                f"does not beat champion v{champion_version} on the same test block "
                f"(mean U2 {cand_score:.4f} >= {champ_score:.4f})"
            )
    if u2_range_naive:  # shown beside the gate; High/Low already fall back to it where better
        reason += "; U2 vs range-aware naive " + ", ".join(
            f"{t} {u2_range_naive[t]:.4f}" for t in ("High", "Low") if t in u2_range_naive
        )
    return Verdict(promoted, reason, cand_score, champ_score)
