"""Tests of `ml.config`: offline defaults, environment overrides, clear errors, import hygiene."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from ml.config import (
    DEFAULT_KINDS,
    MODEL_KINDS,
    PROJECT_ROOT,
    ConfigError,
    GateConfig,
    ModelConfig,
    check_as_of,
    excerpt,
    get_settings,
    parse_as_of,
    parse_day,
    settings_table,
)

REPO = Path(__file__).resolve().parent.parent
HEAVY_MODULES = ("tensorflow", "keras", "mlflow", "great_expectations", "airflow", "yfinance")
# `ml.registry.pyfunc` is the MLflow model wrapper: it imports mlflow by nature, so it is imported last and
# only checked for side effects.
WRAPPER_MODULES = ("pyfunc",)

# Runs in a fresh interpreter: records every file or folder created, written, moved or removed
# (Python audit events) while importing every `ml` module, and which heavy packages got imported.
IMPORT_PROBE = r"""
import importlib, json, os, pkgutil, sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.symlink",
          "os.link", "os.truncate", "os.chmod", "os.utime", "shutil.copyfile", "shutil.rmtree"}
writes = []

def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if str(path).startswith("/dev/"):
            return
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & WRITE_FLAGS
        ):
            writes.append(f"open({path!r}, {mode!r})")
    elif event in EVENTS:
        writes.append(f"{event}({args[0]!r})")

sys.addaudithook(hook)
import ml

wrappers = set(sys.argv[1].split(","))
names = sorted(m.name for m in pkgutil.iter_modules(ml.__path__) if m.name != "__main__")
for name in names:
    if name not in wrappers:
        importlib.import_module(f"ml.{name}")
heavy = sorted(m for m in sys.argv[2].split(",") if m in sys.modules)
library_writes = list(writes)
for name in sorted(wrappers & set(names)):
    importlib.import_module(f"ml.{name}")
print(json.dumps({"modules": names, "heavy": heavy, "library_writes": library_writes,
                  "wrapper_writes": writes[len(library_writes):]}))
"""


def clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    """A minimal environment: none of the developer's settings, a private HOME."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp / "home"),
        "PYTHONPATH": str(REPO),
        "PYTHONDONTWRITEBYTECODE": "1",
        "DATA_DIR": str(tmp / "data"),
    }
    # A project-wide opt-out of MLflow telemetry, once someone sets it, reaches the probe too.
    for name in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def import_probe(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("import-probe")
    cwd = tmp / "cwd"
    cwd.mkdir()
    (tmp / "home").mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE, ",".join(WRAPPER_MODULES), ",".join(HEAVY_MODULES)],
        cwd=cwd,
        env=clean_env(tmp),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["tmp"] = tmp
    return result


# --- defaults ------------------------------------------------------------------------------------


def test_defaults_run_offline() -> None:
    settings = get_settings({})
    assert settings.price_source == "synthetic"
    assert settings.price_files_dir is None
    assert settings.data_dir == PROJECT_ROOT / ".state" / "data"
    assert settings.mlflow_tracking_uri == "http://127.0.0.1:5000"
    assert settings.universe_file == PROJECT_ROOT / "universe.csv"
    assert settings.universe_file.is_file()
    assert settings.model == ModelConfig()
    assert settings.gate == GateConfig()
    assert settings.model.window == 6
    assert settings.model.kinds == DEFAULT_KINDS == ("har",)
    assert MODEL_KINDS == ("lstm", "gru", "har", "gbm")
    assert settings.model.split == (0.7, 0.2, 0.1)
    assert settings.price_file_max_bytes == 64 * 1024 * 1024


def test_defaults_ignore_the_process_environment_when_given_a_mapping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PRICE_SOURCE", "yahoo")
    monkeypatch.setenv("MODEL_WINDOW", "9")
    assert get_settings({}).price_source == "synthetic"
    assert get_settings().price_source == "yahoo"
    assert get_settings().model.window == 9


# --- overrides -----------------------------------------------------------------------------------


def test_environment_overrides_every_setting(tmp_path: Path) -> None:
    env = {
        "PRICE_SOURCE": " Files ",
        "PRICE_FILES_DIR": str(tmp_path / "replay"),
        "PRICE_FILE_MAX_BYTES": "1048576",
        "DATA_DIR": str(tmp_path / "data"),
        "MLFLOW_TRACKING_URI": "http://mlflow.internal:5001",
        "MLFLOW_EXPERIMENT_NAME": "nightly",
        "UNIVERSE_FILE": str(tmp_path / "u.csv"),
        "HISTORY_START": "2020-03-02",
        "TRAILING_DAYS": "15",
        "YAHOO_MAX_RETRIES": "7",
        "YAHOO_BACKOFF_SECONDS": "0.5",
        "MODEL_WINDOW": "10",
        "MODEL_UNITS": "32",
        "MODEL_LEARNING_RATE": "0.005",
        "MODEL_BATCH_SIZE": "128",
        "MODEL_MAX_EPOCHS": "12",
        "MODEL_PATIENCE": "3",
        "MODEL_SEED": "7",
        "MODEL_KINDS": "GRU, lstm",
        "GATE_U2_HIGH_MAX": "0.95",
        "GATE_U2_LOW_MAX": "0.9",
        "GATE_P_VALUE": "0.01",
        "GATE_MIN_IMPROVEMENT": "0.01",
    }
    s = get_settings(env)
    assert s.price_source == "files"
    assert s.price_files_dir == tmp_path / "replay"
    assert s.price_file_max_bytes == 1048576
    assert s.data_dir == tmp_path / "data"
    assert s.mlflow_tracking_uri == "http://mlflow.internal:5001"
    assert s.experiment_name == "nightly"
    assert s.universe_file == tmp_path / "u.csv"
    assert s.history_start == date(2020, 3, 2)
    assert s.trailing_days == 15
    assert s.yahoo_max_retries == 7
    assert s.yahoo_backoff_seconds == 0.5
    assert s.model == ModelConfig(
        window=10,
        kinds=("gru", "lstm"),
        units=32,
        learning_rate=0.005,
        batch_size=128,
        max_epochs=12,
        patience=3,
        seed=7,
    )
    assert isinstance(s.model.window, int) and isinstance(s.model.learning_rate, float)
    assert s.gate == GateConfig(
        u2_high_max=0.95, u2_low_max=0.9, p_value=0.01, min_improvement=0.01
    )
    table = dict(settings_table(s))
    assert table["model.window"] == "10"
    assert table["gate.p_value"] == "0.01"
    assert table["price_source"] == "files"


def test_empty_values_mean_default() -> None:
    s = get_settings({"DATA_DIR": "", "MODEL_WINDOW": "", "MLFLOW_TRACKING_URI": ""})
    assert s == get_settings({})


@pytest.mark.parametrize(
    ("env", "fragments"),
    [
        ({"PRICE_SOURCE": "foo"}, ["PRICE_SOURCE", "'foo'", "yahoo, synthetic, files"]),
        ({"PRICE_SOURCE": "files"}, ["PRICE_SOURCE=files", "PRICE_FILES_DIR"]),
        ({"MODEL_MAX_EPOCHS": "abc"}, ["MODEL_MAX_EPOCHS", "'abc'", "int"]),
        ({"MODEL_WINDOW": "6.5"}, ["MODEL_WINDOW", "'6.5'", "int"]),
        ({"MODEL_WINDOW": "0"}, ["MODEL_WINDOW", "positive"]),
        ({"MODEL_BATCH_SIZE": "-32"}, ["MODEL_BATCH_SIZE", "positive"]),
        ({"MODEL_LEARNING_RATE": "fast"}, ["MODEL_LEARNING_RATE", "'fast'", "float"]),
        ({"MODEL_KINDS": "transformer"}, ["MODEL_KINDS", "'transformer'", "lstm, gru, har, gbm"]),
        ({"MODEL_KINDS": "lstm,transformer"}, ["MODEL_KINDS", "lstm, gru, har, gbm"]),
        ({"MODEL_KINDS": " , "}, ["MODEL_KINDS", "lstm, gru, har, gbm"]),
        ({"GATE_U2_HIGH_MAX": "high"}, ["GATE_U2_HIGH_MAX", "'high'"]),
        ({"GATE_P_VALUE": "1"}, ["GATE_P_VALUE", "between 0 and 1"]),
        ({"GATE_P_VALUE": "0"}, ["GATE_P_VALUE", "positive"]),
        ({"HISTORY_START": "2024-13-01"}, ["HISTORY_START", "'2024-13-01'", "YYYY-MM-DD"]),
        ({"HISTORY_START": "20240102"}, ["HISTORY_START", "'20240102'", "YYYY-MM-DD"]),
        ({"PRICE_FILE_MAX_BYTES": "64MiB"}, ["PRICE_FILE_MAX_BYTES", "'64MiB'", "int"]),
        ({"PRICE_FILE_MAX_BYTES": "0"}, ["PRICE_FILE_MAX_BYTES", "positive"]),
        ({"TRAILING_DAYS": "ten"}, ["TRAILING_DAYS", "'ten'"]),
        ({"YAHOO_MAX_RETRIES": "0"}, ["YAHOO_MAX_RETRIES", "positive"]),
        ({"REGISTRY_LOCK_TTL": "0.01"}, ["REGISTRY_LOCK_TTL=0.01", "floor of 80 s"]),
        (
            {"MLFLOW_UNREACHABLE_TIMEOUT": "120"},
            ["REGISTRY_LOCK_TTL=120", "floor of 160 s", "MLFLOW_UNREACHABLE_TIMEOUT=120"],
        ),
        ({"MLFLOW_UNREACHABLE_TIMEOUT": "0"}, ["MLFLOW_UNREACHABLE_TIMEOUT", "positive"]),
        ({"LEDGER_DB_URL": "ledger.db"}, ["LEDGER_DB_URL='ledger.db'", "not a database URL"]),
        ({"LEDGER_DB_URL": "mysql://u@h/db"}, ["LEDGER_DB_URL", "sqlite or postgresql", "mysql"]),
        ({"LEDGER_DB_URL": "postgresql+nope://u@h/db"}, ["LEDGER_DB_URL", "no driver"]),
    ],
    ids=lambda v: ",".join(f"{k}={val}" for k, val in v.items()) if isinstance(v, dict) else "",
)
def test_bad_values_raise_config_error_naming_the_variable(
    env: dict[str, str], fragments: list[str]
) -> None:
    with pytest.raises(ConfigError) as excinfo:
        get_settings(env)
    message = str(excinfo.value)
    for fragment in fragments:
        assert fragment in message, message


def test_the_lock_ttl_floor_follows_the_heartbeat_and_the_mlflow_outage_ridden_out() -> None:
    """A ttl below `min_ttl` lets a waiter break the lock of a live holder (a ttl of 0.01 s: two
    versions of one ticker's bars); at the floor it is accepted."""
    from ml.config import HEARTBEATS_PER_TTL, MIN_TTL, min_ttl

    assert min_ttl(60) == 60 * HEARTBEATS_PER_TTL / (HEARTBEATS_PER_TTL - 1) == 80
    assert min_ttl(1) == MIN_TTL
    assert get_settings({}).registry_lock_ttl >= min_ttl(
        get_settings({}).mlflow_unreachable_timeout
    )
    assert get_settings({"REGISTRY_LOCK_TTL": "80"}).registry_lock_ttl == 80
    short = get_settings({"REGISTRY_LOCK_TTL": "30", "MLFLOW_UNREACHABLE_TIMEOUT": "10"})
    assert (short.registry_lock_ttl, short.mlflow_unreachable_timeout) == (30, 10)
    with pytest.raises(ConfigError, match=r"REGISTRY_LOCK_TTL=29\.9 is below its floor of 30 s"):
        get_settings({"REGISTRY_LOCK_TTL": "29.9", "MLFLOW_UNREACHABLE_TIMEOUT": "10"})


def test_ledger_url_is_kept_and_its_password_never_shown() -> None:
    url = "postgresql+psycopg2://ledger:s3cret@db.internal:5432/ledger"
    assert get_settings({"LEDGER_DB_URL": f" {url} "}).ledger_url == url
    with pytest.raises(ConfigError) as excinfo:
        get_settings({"LEDGER_DB_URL": "mysql://ledger:s3cret@db.internal/ledger"})
    assert "s3cret" not in str(excinfo.value) and "ledger:***@" in str(excinfo.value)


@pytest.mark.parametrize("name", ["MODEL_LEARNING_RATE", "GATE_P_VALUE"])
def test_nan_is_not_a_valid_number(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        get_settings({name: "nan"})


# --- dates and tickers a user types ----------------------------------------------------------------

TODAY = date(2030, 6, 14)  # injected: the checks below never read the clock
START = get_settings({}).history_start


@pytest.mark.parametrize(
    "text",
    ["20240628", "2024-W26-5", "2024-6-28", "2024-06-28T00:00", " 2024-06-28", "2024-02-30",
     "２０２４-06-28", "", None, 20240628],
)  # fmt: skip
def test_parse_day_takes_only_yyyy_mm_dd(text: object) -> None:
    with pytest.raises(ConfigError, match=r"^not a date \(YYYY-MM-DD\): "):
        parse_day(text)


def test_parse_day_reads_a_calendar_date() -> None:
    assert parse_day("2024-06-28") == date(2024, 6, 28)
    assert parse_day("2024-02-29") == date(2024, 2, 29)


def test_a_long_bad_date_is_echoed_cut_with_its_length() -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_day("2024-06-28" * 500)
    message = str(excinfo.value)
    assert len(message) < 120 and "(5,000 characters)" in message


def test_check_as_of_accepts_today_and_history_start() -> None:
    assert check_as_of(TODAY, START, today=TODAY) == TODAY
    assert check_as_of(START, START, today=TODAY) == START
    assert parse_as_of("2024-06-28", START, today=TODAY) == date(2024, 6, 28)


def test_check_as_of_refuses_a_date_after_today() -> None:
    tomorrow = TODAY + timedelta(days=1)
    with pytest.raises(ConfigError) as excinfo:
        check_as_of(tomorrow, START, today=TODAY)
    assert str(excinfo.value).startswith(f"invalid date {tomorrow.isoformat()}: after today")
    assert TODAY.isoformat() in str(excinfo.value)


def test_check_as_of_refuses_a_date_before_history_start() -> None:
    before = START - timedelta(days=1)
    with pytest.raises(ConfigError) as excinfo:
        parse_as_of(before.isoformat(), START, today=TODAY)
    message = str(excinfo.value)
    assert message.startswith(f"invalid date {before.isoformat()}: before HISTORY_START")
    assert START.isoformat() in message


def test_check_as_of_defaults_to_the_utc_clock() -> None:
    """Without `today`, tomorrow in UTC is refused and yesterday accepted."""
    utc_today = datetime.now(UTC).date()
    with pytest.raises(ConfigError, match="after today"):
        check_as_of(utc_today + timedelta(days=2), START)
    assert check_as_of(utc_today - timedelta(days=1), START) == utc_today - timedelta(days=1)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("SPY", "'SPY'"),
        ("x" * 40, repr("x" * 40)),
        ("x" * 41, repr("x" * 40) + "... (41 characters)"),
        ("a\nb\x00", "'a\\nb\\x00'"),  # control characters escaped: the message stays one line
        (["A"] * 100, repr(["A"] * 100)[:40] + "... (500 characters)"),  # its repr, cut
    ],
    ids=["short", "at-limit", "over", "control", "not-a-string"],
)
def test_excerpt_bounds_what_a_message_echoes(value: object, shown: str) -> None:
    assert excerpt(value) == shown


# --- fingerprint ---------------------------------------------------------------------------------


def test_model_fingerprint_is_stable_and_tracks_every_param() -> None:
    base = ModelConfig()
    fp = base.fingerprint()
    assert fp == ModelConfig().fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    # The same values read from the environment give the same fingerprint.
    assert get_settings({"MODEL_WINDOW": "6", "MODEL_KINDS": "har"}).model.fingerprint() == fp
    changed = [
        replace(base, window=7),
        replace(base, kinds=("lstm",)),
        replace(base, kinds=("gru", "lstm")),
        replace(base, units=32),
        replace(base, learning_rate=2e-3),
        replace(base, split=(0.6, 0.2, 0.2)),
        replace(base, seed=43),
        replace(get_settings({}).model, max_epochs=41),
    ]
    fingerprints = {c.fingerprint() for c in changed}
    assert fp not in fingerprints
    assert len(fingerprints) == len(changed)


def test_model_fingerprint_is_the_same_in_another_process(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from ml.config import ModelConfig; print(ModelConfig().fingerprint())",
        ],
        env=clean_env(tmp_path, PYTHONHASHSEED="123"),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert proc.stdout.strip() == ModelConfig().fingerprint()


# --- import hygiene ------------------------------------------------------------------------------


def test_importing_ml_modules_imports_no_heavy_framework(import_probe: dict) -> None:
    assert "config" in import_probe["modules"] and "cli" in import_probe["modules"]
    assert import_probe["heavy"] == []


def test_importing_ml_modules_creates_no_files_or_folders(import_probe: dict) -> None:
    tmp: Path = import_probe["tmp"]
    assert import_probe["library_writes"] == []
    assert not (tmp / "data").exists()
    assert list((tmp / "cwd").iterdir()) == []


def test_importing_the_mlflow_wrapper_creates_no_files(import_probe: dict) -> None:
    assert import_probe["wrapper_writes"] == []
    assert list((import_probe["tmp"] / "home").iterdir()) == []


def test_without_pipeline_env_clears_every_variable_the_settings_read() -> None:
    """Tests and benchmarks rely on it to keep the caller's shell out of the processes they start."""
    from ml.config import without_pipeline_env
    from tests.conftest import names_read_by_settings

    names = names_read_by_settings() | {"TF_INTRA_OP_THREADS", "CODE_VERSION", "ML_FAULT_KILL_AT"}
    env = {**dict.fromkeys(names, "x"), "AIRFLOW__CORE__EXECUTOR": "x", "PATH": "/bin"}
    assert without_pipeline_env(env) == {"PATH": "/bin"}
