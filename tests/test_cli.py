"""Tests of the command line (`python -m ml`): help, input errors (exit 2), nothing written on them;
a ledger, a store or a tracking server that cannot serve: one `error:` line, no traceback."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ml.cli import main

REPO = Path(__file__).resolve().parent.parent
CONFIG_PREFIXES = ("PRICE_", "MODEL_", "GATE_", "MLFLOW_", "YAHOO_")
CONFIG_NAMES = {
    "DATA_DIR",
    "UNIVERSE_FILE",
    "HISTORY_START",
    "TRAILING_DAYS",
    "LEDGER_DB_URL",
    "REGISTRY_LOCK_TTL",
}


@pytest.fixture(autouse=True)
def no_developer_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process `main()` reads the environment: start from the defaults."""
    for key in list(os.environ):
        if key.startswith(CONFIG_PREFIXES) or key in CONFIG_NAMES:
            monkeypatch.delenv(key)


def run_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m ml ...` in an empty folder, with DATA_DIR in `tmp_path/data` (not created)
    unless `env` says otherwise."""
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(CONFIG_PREFIXES) and k not in CONFIG_NAMES
    }
    base.update({"PYTHONPATH": str(REPO), "DATA_DIR": str(tmp_path / "data"), **env})
    return subprocess.run(
        [sys.executable, "-m", "ml", *args],
        cwd=cwd,
        env=base,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_wrote_nothing(tmp_path: Path) -> None:
    assert not (tmp_path / "data").exists()
    assert list((tmp_path / "cwd").iterdir()) == []


def test_help_lists_the_commands(tmp_path: Path) -> None:
    proc = run_cli(tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("ingest", "train", "forecast", "universe", "config"):
        assert command in proc.stdout
    assert_wrote_nothing(tmp_path)


@pytest.mark.parametrize(
    ("command", "options"),
    [("ingest", ["--date", "--tickers"]), ("train", ["--date", "--tickers", "--force"])],
)
def test_command_help_lists_the_options(
    capsys: pytest.CaptureFixture[str], command: str, options: list[str]
) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main([command, "--help"])
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    for option in options:
        assert option in out


@pytest.mark.parametrize("bad", ["2024-13-45", "yesterday", "28/06/2024"])
def test_bad_date_exits_2_with_a_message(tmp_path: Path, bad: str) -> None:
    proc = run_cli(tmp_path, "ingest", "--date", bad)
    assert proc.returncode == 2
    assert f"not a date (YYYY-MM-DD): {bad!r}" in proc.stderr
    assert proc.stdout == ""
    assert_wrote_nothing(tmp_path)


def test_missing_date_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["ingest"])
    assert excinfo.value.code == 2
    assert "--date" in capsys.readouterr().err


def test_malformed_ticker_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    proc = run_cli(tmp_path, "ingest", "--date", "2024-06-28", "--tickers", "../x")
    assert proc.returncode == 2
    assert "malformed ticker '../x'" in proc.stderr
    assert proc.stdout == ""
    assert_wrote_nothing(tmp_path)
    assert not (tmp_path / "x").exists()


def test_unknown_ticker_exits_2_naming_it(tmp_path: Path) -> None:
    proc = run_cli(tmp_path, "ingest", "--date", "2024-06-28", "--tickers", "GOOGL", "ZZZZ")
    assert proc.returncode == 2
    assert "unknown ticker 'ZZZZ'" in proc.stderr
    assert proc.stdout == ""  # no ticker was ingested before the input was rejected
    assert_wrote_nothing(tmp_path)


def test_bad_setting_exits_2_naming_it(tmp_path: Path) -> None:
    proc = run_cli(tmp_path, "ingest", "--date", "2024-06-28", PRICE_SOURCE="foo")
    assert proc.returncode == 2
    assert "error: PRICE_SOURCE='foo'" in proc.stderr
    assert_wrote_nothing(tmp_path)


def test_universe_command_lists_tickers_and_slugs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["universe"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 31
    assert lines[0].split()[:3] == ["AMD", "stock", "AMD"]
    assert ["EURUSD=X", "forex", "EURUSD_X"] in [line.split()[:3] for line in lines]


def test_config_command_prints_the_effective_settings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("MODEL_WINDOW", "9")
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    assert main(["config"]) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.strip().splitlines())
    assert rows["model.window"] == "9"
    assert rows["data_dir"] == str(tmp_path / "data")
    assert not (tmp_path / "data").exists()


# --- a ledger, a store or a tracking server that cannot serve: one line, no traceback ------------

# Nothing listens on port 1 (a privileged port no test server takes).
DOWN = "http://127.0.0.1:1"


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error:` line on stderr (and no traceback)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def _read_only_ledger(tmp_path: Path) -> str:
    """An SQLite ledger opened read-only (`mode=ro`): what a read-only file or filesystem gives,
    for any user (root writes through file permissions)."""
    path = tmp_path / "ro" / "ledger.db"
    path.parent.mkdir()
    sqlite3.connect(path).execute("create table other (x integer)").connection.close()
    return f"sqlite:///file:{path}?mode=ro&uri=true"


def _file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a folder\n")
    return path


# (the environment under tmp_path, the exit code, what the error line says)
LEDGER_CASES = {
    "missing folder": (
        lambda t: {"LEDGER_DB_URL": f"sqlite:///{t}/nowhere/ledger.db"},
        2,
        ["LEDGER_DB_URL", "nowhere does not exist", "mkdir -p"],
    ),
    "folder where the file goes": (
        lambda t: {"LEDGER_DB_URL": f"sqlite:///{t}"},
        2,
        ["LEDGER_DB_URL", "is a folder, not an SQLite file"],
    ),
    "file where a folder goes": (
        lambda t: {"LEDGER_DB_URL": f"sqlite:///{_file(t)}/ledger.db"},
        2,
        ["LEDGER_DB_URL", "a-file is a file, not a folder"],
    ),
    "DATA_DIR under a file": (
        lambda t: {"DATA_DIR": str(_file(t) / "data")},
        2,
        ["DATA_DIR", "a-file is a file, not a folder"],
    ),
    "malformed URL": (
        lambda t: {"LEDGER_DB_URL": "sqlite:/ledger.db"},
        2,
        ["LEDGER_DB_URL='sqlite:/ledger.db' is not a database URL"],
    ),
    "read-only file": (
        lambda t: {"LEDGER_DB_URL": _read_only_ledger(t)},
        1,
        ["ro/ledger.db is read-only", "SQLITE_READONLY", "not committed"],
    ),
    "unreachable PostgreSQL": (
        lambda t: {"LEDGER_DB_URL": "postgresql+psycopg2://ledger:s3cret@127.0.0.1:1/ledger"},
        1,
        ["127.0.0.1:1", "LEDGER_DB_URL", "cannot be reached", "Connection refused"],
    ),
}


@pytest.mark.parametrize("case", list(LEDGER_CASES))
@pytest.mark.parametrize("command", ["export", "forecast"])
def test_a_ledger_that_cannot_serve_is_one_error_line_with_its_exit_code(
    tmp_path: Path, command: str, case: str
) -> None:
    """Exit 2 for a setting that cannot work (nothing was done), 1 for a ledger that failed the
    step; the line names the setting or the file and the way out. `forecast` reads the ledger
    before it asks MLflow (nothing listens at DOWN)."""
    env, code, fragments = LEDGER_CASES[case]
    args = [command] + (
        ["--date", "2024-06-28", "--tickers", "GOOGL"] if command == "forecast" else []
    )
    proc = run_cli(tmp_path, *args, MLFLOW_TRACKING_URI=DOWN, **env(tmp_path))
    line = error_line(proc)
    assert proc.returncode == code, proc.stderr
    for fragment in fragments:
        assert fragment in line, line
    assert "s3cret" not in proc.stderr
    assert proc.stdout == ""


def test_an_unreachable_tracking_server_fails_forecast_within_the_bound(tmp_path: Path) -> None:
    """Without the bound, every request waits out MLflow's retries (minutes each, the forecast
    step several of them); with it, the command ends after MLFLOW_UNREACHABLE_TIMEOUT and the
    interpreter's start, naming the server."""
    bound = 3.0
    started = time.monotonic()
    proc = run_cli(
        tmp_path,
        "forecast",
        "--date",
        "2024-06-28",
        MLFLOW_TRACKING_URI=DOWN,
        MLFLOW_UNREACHABLE_TIMEOUT=str(bound),
    )
    elapsed = time.monotonic() - started
    line = error_line(proc)
    assert proc.returncode == 1, proc.stderr
    assert DOWN in line and "MLFLOW_UNREACHABLE_TIMEOUT" in line, line
    assert bound <= elapsed < bound + 30, f"{elapsed:.1f} s"  # 30 s: start and imports, loaded CI
