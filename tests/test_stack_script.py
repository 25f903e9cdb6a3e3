"""scripts/stack.py, `make demo`'s launcher, without a whole stack (issue 27, item 8).

- A failure is one line on stderr (what went wrong, what became of the stack, where the details
  are), never a traceback; the stack is stopped when this command started it, unless `--keep` or
  STACK_KEEP=1; one that was running before is left alone. The "servers" here are `sleep`
  processes carrying the stack's marker, recorded the way the launcher records its own; one test
  starts the real MLflow server and lets the real `airflow db migrate` fail.
- The demo's run of a day that already has one: Airflow allows one run per logical date, so the
  second run has none and gets the day through the `as_of` param (a fake launcher here; the real
  one twice on one state: tests/dags/test_demo_twice.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
import pytest

from ml.servers import free_port, port_is_free
from scripts.launcher import MARKER_ENV, AirflowStack, StackError, processes_with_marker

REPO = Path(__file__).resolve().parents[1]
# What `airflow db migrate` on an unreachable database prints, as launcher.cli() reports it.
MIGRATE_FAILED = StackError(
    "`airflow db migrate` exited 1:\n"
    "[info] Performing upgrade to the metadata database\n"
    'File "sqlalchemy/engine/base.py", line 2436, in _handle_dbapi_exception_noconnection\n'
    "sqlalchemy.exc.OperationalError: (sqlite3.OperationalError) unable to open database file\n"
    "(Background on this error at: https://sqlalche.me/e/21/e3q8)\n"
)


@pytest.fixture
def script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """scripts/stack.py on a state folder of its own, no STACK_KEEP from the caller; every
    process carrying a marker of this state is stopped afterwards."""
    from scripts import stack as module

    monkeypatch.setattr(module, "STATE", tmp_path)
    monkeypatch.setattr(module, "PIDS", tmp_path / "pids.json")
    monkeypatch.setattr(module, "FAILURES", tmp_path / "logs" / "stack.log")
    monkeypatch.delenv("STACK_KEEP", raising=False)
    monkeypatch.setenv("AIRFLOW_PORT", str(free_port()))
    monkeypatch.setenv("MLFLOW_PORT", str(free_port()))
    yield module
    if (tmp_path / "pids.json").exists():
        AirflowStack.load(tmp_path / "pids.json", tmp_path)[0].stop(grace=5)


def sleeper(launcher: AirflowStack, name: str) -> subprocess.Popen:
    """A stand-in server of `launcher`'s stack: its own process group, the stack's marker, and
    recorded in pids.json as spawn() records one."""
    proc = subprocess.Popen(
        ["sleep", "300"], env={**os.environ, MARKER_ENV: launcher.token}, start_new_session=True
    )
    launcher.processes[name] = proc
    if launcher.on_spawn is not None:
        launcher.on_spawn()
    return proc


def run_main(
    script: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys, *argv: str
) -> tuple[int, list[str], str]:
    """`stack.py <argv>` in this process: exit code, stderr's lines, stdout."""
    monkeypatch.setattr(sys, "argv", ["stack.py", *argv])
    code = script.main()
    out, err = capsys.readouterr()
    return code, err.splitlines(), out


def failing_start(error: BaseException, started: list[subprocess.Popen]):
    """A start() that launches MLflow (a stand-in) and then fails with `error`."""

    def start(launcher: AirflowStack) -> None:
        started.append(sleeper(launcher, "mlflow"))
        raise error

    return start


@pytest.mark.parametrize(
    ("error", "code", "reason"),
    [
        (
            MIGRATE_FAILED,
            1,
            "`airflow db migrate` exited 1 (sqlalchemy.exc.OperationalError: "
            "(sqlite3.OperationalError) unable to open database file)",
        ),
        (KeyboardInterrupt(), 130, "interrupted"),
        (KeyError("DATA_DIR"), 1, "KeyError: 'DATA_DIR'"),
    ],
)
def test_a_failed_start_is_one_line_and_stops_what_it_started(
    script: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys, error, code, reason
) -> None:
    started: list[subprocess.Popen] = []
    monkeypatch.setattr(script, "start", failing_start(error, started))
    exit_code, err, out = run_main(script, monkeypatch, capsys, "demo")
    assert exit_code == code
    assert err == [
        f"stack.py demo failed: {reason}; stopped the stack it had started (--keep or "
        f"STACK_KEEP=1 leaves it up for a look); details in {script.FAILURES}"
    ]
    assert "Traceback" not in out
    assert started[0].poll() is not None  # stopped (and reaped)
    assert not script.PIDS.exists()
    details = script.FAILURES.read_text()
    assert "stack.py demo" in details and "Traceback" in details
    if error is MIGRATE_FAILED:
        assert "Performing upgrade" in details  # the CLI's whole output is kept


@pytest.mark.parametrize("how", ["flag", "env"])
def test_keep_leaves_the_started_stack_running_until_stop(
    script: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys, how: str
) -> None:
    started: list[subprocess.Popen] = []
    monkeypatch.setattr(script, "start", failing_start(MIGRATE_FAILED, started))
    argv = ["start", "--keep"] if how == "flag" else ["start"]
    if how == "env":
        monkeypatch.setenv("STACK_KEEP", "1")
    exit_code, err, _ = run_main(script, monkeypatch, capsys, *argv)
    assert exit_code == 1
    assert len(err) == 1 and err[0].startswith("stack.py start failed: `airflow db migrate`")
    assert "; left running as asked: mlflow (make stop stops it); details in " in err[0]
    assert started[0].poll() is None
    token = json.loads(script.PIDS.read_text())["token"]
    assert script.stop() == 0  # `make stop`, from what pids.json recorded
    started[0].wait(10)
    assert processes_with_marker(token) == []


def test_a_stack_running_before_is_left_alone(
    script: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """An earlier `make demo` left the stack up; this one fails before starting anything."""
    earlier = AirflowStack(script.STATE)
    earlier.on_spawn = lambda: earlier.save(script.PIDS)
    server = sleeper(earlier, "mlflow")

    def start(launcher: AirflowStack) -> None:
        assert launcher.leaders() == {"mlflow": server.pid}  # found from pids.json
        raise MIGRATE_FAILED

    monkeypatch.setattr(script, "start", start)
    exit_code, err, _ = run_main(script, monkeypatch, capsys, "backfill", "--from-date",
                                 "2024-06-25", "--to-date", "2024-06-26")  # fmt: skip
    assert exit_code == 1
    assert len(err) == 1
    assert "; the stack that was running before is left running (make stop stops it);" in err[0]
    assert server.poll() is None and script.PIDS.exists()


@pytest.mark.slow
def test_the_real_script_stops_the_mlflow_server_it_started(tmp_path: Path) -> None:
    """`stack.py start` as `make demo` runs it: the real MLflow server starts, then the real
    `airflow db migrate` fails (its database cannot be opened)."""
    mlflow_port = free_port()
    env = {
        **os.environ,
        "STACK_STATE_DIR": str(tmp_path),
        "AIRFLOW_PORT": str(free_port()),
        "MLFLOW_PORT": str(mlflow_port),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path / 'missing' / 'airflow.db'}",
    }
    env.pop("STACK_KEEP", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "stack.py"), "start"],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0].startswith("starting MLflow tracking server")
    assert proc.stderr.splitlines() == [
        "stack.py start failed: `airflow db migrate` exited 1 (sqlalchemy.exc.OperationalError: "
        "(sqlite3.OperationalError) unable to open database file); stopped the stack it had "
        f"started (--keep or STACK_KEEP=1 leaves it up for a look); details in "
        f"{tmp_path / 'logs' / 'stack.log'}"
    ]
    assert port_is_free("127.0.0.1", mlflow_port)
    assert not (tmp_path / "pids.json").exists()
    mentions = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in str(p.info)]
    assert mentions == []  # the MLflow server and its workers (their command lines name the state)


class FakeLauncher:
    """The two calls trigger_demo_run makes, on a list of runs; the metadata DB's unique key on
    the logical date. `sneak`: a run the scheduler creates between the look and the trigger."""

    def __init__(self, runs: list[dict[str, Any]], sneak: dict[str, Any] | None = None) -> None:
        self.runs = runs
        self.sneak = sneak
        self.env = {"PRICE_SOURCE": "synthetic"}
        self.triggered: list[tuple[str, str | None, dict | None]] = []

    def list_runs(self) -> list[dict[str, Any]]:
        return list(self.runs)

    def trigger(self, run_id: str, logical_date: str | None, conf: dict | None = None) -> None:
        if self.sneak is not None:
            self.runs.append(self.sneak)
            self.sneak = None
        if logical_date and any(r["logical_date"] == logical_date for r in self.runs):
            raise StackError("`airflow dags trigger` exited 1:\nsqlalchemy.exc.IntegrityError: x")
        self.triggered.append((run_id, logical_date, conf))
        self.runs.append({"run_id": run_id, "logical_date": logical_date or "", "state": "queued"})


TICK = datetime(2024, 6, 27, 22, 30, tzinfo=UTC)
DAY_RUN = {"run_id": "demo__2024-06-27__1", "logical_date": TICK.isoformat(), "state": "success"}
SCHEDULED = {"run_id": "scheduled__x", "logical_date": TICK.isoformat(), "state": "running"}


def test_the_days_first_demo_run_has_the_tick_as_logical_date(script: ModuleType, capsys) -> None:
    launcher = FakeLauncher([{**DAY_RUN, "logical_date": "2024-06-26T22:30:00+00:00"}])
    run_id = script.trigger_demo_run(launcher, TICK, ["AMD"])
    assert launcher.triggered == [(run_id, TICK.isoformat(), {"tickers": ["AMD"]})]
    assert run_id.startswith("demo__2024-06-27__")
    assert capsys.readouterr().out.startswith("triggering price_forecast for 2024-06-27 ")


@pytest.mark.parametrize(
    ("runs", "sneak", "earlier"),
    [([DAY_RUN], None, DAY_RUN), ([], SCHEDULED, SCHEDULED)],
    ids=["an-earlier-demo", "the-scheduler-meanwhile"],
)
def test_a_day_with_a_run_gets_a_new_run_without_logical_date(
    script: ModuleType, capsys, runs, sneak, earlier
) -> None:
    launcher = FakeLauncher(list(runs), sneak)
    run_id = script.trigger_demo_run(launcher, TICK, ["AMD"])
    assert launcher.triggered == [(run_id, None, {"tickers": ["AMD"], "as_of": "2024-06-27"})]
    assert run_id.startswith("demo__2024-06-27__") and run_id.endswith("__again")
    line = capsys.readouterr().out.strip()
    assert line.startswith(
        f"2024-06-27 already has its run ({earlier['run_id']}, {earlier['state']}) and Airflow "
        "allows one run per logical date: triggering a new run of 2024-06-27 without one"
    )
    assert "\n" not in line


def test_another_trigger_failure_is_not_taken_for_a_clash(script: ModuleType) -> None:
    launcher = FakeLauncher([])

    def broken(*args: Any, **kwargs: Any) -> None:
        raise StackError("`airflow dags trigger` exited 1:\nairflow.exceptions.DagNotFound: x")

    launcher.trigger = broken
    with pytest.raises(StackError, match="DagNotFound"):
        script.trigger_demo_run(launcher, TICK)
