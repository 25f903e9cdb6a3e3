"""Tests of the command line (`python -m ml`): help, input errors (exit 2), nothing written on them;
a ledger, a store or a tracking server that cannot serve: one `error:` line, no traceback."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from ml.cli import main
from ml.config import without_pipeline_env

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_developer_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process `main()` reads the environment: start from the defaults."""
    for key in set(os.environ) - set(without_pipeline_env(os.environ)):
        monkeypatch.delenv(key)


def child_env(**env: str) -> dict[str, str]:
    """The environment of a `python -m ml` child: no developer setting, this checkout's `ml`."""
    return {**without_pipeline_env(os.environ), "PYTHONPATH": str(REPO), **env}


def run_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m ml ...` in an empty folder, with DATA_DIR in `tmp_path/data` (not created)
    unless `env` says otherwise."""
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "ml", *args],
        cwd=cwd,
        env=child_env(**{"DATA_DIR": str(tmp_path / "data"), **env}),
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


def test_run_prints_every_ticker_when_a_step_fails_and_the_report_cannot_be_written(
    tmp_path: Path,
) -> None:
    """MLflow down: the ticker fails at train, the forecast step fails as a whole; the report's
    folder is a file: the table and each ticker's error still reach the terminal, in one line
    each, within the bound."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "reports").write_text("a file where the reports folder goes\n")
    started = time.monotonic()
    proc = run_cli(
        tmp_path,
        "run",
        "--date",
        "2024-06-28",
        "--tickers",
        "GOOGL",
        MLFLOW_TRACKING_URI=DOWN,
        MLFLOW_UNREACHABLE_TIMEOUT="3",
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert [line.split()[:2] for line in proc.stdout.splitlines()[2:]] == [["GOOGL", "failed"]]
    stderr = proc.stderr.splitlines()
    assert f"GOOGL failed at train: MlflowUnreachable: the MLflow tracking server {DOWN}" in (
        "\n".join(stderr)
    )
    assert any(
        line.startswith("error: the forecast step failed: MlflowUnreachable") for line in stderr
    )
    assert any(
        line.startswith("error: the run report") and "could not be written" in line
        for line in stderr
    )
    assert elapsed < 120, f"{elapsed:.1f} s"  # ingest and validate, then one bound of 3 s


def _read_only_bind_mount_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount --bind -o ro /tmp /tmp && ! touch /tmp/.ro-probe"],
        capture_output=True,
    )
    return probe.returncode == 0


def test_run_on_a_read_only_data_dir_still_reports_every_ticker(tmp_path: Path) -> None:
    """A DATA_DIR mounted read-only (a private mount namespace: needs CAP_SYS_ADMIN, which root
    in a container usually has): every write fails, and the run still ends with its table and
    each ticker's error, in one line each."""
    if not _read_only_bind_mount_works():
        pytest.skip("no read-only bind mount here (`unshare -m` needs CAP_SYS_ADMIN): skipped")
    data = tmp_path / "data"
    data.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = child_env(DATA_DIR=str(data), MLFLOW_TRACKING_URI=DOWN, MLFLOW_UNREACHABLE_TIMEOUT="3")
    script = 'mount --bind -o ro "$DATA_DIR" "$DATA_DIR" && exec "$0" "$@"'
    proc = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            script,
            sys.executable,
            "-m",
            "ml",
            "run",
            "--date",
            "2024-06-28",
            "--tickers",
            "GOOGL",
            "AMD",
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert [line.split()[:2] for line in proc.stdout.splitlines()[2:]] == [
        ["GOOGL", "failed"],
        ["AMD", "failed"],
    ]
    for ticker in ("GOOGL", "AMD"):
        assert (
            f"{ticker} failed at ingest: OSError: [Errno 30] Read-only file system" in proc.stderr
        )
    assert "error: the forecast step failed: LedgerUnavailable" in proc.stderr
    assert "could not be written" in proc.stderr
    assert list(data.iterdir()) == []


def test_a_step_that_fails_as_a_whole_fails_its_tickers_there_and_the_report_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run_day` reports a step that raised like the DAG's report a task that returned nothing:
    its tickers failed at that step, here with the step's own error."""
    from ml import cli, pipeline
    from ml.config import get_settings
    from ml.data.ingest import StagedBatch
    from ml.forecasts import ledger
    from ml.forecasts.ledger import LedgerUnavailable
    from ml.steps import forecast
    from ml.steps.records import Ingested, Promoted, Publication, Published, Registered

    def down(*args, **kwargs):
        raise LedgerUnavailable("the forecast ledger's database db:5432 cannot be reached")

    batch = StagedBatch("A", "2024-06-28", "2024-06-20", "2024-06-28", 0, True, "synthetic")
    publication = Publication(0, 0, 500, "2024-06-28", "passed", 32, "f" * 16, "2024-06-28")
    monkeypatch.setattr(ledger, "engine_for", lambda settings: None)
    monkeypatch.setattr(pipeline, "ingest", lambda *a, **k: Ingested({"A": batch}, {}))
    published = Published({"A": publication}, {})
    monkeypatch.setattr(pipeline, "validate_and_publish", lambda *a, **k: published)
    monkeypatch.setattr(pipeline, "find_versions", lambda *a, **k: Registered({"A": None}, {}, {}))
    monkeypatch.setattr(pipeline, "plan_training", lambda *a, **k: ())
    monkeypatch.setattr(pipeline, "promote", lambda *a, **k: Promoted({}, {}))
    monkeypatch.setattr(forecast, "forecast_all", down)
    settings = replace(get_settings({}), data_dir=tmp_path / "data")

    assert cli.run_day(["A"], date(2024, 6, 28), settings, force=False) == 1
    report = json.loads((tmp_path / "data" / "reports" / "2024-06-28.json").read_text())
    [row] = report["tickers"]
    assert (row["state"], row["failed_step"]) == ("failed", "forecast")
    assert (
        row["error"]
        == "LedgerUnavailable: the forecast ledger's database db:5432 cannot be reached"
    )
    err = capsys.readouterr().err
    assert "error: the forecast step failed: LedgerUnavailable" in err
    assert "A failed at forecast: LedgerUnavailable" in err


def test_the_dags_report_points_at_the_log_of_a_task_that_returned_nothing() -> None:
    from ml.steps.report import summarize_day
    from tests.conftest import day_from_steps

    [row] = summarize_day(day_from_steps(["A"], ingested=None, validated=None))
    assert (row["failed_step"], row["error"]) == ("ingest", "the ingest task failed: see its log")
