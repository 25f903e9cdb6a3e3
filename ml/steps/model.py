"""Training (one call per ticker that needs it) and promotion (one process walks every new
candidate, so no two tasks of a run race on an alias)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import date
from typing import TYPE_CHECKING, Any

from ml.config import Settings
from ml.steps.common import error_text, instrument_for, raise_if_all_failed
from ml.universe import load_universe

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    pass


def train_step(
    ticker: str, as_of: date, settings: Settings, *, force: bool = False, seed: int | None = None
) -> dict[str, Any]:
    """Train and register a candidate, unless a version already covers exactly these bars.

    Idempotent: a retry after a registered version (or a second run for the same bars) finds it
    by its data and config fingerprints and reports it instead of training again. `seed`
    replaces the config's seed (a retrain the ledger's monitor asked for, see `validate_all`).
    """
    if seed is not None:
        settings = replace(settings, model=replace(settings.model, seed=int(seed)))
    from ml.data.store import PriceStore, data_fingerprint
    from ml.model.training import candidate_summary, train_on_history
    from ml.registry.client import get_client
    from ml.registry.tracking import log_candidate
    from ml.registry.versions import reuse_outcome, ticker_lock

    instrument = instrument_for(ticker, settings)
    store = PriceStore(settings.data_dir)
    history = store.load(instrument, until=as_of)
    if history.empty:
        raise ValueError(f"{ticker}: no published bars up to {as_of}; ingest first")
    data_fp = data_fingerprint(history)
    client = get_client(settings)
    # Check, train and register under the ticker's lock in the registry: a second process on the
    # same ticker (another host or DATA_DIR too) waits, then finds this version and reuses it.
    with ticker_lock(client, instrument, settings):
        if not force:
            existing = reuse_outcome(
                client, instrument, as_of, data_fp, settings.model.fingerprint()
            )
            if existing is not None:
                return existing.to_dict()
        result = train_on_history(ticker, as_of, history, settings.model)
        report = store.report_path(instrument, as_of)
        outcome = log_candidate(result, instrument, settings, validation_report=report)
    out = outcome.to_dict()
    out["candidates"] = candidate_summary(result)
    out["chosen_kind"] = result.forecaster.kind
    return out


def promote_step(
    ticker: str, as_of: date, trained: dict[str, Any], settings: Settings
) -> dict[str, Any]:
    """Run the gate for one ticker's trained version (the CLI's `train`).

    A ticker that was not retrained (no version, or a version from an earlier date whose gate
    already ran) keeps its champion; an earlier version whose gate never ran is decided now.
    """
    from ml.registry.client import get_client
    from ml.registry.promotion import promote_if_better
    from ml.registry.versions import champion_as_of

    instrument = instrument_for(ticker, settings)
    client = get_client(settings)
    version = str(trained["version"]) if trained.get("version") else None
    decided = (
        version is not None
        and trained.get("status") == "skipped"
        and client.get_model_version(instrument.model_name, version).tags.get("gate_status")
    )
    if version is None or decided:
        champion = champion_as_of(client, instrument.model_name, as_of)
        return {
            "ticker": ticker,
            "promoted": False,
            "reason": f"not retrained ({trained.get('reason', 'no new data')}); champion kept",
            "champion_version": champion.version if champion else None,
        }
    return promote_if_better(instrument, as_of, version, settings).to_dict()


def promote_all(
    validated: Mapping[str, Any] | None,
    trained: Iterable[Mapping[str, Any] | None],
    as_of: date,
    settings: Settings,
    *,
    strict: bool = False,
) -> dict[str, Any]:
    """`promote_candidates` of the dicts `validate_all` and `train_step` return (the command
    line's and the tests' form). Returns {"decisions": {ticker: decision}, "failed": {...}}."""
    waiting = {
        ticker: str(summary["version"])
        for ticker, summary in ((validated or {}).get("tickers") or {}).items()
        if summary.get("version") and not summary.get("gate_status")
    }
    new = {o["ticker"]: str(o["version"]) for o in trained or () if o and o.get("version")}
    decisions, failed = promote_candidates(waiting, new, as_of, settings, strict=strict)
    return {"decisions": {t: d.to_dict() for t, d in decisions.items()}, "failed": failed}


def promote_candidates(
    waiting: Mapping[str, str],
    new: Mapping[str, str],
    as_of: date,
    settings: Settings,
    *,
    strict: bool = False,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Apply the gate to every version of this run that has not been through it, one at a time.

    The candidates are the versions this run's training returned (`new`, ticker -> version),
    plus versions that cover a ticker's bars but whose gate never ran (`waiting`: a run that
    died between train and promote): the next run finishes it. Returns (ticker ->
    PromotionDecision, ticker -> error).
    """
    from ml.registry.client import get_client
    from ml.registry.promotion import promote_if_better
    from ml.registry.versions import set_challenger

    universe = load_universe(settings.universe_file)
    candidates = {**waiting, **new}
    unfinished = set(waiting) - set(new)  # left by a run that died after registering them
    decisions: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for ticker in sorted(candidates):
        try:
            instrument = universe.get(ticker)
            if ticker in unfinished:  # that run may have died before moving `challenger`
                set_challenger(get_client(settings), instrument.model_name, candidates[ticker])
            decisions[ticker] = promote_if_better(instrument, as_of, candidates[ticker], settings)
        except Exception as exc:
            failed[ticker] = error_text(exc)
            log.warning("%s: promotion failed: %s", ticker, failed[ticker])
    raise_if_all_failed("promote", len(candidates), failed, strict)
    return decisions, failed
