"""Settings for the whole project, read from environment variables.

Everything configurable lives here, with defaults that run offline on one machine. Importing this
module only defines things: call `get_settings()` to read the environment.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, date, datetime
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PRICE_SOURCES = ("yahoo", "synthetic", "files")
# The candidates a ticker's training may fit: the recurrent networks (ml.model.networks) and the
# statistical forecasters (ml.model.statistical); the one with the best validation score wins.
NETWORK_KINDS = ("lstm", "gru")
STATISTICAL_KINDS = ("har", "gbm")
MODEL_KINDS = NETWORK_KINDS + STATISTICAL_KINDS
# The range-aware naive as a registered model: never a candidate, the champion of a ticker whose
# candidates all fail the gate and that has no champion yet (ml.registry.promotion).
NAIVE_KIND = "naive"
# The kinds trained by default: those that earn their place on the real-data report (REALDATA.md).
# The networks do not: selected by validation beside `har`, they win near-ties that they then
# lose on the test blocks (commit message and BENCHMARKS.md have the figures).
DEFAULT_KINDS = ("har",)
# A date as the help, the DAG's form and the dashboard write it: exactly YYYY-MM-DD in ASCII
# digits. `date.fromisoformat` alone also takes 20240628 and 2024-W26-5 (Python 3.11+).
DATE_PATTERN = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
# The characters of a user's value (a ticker, a date, a file's column name) a message echoes:
# enough to recognize it, never a whole pasted document in a log line or a run report.
ECHO_LIMIT = 40
# Airflow's `[core] max_map_length`, as every launcher and docker-compose.yaml set it: `train`
# maps one instance per ticker that needs training, and Airflow fails the task that pushes a
# longer list (its default, 1024, is below an S&P 1500 or a Russell 3000 universe). The DAG's
# resolve_tickers refuses a universe over the configured value before any work.
AIRFLOW_MAX_MAP_LENGTH = 10_000


# The registry lock (`ml.registry.lock`): a holder refreshes its heartbeat this many times per
# ttl, so a waiter breaks a live holder's lock only after that many beats in a row failed to land.
HEARTBEATS_PER_TTL = 4
# The smallest ttl REGISTRY_LOCK_TTL may set. Each beat is a request to the tracking server: tens
# of milliseconds when it is idle, seconds when every train task logs at once, and a refused
# connection is retried after 0 then 4 s (MLflow's backoff). Under 30 s a beat every quarter ttl
# (7.5 s) no longer outlasts one slow, retried request, and a waiter breaks the lock of a holder
# still at work: the two then train and register the same bars twice.
MIN_TTL = 30.0


def min_ttl(outage: float) -> float:
    """The floor of the lock's ttl when the pipeline rides out MLflow outages of up to `outage`
    seconds (MLFLOW_UNREACHABLE_TIMEOUT): MIN_TTL, and more than `outage` plus one beat interval.
    While the server is away no heartbeat lands; a waiter that rides out the same outage then
    reads a heartbeat that old, and must still find it younger than the ttl."""
    return max(MIN_TTL, outage * HEARTBEATS_PER_TTL / (HEARTBEATS_PER_TTL - 1))


class ConfigError(ValueError):
    """A setting has a value the pipeline cannot use."""


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters that define a trained model (part of the config fingerprint)."""

    window: int = 6
    kinds: tuple[str, ...] = DEFAULT_KINDS
    units: int = 64
    dense_units: int = 8
    # 256 windows per batch at Adam 3e-3: the larger batch makes the fits several times faster,
    # and the higher rate keeps the test skill where the smaller batch had it
    # (bench/training_speed.py; the figures: BENCHMARKS.md, "History").
    learning_rate: float = 3e-3
    batch_size: int = 256
    max_epochs: int = 40
    # Early stopping after 2 epochs without a better validation loss: waiting longer did not
    # improve the test skill, on synthetic or real bars, and cost time in every fit
    # (bench/training_speed.py --set patience=..., bench/realdata.py; the figures:
    # BENCHMARKS.md, "History").
    patience: int = 2
    split: tuple[float, float, float] = (0.7, 0.2, 0.1)
    seed: int = 42
    naive_lookback: int = 20
    # Volatility's memory as extra inputs per bar (ml.model.features.add_memory_features): mean log
    # range over 1, 5, 22 and 66 bars and realized volatility over 5, 22 and 66; () = the
    # notebook's 8 inputs only.
    vol_horizons: tuple[int, ...] = (1, 5, 22, 66)
    # What High and Low fall back to where the network shows no skill on validation:
    # "range_naive" (the strong baseline) or "persistence". Close always falls back to
    # persistence.
    hl_baseline: str = "range_naive"

    def anchors(self) -> tuple[str, str, str, str]:
        """The baseline of each target (High, Low, Close, Adj Close) for the skill weights."""
        return (self.hl_baseline, self.hl_baseline, "persistence", "persistence")

    def fingerprint(self) -> str:
        """A short, stable hash of the config: equal configs give equal models."""
        payload = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class GateConfig:
    """The promotion gate (docs/evaluation.md, "The gate"): one-sided Diebold-Mariano tests on
    the test block's squared-error differentials at level `p_value`, plus U2 caps on High and
    Low."""

    u2_high_max: float = 1.0
    u2_low_max: float = 1.0
    # High and Low must be significantly better than persistence (DM p < p_value); Close and
    # every target against the champion must not be significantly worse.
    p_value: float = 0.05
    # A candidate must beat the champion's mean U2 by more than this (numerical noise, not skill).
    min_improvement: float = 1e-4


@dataclass(frozen=True)
class Settings:
    price_source: str = "synthetic"
    price_files_dir: Path | None = None
    # The largest price file the files source reads (bytes): a daily history of decades is a few
    # MB, so anything near this bound is not one ticker's bars, and it is refused before parsing.
    price_file_max_bytes: int = 64 * 1024 * 1024
    data_dir: Path = PROJECT_ROOT / ".state" / "data"
    mlflow_tracking_uri: str = "http://127.0.0.1:5000"
    # How long a step waits for an MLflow tracking server that does not answer before it fails
    # naming the server (`ml.registry.client.get_client`): a restart shorter than this is ridden
    # out; a server that stays away fails the step, and the DAG's task retries run it again.
    mlflow_unreachable_timeout: float = 60.0
    # The forecast ledger's database (ml.forecasts.ledger); None = SQLite at DATA_DIR/ledger.db.
    ledger_url: str | None = None
    experiment_name: str = "price-forecast"
    universe_file: Path = PROJECT_ROOT / "universe.csv"
    history_start: date = date(2015, 1, 2)
    trailing_days: int = 10
    yahoo_max_retries: int = 5
    yahoo_backoff_seconds: float = 2.0
    # Downloads in flight at once inside the ingest task (Yahoo rate-limits bursts).
    fetch_concurrency: int = 4
    # The per-ticker lock in the MLflow registry (ml.registry.lock): a holder whose heartbeat is
    # older than the ttl is gone (the ttl has a floor: `ml.registry.lock.min_ttl`); a waiter
    # gives up after the timeout.
    registry_lock_ttl: float = 120.0
    registry_lock_timeout: float = 3600.0
    model: ModelConfig = field(default_factory=ModelConfig)
    gate: GateConfig = field(default_factory=GateConfig)


def excerpt(value: object, limit: int = ECHO_LIMIT) -> str:
    """`value` as a message may echo it: its repr, and for a longer text only the first `limit`
    characters, an ellipsis and the length, so that a pasted document stays out of the logs.

    The repr escapes control characters (a newline cannot split the message's line)."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value):,} characters)"
    text = repr(value)
    return text if len(text) <= limit + 2 else f"{text[:limit]}... ({len(text):,} characters)"


def parse_day(text: object) -> date:
    """The date written in `text`, strictly YYYY-MM-DD; ConfigError for anything else.

    `20240628`, `2024-W26-5` and `2024-6-28` are refused although `date.fromisoformat` reads the
    first two: every form that takes a date says YYYY-MM-DD, and one spelling keeps the report
    file names, the forecasts table and the URLs in step."""
    if isinstance(text, str) and DATE_PATTERN.fullmatch(text):
        try:
            return date.fromisoformat(text)
        except ValueError as exc:  # 2024-02-30, 2024-13-01
            raise ConfigError(f"not a date (YYYY-MM-DD): {excerpt(text)} ({exc})") from None
    raise ConfigError(f"not a date (YYYY-MM-DD): {excerpt(text)}")


def utc_today() -> date:
    """Today's date in UTC, the clock of the DAG's schedule: the latest date a user may ask for."""
    return datetime.now(UTC).date()


def check_as_of(day: date, history_start: date, today: date | None = None) -> date:
    """`day` if the pipeline can process it, else ConfigError: a day after `today` (default: UTC
    today) has no bars yet (the synthetic source would make them up), and a day before
    `history_start` has none to load.

    For dates a user types or pins (the CLI's --date, the DAG's `as_of`, the dashboard's
    `?date=`); a scheduled run's own logical date is not checked."""
    today = utc_today() if today is None else today
    if day > today:
        raise ConfigError(
            f"invalid date {day.isoformat()}: after today ({today.isoformat()}, UTC); "
            "the pipeline processes days that have happened"
        )
    if day < history_start:
        raise ConfigError(
            f"invalid date {day.isoformat()}: before HISTORY_START "
            f"({history_start.isoformat()}), where the bars begin; pick a later date or set "
            "HISTORY_START earlier"
        )
    return day


def parse_as_of(text: object, history_start: date, today: date | None = None) -> date:
    """`parse_day` then `check_as_of`: a typed date the pipeline can process, or ConfigError."""
    return check_as_of(parse_day(text), history_start, today)


def _parse_date(name: str, raw: str) -> date:
    try:
        return parse_day(raw)
    except ConfigError as exc:
        raise ConfigError(f"{name}={excerpt(raw)} is not a date (YYYY-MM-DD)") from exc


def _parse_number(name: str, raw: str, kind: type, *, allow_zero: bool = False) -> int | float:
    try:
        value = kind(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from exc
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(
            f"{name}={raw!r} must be a finite {'non-negative' if allow_zero else 'positive'} number"
        )
    return value


def _parse_kinds(raw: str) -> tuple[str, ...]:
    kinds = tuple(k.strip().lower() for k in raw.split(",") if k.strip())
    unknown = [k for k in kinds if k not in MODEL_KINDS]
    if not kinds or unknown:
        raise ConfigError(f"MODEL_KINDS={raw!r}: choose from {', '.join(MODEL_KINDS)}")
    return kinds


HL_BASELINES = ("range_naive", "persistence")


def _parse_horizons(raw: str) -> tuple[int, ...]:
    """MODEL_VOL_HORIZONS: comma-separated bar counts, e.g. "1,5,22,66"; empty or "none" = off."""
    if raw.strip().lower() in ("", "none"):
        return ()
    try:
        horizons = tuple(int(part) for part in raw.split(","))
    except ValueError as exc:
        raise ConfigError(
            f"MODEL_VOL_HORIZONS={raw!r}: expected bar counts such as 1,5,22,66"
        ) from exc
    if any(k < 1 for k in horizons) or len(set(horizons)) != len(horizons):
        raise ConfigError(f"MODEL_VOL_HORIZONS={raw!r}: distinct positive bar counts only")
    return tuple(sorted(horizons))


# The databases the ledger's upsert speaks (`ml.forecasts.ledger.upsert`).
LEDGER_BACKENDS = ("sqlite", "postgresql")


def redact_url(raw: str) -> str:
    """`raw` with the password of a `scheme://user:password@host` URL replaced by ***, for
    messages (also when the URL does not parse)."""
    import re

    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", raw)


def _parse_ledger_url(raw: str) -> str:
    """LEDGER_DB_URL: an SQLAlchemy URL of an SQLite or PostgreSQL database, checked here so that
    a typo ends the command before any work (the folder and the server are checked on first use,
    `ml.forecasts.ledger.engine_for`)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    shown = redact_url(raw)
    example = "e.g. sqlite:////srv/data/ledger.db or postgresql+psycopg2://user@host:5432/ledger"
    try:
        url = make_url(raw.strip())
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(
            f"LEDGER_DB_URL={shown!r} is not a database URL ({exc}): {example}"
        ) from None
    if url.get_backend_name() not in LEDGER_BACKENDS:
        raise ConfigError(
            f"LEDGER_DB_URL={shown!r}: the ledger runs on {' or '.join(LEDGER_BACKENDS)}, not "
            f"{url.get_backend_name()!r} ({example})"
        )
    try:
        url.get_dialect()  # the driver's name (postgresql+psycopg2); the driver is not imported
    except NoSuchModuleError:
        raise ConfigError(
            f"LEDGER_DB_URL={shown!r}: SQLAlchemy knows no driver {url.drivername!r} ({example})"
        ) from None
    return raw.strip()


def _parse_choice(name: str, raw: str, choices: tuple[str, ...]) -> str:
    value = raw.strip().lower()
    if value not in choices:
        raise ConfigError(f"{name}={raw!r}: choose from {', '.join(choices)}")
    return value


_MODEL_ENV = {
    "window": ("MODEL_WINDOW", int),
    "units": ("MODEL_UNITS", int),
    "learning_rate": ("MODEL_LEARNING_RATE", float),
    "batch_size": ("MODEL_BATCH_SIZE", int),
    "max_epochs": ("MODEL_MAX_EPOCHS", int),
    "patience": ("MODEL_PATIENCE", int),
    "seed": ("MODEL_SEED", int),
}
# The numeric settings read from the environment (positive; absent or empty: the default).
_SETTINGS_ENV = {
    "trailing_days": ("TRAILING_DAYS", int),
    "yahoo_max_retries": ("YAHOO_MAX_RETRIES", int),
    "yahoo_backoff_seconds": ("YAHOO_BACKOFF_SECONDS", float),
    "fetch_concurrency": ("FETCH_CONCURRENCY", int),
    "price_file_max_bytes": ("PRICE_FILE_MAX_BYTES", int),
    "registry_lock_ttl": ("REGISTRY_LOCK_TTL", float),
    "registry_lock_timeout": ("REGISTRY_LOCK_TIMEOUT", float),
    "mlflow_unreachable_timeout": ("MLFLOW_UNREACHABLE_TIMEOUT", float),
}
_GATE_ENV = {
    "u2_high_max": "GATE_U2_HIGH_MAX",
    "u2_low_max": "GATE_U2_LOW_MAX",
    "p_value": "GATE_P_VALUE",
    "min_improvement": "GATE_MIN_IMPROVEMENT",
}


# Every environment variable the pipeline reads (get_settings, ml.model.training, ml.registry) or that
# configures Airflow/MLflow: what a test or benchmark clears so the caller's shell cannot leak into
# the processes it starts.
PIPELINE_ENV_PREFIXES = ("AIRFLOW", "MLFLOW_", "MODEL_", "GATE_")
PIPELINE_ENV = frozenset(
    {
        "PRICE_SOURCE",
        "PRICE_FILES_DIR",
        "PRICE_FILE_MAX_BYTES",
        "DATA_DIR",
        "LEDGER_DB_URL",
        "UNIVERSE_FILE",
        "HISTORY_START",
        "TRAILING_DAYS",
        "YAHOO_MAX_RETRIES",
        "YAHOO_BACKOFF_SECONDS",
        "FETCH_CONCURRENCY",
        "REGISTRY_LOCK_TTL",
        "REGISTRY_LOCK_TIMEOUT",
        "ML_FAULT_KILL_AT",
        "CODE_VERSION",
        "TF_INTRA_OP_THREADS",
    }
)


def without_pipeline_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` minus every pipeline, Airflow and MLflow setting (see PIPELINE_ENV)."""
    return {
        k: v
        for k, v in env.items()
        if not k.startswith(PIPELINE_ENV_PREFIXES) and k not in PIPELINE_ENV
    }


def model_settings(env: Mapping[str, str] | None = None) -> ModelConfig:
    """The model config from `env` (default: the process environment), validated: what
    `get_settings` uses, and the defaults of the DAG's model params."""
    env = os.environ if env is None else env
    model_changes: dict[str, object] = {}
    for attr, (name, kind) in _MODEL_ENV.items():
        if env.get(name):
            model_changes[attr] = _parse_number(name, env[name], kind, allow_zero=attr == "seed")
    if env.get("MODEL_KINDS"):
        model_changes["kinds"] = _parse_kinds(env["MODEL_KINDS"])
    if env.get("MODEL_VOL_HORIZONS"):  # empty = the default; "none" = off
        model_changes["vol_horizons"] = _parse_horizons(env["MODEL_VOL_HORIZONS"])
    if env.get("MODEL_HL_BASELINE"):
        model_changes["hl_baseline"] = _parse_choice(
            "MODEL_HL_BASELINE", env["MODEL_HL_BASELINE"], HL_BASELINES
        )
    return replace(ModelConfig(), **model_changes)


def get_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from `env` (default: the process environment)."""
    env = os.environ if env is None else env
    source = env.get("PRICE_SOURCE", "synthetic").strip().lower()
    if source not in PRICE_SOURCES:
        raise ConfigError(f"PRICE_SOURCE={source!r}: choose from {', '.join(PRICE_SOURCES)}")
    files_dir = Path(env["PRICE_FILES_DIR"]) if env.get("PRICE_FILES_DIR") else None
    if source == "files" and files_dir is None:
        raise ConfigError(
            "PRICE_SOURCE=files needs PRICE_FILES_DIR (a folder of <TICKER>.csv/.parquet)"
        )

    model = model_settings(env)

    gate_changes = {
        attr: _parse_number(name, env[name], float, allow_zero=attr == "min_improvement")
        for attr, name in _GATE_ENV.items()
        if env.get(name)
    }
    gate = replace(GateConfig(), **gate_changes)
    if not 0 < gate.p_value < 1:
        raise ConfigError(f"GATE_P_VALUE={gate.p_value!r} must lie strictly between 0 and 1")

    defaults = Settings()
    numbers = {
        attr: kind(_parse_number(name, env[name], kind))
        for attr, (name, kind) in _SETTINGS_ENV.items()
        if env.get(name)
    }
    _check_lock_ttl(replace(defaults, **numbers))
    return Settings(
        price_source=source,
        price_files_dir=files_dir,
        data_dir=Path(env.get("DATA_DIR") or defaults.data_dir),
        mlflow_tracking_uri=env.get("MLFLOW_TRACKING_URI") or defaults.mlflow_tracking_uri,
        ledger_url=_parse_ledger_url(env["LEDGER_DB_URL"]) if env.get("LEDGER_DB_URL") else None,
        experiment_name=env.get("MLFLOW_EXPERIMENT_NAME") or defaults.experiment_name,
        universe_file=Path(env.get("UNIVERSE_FILE") or defaults.universe_file),
        history_start=_parse_date("HISTORY_START", env["HISTORY_START"])
        if env.get("HISTORY_START")
        else defaults.history_start,
        **numbers,
        model=model,
        gate=gate,
    )


def _check_lock_ttl(settings: Settings) -> None:
    """REGISTRY_LOCK_TTL at or above its floor (`min_ttl`): below it, the lock
    of a holder still at work can be broken, and two processes train and register the same
    bars. REGISTRY_LOCK_TIMEOUT has no floor: a short one only makes a waiter give up (its task
    fails, the retry waits again); it never lets two holders in."""
    floor = min_ttl(settings.mlflow_unreachable_timeout)
    if settings.registry_lock_ttl < floor:
        raise ConfigError(
            f"REGISTRY_LOCK_TTL={settings.registry_lock_ttl:g} is below its floor of {floor:g} s "
            f"(MLFLOW_UNREACHABLE_TIMEOUT={settings.mlflow_unreachable_timeout:g}): a holder's "
            "heartbeat, every quarter ttl, must outlast a slow request and an MLflow outage, or "
            "another process breaks the lock of a holder still at work. Set REGISTRY_LOCK_TTL "
            f"to {floor:g} or more (or lower MLFLOW_UNREACHABLE_TIMEOUT)."
        )


def settings_table(settings: Settings) -> list[tuple[str, str]]:
    """(name, value) rows describing the settings, for `python -m ml config`."""
    rows: list[tuple[str, str]] = []
    for f in fields(settings):
        value = getattr(settings, f.name)
        if f.name in ("model", "gate"):
            rows.extend((f"{f.name}.{k}", str(v)) for k, v in asdict(value).items())
        else:
            rows.append((f.name, str(value)))
    return rows
