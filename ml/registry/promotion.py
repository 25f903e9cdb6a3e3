"""The gate applied in the registry: decided once per version, under the ticker's lock; the
`champion` alias moves forward in time only. A ticker whose candidate fails the gate and that
has no champion gets the range-aware naive registered as its champion (`naive`), so every
ticker forecasts, at worst the cheap answer."""

from __future__ import annotations

import json
import logging
from datetime import date
from typing import TYPE_CHECKING

from ml.config import Settings
from ml.registry.client import CHAMPION, get_alias, get_client
from ml.registry.gate import (
    PromotionDecision,
    decide,
    dm_table,
    gate_failures,
    interval_failures,
    interval_summary,
    read_dm,
)
from ml.registry.versions import champion_and_alias, champion_as_of, load_forecaster, ticker_lock
from ml.universe import Instrument

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)


def promote_if_better(
    instrument: Instrument, as_of: date, version: str, settings: Settings
) -> PromotionDecision:
    """Move `champion` to `version` if it passes the gate and beats the champion on its test block.

    A version whose gate already ran reports that decision again ("decided earlier: ...")."""
    client = get_client(settings)
    name = instrument.model_name
    with ticker_lock(client, instrument, settings):
        candidate = client.get_model_version(name, version)
        if candidate.tags.get("gate_status") in ("promoted", "rejected"):
            current = champion_as_of(client, name, as_of)
            return PromotionDecision(
                instrument.ticker,
                version,
                candidate.tags["gate_status"] == "promoted",
                f"decided earlier: {candidate.tags.get('gate_reason', '')}",
                current.version if current else None,
                None,
                None,
            )
        u2 = json.loads(candidate.tags.get("test_u2", "{}"))
        naive_tag = candidate.tags.get("test_dm_range_naive")
        intervals_tag = candidate.tags.get("test_intervals")
        intervals = json.loads(intervals_tag) if intervals_tag else None
        failures = gate_failures(
            u2,
            read_dm(candidate.tags.get("test_dm")),
            settings.gate,
            read_dm(naive_tag) if naive_tag is not None else None,
        ) + interval_failures(intervals, settings.gate)
        # Compare with the champion of this date, not a model trained on later bars (backfills);
        # `holder` (the alias now) decides below whether the alias may move.
        champion, holder = champion_and_alias(client, name, as_of)
        versus = None
        if not failures and champion is not None and champion.version != candidate.version:
            versus = _versus_champion(instrument, as_of, settings, champion, version)
            client.set_model_version_tag(name, version, "gate_dm_vs_champion", dm_table(versus[1]))
        verdict = decide(
            u2,
            failures,
            champion.version if champion else None,
            version,
            versus,
            settings.gate,
            json.loads(candidate.tags.get("test_u2_range_naive", "{}")),
        )
        if versus is not None:  # seconds went by (two models loaded): read the alias again
            holder = get_alias(client, name, CHAMPION)
        champion_version = version if verdict.promoted else (champion.version if champion else None)
        reason = verdict.reason
        if intervals and not any(f.startswith("Close 90 %") for f in failures):
            reason += "; " + interval_summary(intervals)
        fallback = not verdict.promoted and champion is None and holder is None
        if fallback:
            # Registered before the candidate's decision is recorded: a try killed in between
            # leaves the candidate undecided, and the next one finds this champion.
            champion_version = _naive_champion(instrument, as_of, settings, client)
            reason += (
                f"; no champion yet: the range-aware naive is the champion (v{champion_version})"
            )
        elif not verdict.promoted and champion is not None:
            reason += f"; champion v{champion.version} kept"
        _record(client, name, version, as_of, holder, verdict.promoted, reason)
        return PromotionDecision(
            instrument.ticker,
            version,
            verdict.promoted,
            reason,
            champion_version,
            verdict.candidate_score,
            verdict.champion_score,
            fallback,
        )


def _naive_champion(
    instrument: Instrument, as_of: date, settings: Settings, client: MlflowClient
) -> str:
    """Register the range-aware naive (`ml.model.training.naive_result`, bars <= as_of) as the
    ticker's champion and return its version. It passes no gate (it is the baseline the gate
    measures against); its tags say why it is there. Called under the ticker's lock."""
    from ml.data.store import PriceStore
    from ml.model.training import naive_result
    from ml.registry.tracking import log_candidate

    history = PriceStore(settings.data_dir).load(instrument, until=as_of)
    result = naive_result(instrument.ticker, as_of, history, settings.model)
    outcome = log_candidate(result, instrument, settings, alias=None)
    reason = "fallback: no candidate passed the gate and the ticker had no champion"
    _record(client, instrument.model_name, str(outcome.version), as_of, None, True, reason)
    return str(outcome.version)


def _versus_champion(
    instrument: Instrument, as_of: date, settings: Settings, champion: ModelVersion, version: str
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The champion's U2 on the candidate's test block (bars <= as_of) and the Diebold-Mariano
    test of the candidate against it (`ml.registry.gate.versus_champion`)."""
    from ml.data.store import PriceStore
    from ml.model.windows import prepare
    from ml.registry.gate import versus_champion

    history = PriceStore(settings.data_dir).load(instrument, until=as_of)
    model = settings.model
    split = prepare(history, model.window, model.split, model.naive_lookback)
    theirs = load_forecaster(instrument, settings, version=champion.version)
    ours = load_forecaster(instrument, settings, version=version)
    if theirs is None or ours is None:
        raise LookupError(
            f"{instrument.model_name}: version {champion.version if theirs is None else version} "
            "could not be loaded from the registry"
        )
    return versus_champion(ours[0], theirs[0], history, split.test)


def _record(
    client: MlflowClient,
    name: str,
    version: str,
    as_of: date,
    holder: ModelVersion | None,
    promoted: bool,
    reason: str,
) -> None:
    """Move `champion` (forward in time only) and tag the decision on the version. `holder` is
    the version the alias points at, read a moment ago under the ticker's lock, still held.

    A backfilled date's winner is recorded as promoted (it is the champion as of its date) but
    does not displace the champion of a later date."""
    if promoted and (holder is None or holder.tags.get("logical_date", "") <= as_of.isoformat()):
        client.set_registered_model_alias(name, CHAMPION, version)
    status = "promoted" if promoted else "rejected"
    client.set_model_version_tag(name, version, "gate_status", status)
    client.set_model_version_tag(name, version, "gate_reason", reason)
    client.set_model_version_tag(
        name, version, "validation_status", "passed" if promoted else "failed"
    )
    client.set_model_version_tag(name, version, "validation_reason", reason)
