"""SIGKILL at each step boundary of a day, then the next run: it ends where an undisturbed day ends.

Fault: the process running the day dies without warning (OOM killer, lost node, `kill -9`).
Injection: `python -m ml run` (the DAG's steps in one process) in a child process with
`ML_FAULT_KILL_AT=<point>`; at that point (`ml/faults.py`) the child sends itself a real SIGKILL:
no exception, no `finally`, no `atexit` runs. Each scenario checks that the child did die by
SIGKILL (exit status -9), then runs the same day again without the fault, as Airflow's retry or
the next scheduled run would.

What must hold afterwards, against an undisturbed day of the same ticker on another store and
another MLflow server: the published prices and validation reports are byte-identical; no staged
batch and no temp file is left; exactly one model version per (ticker, bars, config), with the
same gate decision and the `champion` and `challenger` aliases on it; no MLflow run left RUNNING
(the run a kill left open is FAILED); the forecast ledger and its CSV export hold the same
forecast.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ml.faults import POINTS
from ml.servers import MlflowServer, sqlite_mlflow_server
from tests.faults.daykit import DayState, day_env, explain, killed, run_day, snapshot

pytestmark = [pytest.mark.slow]

# One made-up ticker per kill point: registered model names are global on the shared server.
TICKERS = {point: f"KP{chr(ord('A') + i)}" for i, point in enumerate(POINTS)}


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[MlflowServer, MlflowServer]]:
    """One MLflow server for the undisturbed days, one for the killed ones."""
    with (
        sqlite_mlflow_server(tmp_path_factory.mktemp("reference_mlflow")) as reference,
        sqlite_mlflow_server(tmp_path_factory.mktemp("faults_mlflow")) as faulted,
    ):
        yield reference, faulted


@pytest.fixture(scope="module")
def reference(servers, tmp_path_factory: pytest.TempPathFactory) -> dict[str, DayState]:
    """The undisturbed day of every scenario's ticker, in one run on one store."""
    tickers = list(TICKERS.values())
    env = day_env(tmp_path_factory.mktemp("reference"), servers[0].uri, tickers)
    proc = run_day(env)
    assert proc.returncode == 0, f"the undisturbed day failed:\n{explain(proc)}"
    return {ticker: snapshot(env, [ticker]) for ticker in tickers}


def _comparable(state: DayState) -> dict:
    """What must match between two servers (version numbers may differ: versions are compared
    by their tags, aliases by the model kind of the version they point at). A ticker whose
    candidate the gate refused and that had no champion also has the range-aware naive
    registered as its champion (`ml.registry.promotion`)."""
    kind_of = {v["version"]: v["model_kind"] for v in state.versions}
    return {
        "versions": sorted(
            ({k: v for k, v in version.items() if k != "version"} for version in state.versions),
            key=lambda v: str(v["model_kind"]),
        ),
        "aliases": {
            alias: kind_of.get(held)
            for aliases in state.aliases.values()
            for alias, held in aliases.items()
        },
        "forecasts": [
            {k: v for k, v in r.items() if k != "model_version"} for r in state.forecasts
        ],
        "exported": [{k: v for k, v in r.items() if k != "model_version"} for r in state.exported],
    }


@pytest.mark.parametrize("point", POINTS)
def test_a_day_killed_at_a_step_boundary_ends_like_an_undisturbed_one(
    point: str, servers, reference: dict[str, DayState], tmp_path: Path
) -> None:
    ticker = TICKERS[point]
    env = day_env(tmp_path, servers[1].uri, [ticker])
    first = run_day(env, kill_at=point)
    assert killed(first), f"the day was not SIGKILLed at {point!r}:\n{explain(first)}"
    second = run_day(env)
    assert second.returncode == 0, f"the day after a kill at {point!r} failed:\n{explain(second)}"

    after, expected = snapshot(env, [ticker]), reference[ticker]
    assert after.files.keys() == expected.files.keys(), "store files differ from an undisturbed day"
    changed = [name for name in after.files if after.files[name] != expected.files[name]]
    assert not changed, (
        f"not byte-identical to an undisturbed day after a kill at {point}: {changed}"
    )
    assert after.temp_files == [], f"temp files left by the kill at {point}: {after.temp_files}"
    assert after.staging == [], f"staged batches left unpublished: {after.staging}"
    keys = [(v["ticker"], v["data_fingerprint"], v["config_fingerprint"]) for v in after.versions]
    trained = [v for v in after.versions if v["model_kind"] != "naive"]
    assert len(keys) == len(set(keys)) and len(trained) == 1, (
        f"versions after a kill at {point}: {after.versions}"
    )
    assert _comparable(after) == _comparable(expected), f"registry/forecasts differ ({point})"
    assert "RUNNING" not in after.run_status, f"runs left RUNNING: {after.run_status}"
    finished = len(expected.versions)  # one run per registered version
    assert expected.run_status == {"FINISHED": finished}, expected.run_status
    if point == "run-open":  # the killed try's run was open: the retry marked it FAILED
        assert after.run_status == {"FAILED": 1, "FINISHED": finished}, after.run_status
    else:
        assert after.run_status == expected.run_status, after.run_status
