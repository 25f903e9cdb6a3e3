"""What a ticker's registered versions say: one trained on these bars and config (reuse it), the
champion as of a date (point in time), the `challenger` alias; loading a version's forecaster."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.config import Settings
from ml.registry.client import (
    CHALLENGER,
    CHAMPION,
    find_versions,
    get_alias,
    get_client,
    newest_versions,
    registered_models,
)
from ml.universe import MODEL_NAME_PREFIX, Instrument

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from ml.model.forecaster import PriceForecaster

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingOutcome:
    """What `train` reports: a new version, a reused one, or a skip because data did not change."""

    ticker: str
    logical_date: str
    status: str  # "trained" | "reused" | "skipped"
    version: str | None
    run_id: str | None
    reason: str
    metrics: dict[str, float]
    # Test-block U2 against the range-aware naive (High, Low), the strong baseline.
    metrics_range_naive: dict[str, float] = field(default_factory=dict)
    # The quantiles' test-block figures (`ml.model.probabilistic.IntervalReport.to_tag`): coverage,
    # its binomial band, interval score and tail pinball vs historical simulation; {} without.
    intervals: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def trained_version(
    client: MlflowClient, instrument: Instrument, data_fp: str, config_fp: str
) -> ModelVersion | None:
    """The newest version trained on exactly these bars (data fingerprint) and config, if any."""
    matches = find_versions(
        client, instrument.model_name, data_fingerprint=data_fp, config_fingerprint=config_fp
    )
    return matches[0] if matches else None


# Model names per batch search: the filter travels in a GET request's URL.
BATCH_NAMES = 50


def _newest_in_batches(
    client: MlflowClient, names: Sequence[str], **tags: str
) -> Iterator[tuple[list[str], list[ModelVersion], bool]]:
    """`newest_versions` of `names` with `tags`, one request per `BATCH_NAMES` of them, each
    asking for twice as many versions as models and a few more: (the models asked, their
    versions newest first, whether those are all there are)."""
    for start in range(0, len(names), BATCH_NAMES):
        chunk = list(names[start : start + BATCH_NAMES])
        batch, complete = newest_versions(client, chunk, 2 * len(chunk) + 8, **tags)
        yield chunk, batch, complete


def trained_versions(
    client: MlflowClient, wanted: Mapping[str, str], config_fp: str
) -> tuple[dict[str, ModelVersion | None], list[str]]:
    """`trained_version` for many models at once: `wanted` maps a model name to the data
    fingerprint of its bars. One request per `BATCH_NAMES` models, for the newest versions of
    all of them trained on this config; returns (what it settled: model -> the newest version on
    those bars, or None when there is none), and the models it could not settle (the answer was
    cut before reaching any of their versions on those bars: ask them one at a time)."""
    names = sorted(wanted)
    settled: dict[str, ModelVersion | None] = {}
    rest: list[str] = []
    for chunk, batch, complete in _newest_in_batches(client, names, config_fingerprint=config_fp):
        for version in batch:  # newest first
            if version.tags.get("data_fingerprint") == wanted.get(version.name):
                settled.setdefault(version.name, version)
        missing = [name for name in chunk if name not in settled]
        if complete:
            settled.update(dict.fromkeys(missing))
        else:
            rest += missing
    return settled, rest


def outcome_of(instrument: Instrument, as_of: date, version: ModelVersion) -> TrainingOutcome:
    """What `train` reports for `as_of` when `version` already covers its bars: reused (trained
    for this very date) or skipped (trained for an earlier date; no new bars since)."""
    same_day = version.tags.get("logical_date") == as_of.isoformat()
    metrics, metrics_range_naive, intervals = version_figures(version)
    reason = (
        f"version {version.version} was already trained for {as_of} on the same data and config"
        if same_day
        else f"no new bars since version {version.version} ({version.tags.get('logical_date')})"
    )
    return TrainingOutcome(
        instrument.ticker,
        as_of.isoformat(),
        "reused" if same_day else "skipped",
        version.version,
        version.run_id,
        reason,
        metrics,
        metrics_range_naive,
        intervals,
    )


def version_figures(
    version: ModelVersion,
) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    """The version's test-block figures from its tags: U2 against persistence, U2 against the
    range-aware naive, and the quantiles' figures ({} for a version registered before them)."""
    tags = version.tags
    return (
        json.loads(tags.get("test_u2", "{}")),
        json.loads(tags.get("test_u2_range_naive", "{}")),
        json.loads(tags.get("test_intervals") or "{}"),
    )


def reuse_outcome(
    client: MlflowClient, instrument: Instrument, as_of: date, data_fp: str, config_fp: str
) -> TrainingOutcome | None:
    """A version trained on exactly these bars and config, if one exists (no retrain needed).

    A version trained for this very date is the newest candidate: `challenger` is moved onto it
    if a try killed between registering it and moving the alias left the alias behind."""
    version = trained_version(client, instrument, data_fp, config_fp)
    if version is None:
        return None
    outcome = outcome_of(instrument, as_of, version)
    if outcome.status == "reused":
        set_challenger(client, instrument.model_name, str(version.version))
    return outcome


def drop_duplicate_versions(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    """Keep the first version registered from `run_id`, delete any other.

    The MLflow client retries a request whose answer was lost, POSTs included: a server that
    restarted while creating a version can have created it twice. Returns the version kept."""
    versions = sorted(find_versions(client, name, run_id=run_id), key=lambda v: int(v.version))
    for extra in versions[1:]:
        log.warning(
            "%s: deleting version %s, a duplicate of %s", name, extra.version, versions[0].version
        )
        client.delete_model_version(name, extra.version)
    return versions[0] if versions else None


def set_challenger(client: MlflowClient, name: str, version: str) -> None:
    """Point `challenger` at `version` unless it already points at it or at a newer version (a
    retry that reuses a version registered by a try killed before it moved the alias)."""
    holder = get_alias(client, name, CHALLENGER)
    if holder is None or int(holder.version) < int(version):
        client.set_registered_model_alias(name, CHALLENGER, version)


def ticker_lock(client: MlflowClient, instrument: Instrument, settings: Settings):
    """The ticker's lock in the registry (ml.registry.lock): one process at a time trains,
    registers or promotes it, whatever its host or DATA_DIR."""
    from ml.registry.lock import registry_lock

    return registry_lock(
        client,
        instrument.model_name,
        ttl=settings.registry_lock_ttl,
        timeout=settings.registry_lock_timeout,
    )


def champion_as_of(client: MlflowClient, name: str, as_of: date) -> ModelVersion | None:
    """The champion a run for `as_of` must use: point in time, whatever order runs happen in.

    The `champion` alias when its version was trained for a date <= as_of (a live run, or an
    alias a user moved back by hand); otherwise, for a backfill or re-run of an earlier date, the
    newest version promoted for a date <= as_of. A model trained on later bars is never used.
    """
    return champion_and_alias(client, name, as_of)[0]


def champion_and_alias(
    client: MlflowClient, name: str, as_of: date
) -> tuple[ModelVersion | None, ModelVersion | None]:
    """(`champion_as_of`, the version the `champion` alias points at now), from one alias read."""
    day = as_of.isoformat()
    current = get_alias(client, name, CHAMPION)
    if current is not None and current.tags.get("logical_date", "") <= day:
        return current, current
    promoted = [
        v
        for v in find_versions(client, name, gate_status="promoted")
        if v.tags.get("logical_date", "") <= day
    ]
    best = max(
        promoted, key=lambda v: (v.tags.get("logical_date", ""), int(v.version)), default=None
    )
    return best, current


def champions_as_of(
    client: MlflowClient, names: Sequence[str], as_of: date
) -> dict[str, tuple[ModelVersion | None, ModelVersion | None]]:
    """`champion_and_alias` for many models, in one request for all of them where it can: the
    registered models (their aliases and latest versions). The champions that are not their
    model's latest version (a later candidate lost the gate) are looked for among the newest
    promoted versions of those models, one request per `BATCH_NAMES` of them; one not found
    there (an alias moved by hand to an older version) costs one read of that version. A model
    without a `champion` alias, or whose champion was trained for a date after `as_of` (a
    backfill), costs the per-model search."""
    day = as_of.isoformat()
    models = registered_models(client, MODEL_NAME_PREFIX)
    numbers: dict[str, str] = {}
    current: dict[str, ModelVersion] = {}
    for name in names:
        model = models.get(name)
        number = (model.aliases or {}).get(CHAMPION) if model is not None else None
        if number is None:
            continue
        numbers[name] = str(number)
        latest = {str(v.version): v for v in model.latest_versions or ()}
        if str(number) in latest:
            current[name] = latest[str(number)]
    older = sorted(n for n in numbers if n not in current)
    for _, promoted, _ in _newest_in_batches(client, older, gate_status="promoted"):
        for version in promoted:
            if numbers[version.name] == str(version.version):
                current.setdefault(version.name, version)
    out: dict[str, tuple[ModelVersion | None, ModelVersion | None]] = {}
    for name in names:
        if name not in numbers:
            out[name] = champion_and_alias(client, name, as_of)
            continue
        version = current.get(name) or client.get_model_version(name, numbers[name])
        if version.tags.get("logical_date", "") <= day:
            out[name] = (version, version)
        else:
            out[name] = champion_and_alias(client, name, as_of)
    return out


def load_forecaster(
    instrument: Instrument,
    settings: Settings,
    alias: str = CHAMPION,
    version: str | None = None,
    as_of: date | None = None,
) -> tuple[PriceForecaster, str] | None:
    """Load a version through the registry: `version`, else the champion as of `as_of`, else
    `models:/<name>@<alias>`; None if there is none.

    Only the network and its preprocessing are fetched (`models:/<name>/<version>/artifacts/...`),
    the same files the pyfunc wrapper loads; `mlflow.pyfunc.load_model` would also download the
    code snapshot and check the installed packages, about 0.4 s more per model.
    """
    import tempfile

    from ml.model.forecaster import PriceForecaster
    from ml.model.networks import configure_tensorflow

    client = get_client(settings)
    if version is None:
        if as_of is not None and alias == CHAMPION:
            mv = champion_as_of(client, instrument.model_name, as_of)
        else:
            mv = get_alias(client, instrument.model_name, alias)
        if mv is None:
            return None
        version = mv.version
    configure_tensorflow()
    with tempfile.TemporaryDirectory(prefix="champion-") as tmp:
        files = download_forecaster(instrument, settings, str(version), Path(tmp))
        return PriceForecaster.load(*files), str(version)


def download_forecaster(
    instrument: Instrument, settings: Settings, version: str, dest: Path
) -> tuple[str | None, str]:
    """Download a version's preprocessing file and, for a network, its Keras file into `dest`
    (its own folder per version there); returns their paths (None: no network), for
    `PriceForecaster.load`. Only HTTP: safe to run a few at a time in threads (the batch
    forecast does), unlike loading the Keras models."""
    import mlflow

    from ml.config import NETWORK_KINDS
    from ml.model.forecaster import KERAS_FILE, PREPROCESSING_FILE

    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    folder = dest / f"{instrument.slug}-v{version}"
    folder.mkdir(parents=True, exist_ok=True)

    def download(name: str) -> str:
        return mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{instrument.model_name}/{version}/artifacts/{name}",
            dst_path=str(folder),
            tracking_uri=settings.mlflow_tracking_uri,
        )

    prep_path = download(PREPROCESSING_FILE)
    kind = json.loads(Path(prep_path).read_text())["kind"]
    keras_path = download(KERAS_FILE) if kind in NETWORK_KINDS else None
    return keras_path, prep_path
