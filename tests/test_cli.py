"""Tests of the command line (`python -m ml`): help, input errors (exit 2), nothing written on them."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from ml.cli import main

REPO = Path(__file__).resolve().parent.parent
CONFIG_PREFIXES = ("PRICE_", "MODEL_", "GATE_", "MLFLOW_", "YAHOO_")
CONFIG_NAMES = {"DATA_DIR", "UNIVERSE_FILE", "HISTORY_START", "TRAILING_DAYS"}


@pytest.fixture(autouse=True)
def no_developer_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process `main()` reads the environment: start from the defaults."""
    for key in list(os.environ):
        if key.startswith(CONFIG_PREFIXES) or key in CONFIG_NAMES:
            monkeypatch.delenv(key)


def run_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m ml ...` in an empty folder, with DATA_DIR in `tmp_path/data` (not created)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(CONFIG_PREFIXES) and k not in CONFIG_NAMES
    }
    base.update(PYTHONPATH=str(REPO), DATA_DIR=str(tmp_path / "data"), **env)
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


def the_error_line(proc: subprocess.CompletedProcess) -> str:
    """The one line of stderr that says `error:` (argparse prints its usage lines before it)."""
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("bad", ["20240628", "2024-W26-5", "2024-6-28"])
def test_a_date_not_written_yyyy_mm_dd_exits_2(tmp_path: Path, bad: str) -> None:
    """Python's `date.fromisoformat` reads the first two: the help says YYYY-MM-DD."""
    proc = run_cli(tmp_path, "ingest", "--date", bad)
    assert proc.returncode == 2
    assert the_error_line(proc).endswith(f"not a date (YYYY-MM-DD): {bad!r}")
    assert proc.stdout == ""
    assert_wrote_nothing(tmp_path)


@pytest.mark.parametrize("command", ["ingest", "train", "forecast", "run"])
def test_a_date_after_today_exits_2_before_any_work(tmp_path: Path, command: str) -> None:
    future = datetime.now(UTC).date() + timedelta(days=3)
    proc = run_cli(tmp_path, command, "--date", future.isoformat(), "--tickers", "SPY")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [the_error_line(proc)]
    assert the_error_line(proc).startswith(f"error: invalid date {future}: after today")
    assert proc.stdout == ""
    assert_wrote_nothing(tmp_path)


def test_a_date_before_history_start_exits_2_before_any_work(tmp_path: Path) -> None:
    start = date(2020, 1, 6)
    before = (start - timedelta(days=3)).isoformat()
    proc = run_cli(tmp_path, "ingest", "--date", before, HISTORY_START=start.isoformat())
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: invalid date {before}: before HISTORY_START ({start}), where the bars begin; "
        "pick a later date or set HISTORY_START earlier"
    ]
    assert proc.stdout == ""
    assert_wrote_nothing(tmp_path)


def test_a_good_date_runs_and_a_ticker_named_twice_runs_once(tmp_path: Path) -> None:
    proc = run_cli(
        tmp_path,
        "ingest",
        "--date",
        "2024-06-28",
        "--tickers",
        "SPY",
        "SPY",
        HISTORY_START="2024-06-03",
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["SPY"]
    assert "history 20 bars to 2024-06-28" in lines[0]


@pytest.mark.parametrize("option", ["--date", "--tickers"])
def test_a_5000_character_bad_value_is_echoed_cut(tmp_path: Path, option: str) -> None:
    bad = "2" * 5000
    args = ["--date", bad] if option == "--date" else ["--date", "2024-06-28", "--tickers", bad]
    proc = run_cli(tmp_path, "ingest", *args)
    assert proc.returncode == 2
    line = the_error_line(proc)
    assert len(line) < 300 and "(5,000 characters)" in line
    assert bad[:100] not in proc.stderr
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
