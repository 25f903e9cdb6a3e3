"""SIGKILL of running `train` task processes under the REAL Airflow 3 scheduler: the retries
succeed and the run ends as an undisturbed one (issue 11, item 2).

Fault: the process running a task dies without warning (OOM killer, `kill -9`), while the rest of
the stack (scheduler, the task's supervisor, MLflow) lives on.

Stack: the same real stack as the backfill test (tests/dags/stack.py, on scripts/launcher.py:
api-server, dag-processor, scheduler with the project's preloading LocalExecutor on SQLite, a
private MLflow server), on a two-ticker universe. One run of `price_forecast` is triggered for
2024-06-26 with the run conf `{"model_kinds": ["gru"]}`; the DAG's own retry policy applies
(retries=2, retry_delay 20 s with exponential backoff, so the retry starts 20 to 40 s after the
failure).

Injection: processes, not threads. Airflow 3's LocalExecutor worker is the supervisor: it forks
one process per task try, which retitles itself `airflow worker -- <task instance id>` and runs
the task code. The test reads each `train` instance's id, try number and `pid` from the metadata
DB (read-only SQLite), checks that a process with that pid and that title is a descendant of the
scheduler, and sends it `os.kill(pid, SIGKILL)`: no exception, no `finally`, no `atexit` runs in
the task. The supervisor process is not touched; it sees its child die (exit -9) and reports
the try up for retry, and the scheduler runs try 2 after the retry delay. Two kill points, one
per ticker, in the same run:

- in the middle of the Keras fit: tests/faults/fit_probe.py, loaded into the executor's workers
  through `PRELOAD_MODULES` (only in this test's stack), records in `<pid>.fit` when
  the fit (`ml.model.training.fit_candidates`) starts, ends each epoch and returns, and holds the
  first ticker's first try after epoch 3 of 150 (`FIT_PROBE_HOLD`: on a fast machine the whole
  fit takes under a second, too short to hit by polling); that task process is killed there, and
  the test checks afterwards that the file stops there (no later epoch, no `end`);
- inside the MLflow run: the probe holds the second ticker's first try at the `run-open` fault
  checkpoint (`FIT_PROBE_HOLD`: params logged, model not yet; the run lasts about half a second
  otherwise, too short to hit by polling), and the task process is killed once the probe
  recorded it there and MLflow shows a RUNNING run for that ticker; the test checks that the run
  is still RUNNING right after the kill (an orphan only the retry can close) and FAILED at the
  end.

What must hold after the run: the run is `success`; both killed instances are at try 2 and
succeeded, try 1 was the killed pid, and no other task needed a retry; per ticker exactly one
registered version per (ticker, data_fingerprint, config_fingerprint), `champion` and
`challenger` on it; no MLflow run is RUNNING (the orphan is FAILED) and each ticker has exactly
one FINISHED run, the version's; no registry lock is left; the run report lists every ticker
`done`; every forecast comes from that version; no temp file is left under DATA_DIR. Against an
undisturbed run: the published price files are byte-identical to what `python -m ml ingest` for
the same date writes into another DATA_DIR, and the version's bars, config and test-block U2 are
those of an undisturbed fit of the same bars and config in a fresh process (training is
reproducible: tests/test_training.py).

Every process the test started is stopped in a `finally`.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from ml.servers import sqlite_mlflow_server
from tests.dags.conftest import REPO, clean_env, migrate_airflow_db, pipeline_env, tail
from tests.dags.stack import DAG_ID, Stack, new_stack, write_universe
from tests.faults.fit_probe import HOLD_ENV, PROBE_DIR_ENV, fit_events, fit_started

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

DAY = date(2024, 6, 26)
LOGICAL_DATE = "2024-06-26T22:30:00+00:00"  # the cron 30 22 * * * slot of DAY
RUN_ID = "fault_kill__2024-06-26"
TICKERS = [("AMD", "stock"), ("EURUSD=X", "forex")]
# Where each ticker's first train try is killed.
KILL_IN = {"AMD": "fit", "EURUSD=X": "mlflow_run"}
RUN_CONF = {"model_kinds": ["gru"]}
EXPERIMENT = "airflow-kill"
# A fit of a fixed length (no early stop before the last epoch): a few seconds, a window the
# test can hit; the same settings for the killed try, its retry and the undisturbed fit.
MODEL = {"MODEL_MAX_EPOCHS": "150", "MODEL_PATIENCE": "150"}
KILL_AFTER_EPOCHS = 3  # the fit's first epochs (graph tracing included) are done
# Where the probe holds each kill point's first try until the kill (FIT_PROBE_HOLD).
HOLD_AT = {"fit": f"epoch-{KILL_AFTER_EPOCHS}", "mlflow_run": "run-open"}
DEADLINE_SECONDS = float(os.environ.get("AIRFLOW_KILL_TEST_TIMEOUT", "900"))


def _default_preload() -> str:
    """plugins/preloading_executor.py's DEFAULT_PRELOAD, read without importing Airflow here."""
    tree = ast.parse((REPO / "plugins" / "preloading_executor.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "DEFAULT_PRELOAD" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError("DEFAULT_PRELOAD not found in plugins/preloading_executor.py")


# --- the metadata DB, read-only ------------------------------------------------------------------


def _query(stack: Stack, sql: str, *params: Any) -> list[dict[str, Any]]:
    con = sqlite3.connect(f"file:{stack.metadata_db}?mode=ro", uri=True, timeout=60)
    con.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in con.execute(sql, params).fetchall()]
    finally:
        con.close()


def _run_state(stack: Stack) -> str | None:
    rows = _query(
        stack, "SELECT state FROM dag_run WHERE dag_id = ? AND run_id = ?", DAG_ID, RUN_ID
    )
    return rows[0]["state"] if rows else None


def _task_instances(stack: Stack) -> dict[tuple[str, int], dict[str, Any]]:
    rows = _query(
        stack,
        "SELECT id, task_id, map_index, state, try_number, pid FROM task_instance "
        "WHERE dag_id = ? AND run_id = ?",
        DAG_ID,
        RUN_ID,
    )
    return {(r["task_id"], r["map_index"]): r for r in rows}


def _train_order(stack: Stack) -> list[str] | None:
    """The tickers `train` maps over, in map-index order (plan_training's return value)."""
    rows = _query(
        stack,
        "SELECT value FROM xcom WHERE dag_id = ? AND run_id = ? AND task_id = 'plan_training' "
        "AND key = 'return_value' AND map_index = -1",
        DAG_ID,
        RUN_ID,
    )
    if not rows:
        return None
    value: Any = rows[0]["value"]
    while isinstance(value, (str, bytes)):  # stored JSON-encoded, possibly twice
        value = json.loads(value)
    return [order["ticker"] for order in value]


def _try_history(stack: Stack, map_index: int, try_number: int) -> dict[str, Any] | None:
    rows = _query(
        stack,
        "SELECT state, pid, try_number FROM task_instance_history WHERE dag_id = ? "
        "AND run_id = ? AND task_id = 'train' AND map_index = ? AND try_number = ?",
        DAG_ID,
        RUN_ID,
        map_index,
        try_number,
    )
    return rows[0] if rows else None


def _task_logs(stack: Stack, map_index: int) -> str:
    folder = stack.home / "logs" / f"dag_id={DAG_ID}" / f"run_id={RUN_ID}" / "task_id=train"
    parts = []
    for path in sorted((folder / f"map_index={map_index}").glob("attempt=*.log")):
        parts.append(f"--- {path.name} ---\n{tail(path, 4000)}")
    return "\n".join(parts) or f"(no task logs under {folder})"


# --- the task process -----------------------------------------------------------------------------


def _task_process(stack: Stack, ti: dict[str, Any]):
    """The process running try `ti` (a descendant of the scheduler whose pid is the TI's `pid`
    and whose title names the TI's id), or None while it is not there yet."""
    import psutil

    scheduler = psutil.Process(stack.processes["scheduler"].pid)
    for proc in scheduler.children(recursive=True):
        if proc.pid != ti["pid"]:
            continue
        try:
            title = " ".join(proc.cmdline()).strip()
        except psutil.NoSuchProcess:
            return None
        prefix = "airflow worker -- "
        if title.startswith(prefix):
            try:
                if uuid.UUID(title[len(prefix) :].split()[0]) == uuid.UUID(str(ti["id"])):
                    return proc
            except ValueError:
                return None  # still the supervisor's title ("LocalExecutor: ...")
    return None


def _describe(proc) -> str:
    parent = proc.parent()
    return (
        f"pid {proc.pid} '{' '.join(proc.cmdline()).strip()}', child of pid {parent.pid} "
        f"'{' '.join(parent.cmdline()).strip()}'"
    )


# --- the undisturbed reference --------------------------------------------------------------------

UNDISTURBED_FIT = """
import json, sys
from datetime import date
from ml.config import get_settings
from ml.steps.common import instrument_for, settings_with_overrides
from ml.data.store import PriceStore, data_fingerprint
from ml.model.training import train_on_history

day, conf = date.fromisoformat(sys.argv[1]), json.loads(sys.argv[2])
settings = settings_with_overrides(
    get_settings(), kinds=conf.get("model_kinds"), max_epochs=conf.get("max_epochs")
)
out = {}
for ticker in sys.argv[3:]:
    history = PriceStore(settings.data_dir).load(instrument_for(ticker, settings), until=day)
    result = train_on_history(ticker, day, history, settings.model)
    out[ticker] = {
        "data_fingerprint": data_fingerprint(history),
        "config_fingerprint": result.config_fingerprint,
        "test_u2": {t: float(v) for t, v in result.evaluation.u2().items()},
    }
print("UNDISTURBED " + json.dumps(out))
"""


def _undisturbed_env(root: Path, mlflow_uri: str) -> dict[str, str]:
    universe = write_universe(root / "universe.csv", TICKERS)
    return clean_env(
        **pipeline_env(
            root / "data",
            mlflow_uri,
            UNIVERSE_FILE=str(universe),
            MLFLOW_EXPERIMENT_NAME="undisturbed",
            **MODEL,
        )
    )


def _finished(proc: subprocess.Popen, log: Path, what: str, timeout: float = 600) -> str:
    proc.wait(timeout=timeout)
    output = log.read_text(errors="replace")
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{output[-4000:]}"
    return output


# --- the test -------------------------------------------------------------------------------------


def _inject(stack: Stack, client, probe_dir: Path) -> dict[str, dict[str, Any]]:
    """Wait for each ticker's first train try to reach its kill point, SIGKILL its process.

    The task processes are looked up (metadata DB, process table) once a second; the kill points
    of the processes found are checked every 20 ms (the probe's file; MLflow only once the probe
    holds the process in its run), so that a window of a second is not missed.
    """
    import psutil

    victims: dict[str, dict[str, Any]] = {}
    targets: dict[str, tuple[Any, dict[str, Any], int]] = {}  # ticker -> (process, TI, index)
    order: list[str] | None = None
    experiment_id: str | None = None
    deadline = time.monotonic() + DEADLINE_SECONDS
    next_lookup = 0.0
    while len(victims) < len(KILL_IN):
        if time.monotonic() >= next_lookup:
            next_lookup = time.monotonic() + 1.0
            stack.check_alive()
            state = _run_state(stack)
            assert state not in ("success", "failed"), (
                f"the run ended ({state}) before every kill was injected (killed: "
                f"{sorted(victims)}): the kill windows were missed\n{stack.diagnostics()}"
            )
            assert time.monotonic() < deadline, (
                f"no kill point reached in {DEADLINE_SECONDS:.0f} s (killed: {sorted(victims)})"
                f"\n{stack.diagnostics()}"
            )
            order = order or _train_order(stack)
            for (task_id, map_index), ti in _task_instances(stack).items():
                if task_id != "train" or order is None:
                    continue
                ticker = order[map_index]
                if ticker in victims or ticker in targets:
                    continue
                assert ticker in KILL_IN, (
                    f"plan_training sent {ticker} to train: not in the universe"
                )
                assert ti["state"] != "success", (
                    f"{ticker}: train succeeded before the test saw its kill point "
                    f"({KILL_IN[ticker]})\n{_task_logs(stack, map_index)}"
                )
                if ti["state"] == "running" and ti["try_number"] == 1 and ti["pid"]:
                    proc = _task_process(stack, ti)
                    if proc is not None:
                        targets[ticker] = (proc, ti, map_index)
        for ticker, (proc, ti, map_index) in list(targets.items()):
            if not proc.is_running():
                del targets[ticker]  # the try ended on its own: the next lookup says how
                continue
            events = fit_events(probe_dir, proc.pid)
            runs: list[Any] = []
            if KILL_IN[ticker] == "fit":
                assert "end" not in events, (
                    f"{ticker}: the fit ended before the test saw {KILL_AFTER_EPOCHS} epochs: "
                    f"{events}"
                )
                if "held" not in events:  # the probe holds it after that epoch
                    continue
            else:
                if "held" not in events:  # the probe holds it in its run (FIT_PROBE_HOLD)
                    continue
                if experiment_id is None:
                    experiment = client.get_experiment_by_name(EXPERIMENT)
                    if experiment is None:
                        continue
                    experiment_id = experiment.experiment_id
                runs = client.search_runs(
                    [experiment_id],
                    filter_string=f"tags.ticker = '{ticker}' and attributes.status = 'RUNNING'",
                )
                if not runs:
                    continue
            description = _describe(proc)
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = time.time()
            _, alive = psutil.wait_procs([proc], timeout=30)
            assert not alive, f"{ticker}: pid {proc.pid} survived SIGKILL"
            del targets[ticker]
            victims[ticker] = {
                "map_index": map_index,
                "ti_id": str(ti["id"]),
                "pid": proc.pid,
                "process": description,
                "fit_events": fit_events(probe_dir, proc.pid),
                "runs": [r.info.run_id for r in runs],
                # A SIGKILLed process cannot end its run: still RUNNING unless it had ended.
                "status_after_kill": {
                    r.info.run_id: client.get_run(r.info.run_id).info.status for r in runs
                },
            }
            since = (
                f"after epoch {victims[ticker]['fit_events'].count('epoch')} of "
                f"{MODEL['MODEL_MAX_EPOCHS']}, "
                f"{killed_at - fit_started(probe_dir, proc.pid):.2f} s after its fit started"
                if KILL_IN[ticker] == "fit"
                else f"{killed_at - runs[0].info.start_time / 1000:.2f} s after its run started"
            )
            print(f"{ticker}: SIGKILL in {KILL_IN[ticker]}, {since} -> {description}")
        time.sleep(0.02)
    return victims


@pytest.fixture(scope="module")
def airflow_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated metadata DB (tests/dags/conftest.py's fixture is not visible from here)."""
    return migrate_airflow_db(tmp_path_factory.mktemp("airflow_template"))


def test_sigkilled_train_tasks_are_retried_to_an_undisturbed_end(
    airflow_db_template: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from ml.data.store import PriceStore, data_fingerprint
    from ml.universe import load_universe

    started = time.monotonic()
    probe_dir = tmp_path / "fit_probe"
    probe_dir.mkdir()
    undisturbed = tmp_path / "undisturbed"
    undisturbed.mkdir()
    children: list[subprocess.Popen] = []
    with sqlite_mlflow_server(tmp_path / "mlflow") as mlflow_server:
        client = MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
        stack = new_stack(
            airflow_db_template,
            tmp_path / "stack",
            mlflow_uri=mlflow_server.uri,
            tickers=TICKERS,
            experiment=EXPERIMENT,
            PYTHONPATH=str(REPO),
            PRELOAD_MODULES=f"{_default_preload()},tests.faults.fit_probe",
            **{PROBE_DIR_ENV: str(probe_dir)},
            **{HOLD_ENV: ",".join(f"{t}:{HOLD_AT[where]}" for t, where in KILL_IN.items())},
            **MODEL,
        )
        ref_env = _undisturbed_env(undisturbed, mlflow_server.uri)
        try:
            # The undisturbed ingest of the same day, into another DATA_DIR (no MLflow needed).
            ingest_log = undisturbed / "ingest.log"
            with open(ingest_log, "wb") as log:
                ingest = subprocess.Popen(
                    [sys.executable, "-m", "ml", "ingest", "--date", DAY.isoformat()],
                    env=ref_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=undisturbed,
                )
            children.append(ingest)
            stack.boot()
            _finished(ingest, ingest_log, "the undisturbed `python -m ml ingest`")
            stack.cli(
                "dags",
                "trigger",
                DAG_ID,
                "--run-id",
                RUN_ID,
                "--logical-date",
                LOGICAL_DATE,
                "--conf",
                json.dumps(RUN_CONF),
            )
            victims = _inject(stack, client, probe_dir)
            kills_done = time.monotonic()

            # The undisturbed fit of the same bars and config, while Airflow waits out the
            # retry delay.
            fit_log = undisturbed / "fit.log"
            with open(fit_log, "wb") as log:
                fit = subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        UNDISTURBED_FIT,
                        DAY.isoformat(),
                        json.dumps(RUN_CONF),
                        *[t for t, _ in TICKERS],
                    ],
                    env=ref_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=undisturbed,
                )
            children.append(fit)

            deadline = time.monotonic() + DEADLINE_SECONDS
            while (state := _run_state(stack)) not in ("success", "failed"):
                stack.check_alive()
                assert time.monotonic() < deadline, (
                    f"run not done {DEADLINE_SECONDS:.0f} s after the kills\n{stack.diagnostics()}"
                )
                time.sleep(3)
            finished = time.monotonic()
            logs = "\n".join(
                f"=== {t} (train map_index {v['map_index']}) ===\n{_task_logs(stack, v['map_index'])}"
                for t, v in victims.items()
            )
            reference_out = _finished(fit, fit_log, "the undisturbed fit")
            reference = json.loads(
                next(
                    line for line in reference_out.splitlines() if line.startswith("UNDISTURBED ")
                ).split(" ", 1)[1]
            )

            # --- what the kills hit ---------------------------------------------------------
            for ticker, victim in victims.items():
                if KILL_IN[ticker] == "fit":
                    events = victim["fit_events"]
                    epochs = events.count("epoch")
                    assert events == ["start", *["epoch"] * epochs, "held"] and (
                        epochs == KILL_AFTER_EPOCHS < int(MODEL["MODEL_MAX_EPOCHS"])
                    ), (
                        f"{ticker}: the kill was meant to land in the middle of the keras fit, but "
                        f"pid {victim['pid']} recorded {events}"
                    )
                else:
                    events = victim["fit_events"]
                    assert (
                        events[0] == "start"
                        and events[-2:] == ["end", "held"]
                        and events.count("start") == 1
                    ), (
                        f"{ticker}: the kill was meant to land after the fit, inside the MLflow "
                        f"run; pid {victim['pid']} recorded {victim['fit_events']}"
                    )
                    assert set(victim["status_after_kill"].values()) == {"RUNNING"}, (
                        f"{ticker}: the kill was meant to leave the open run RUNNING, its run(s) "
                        f"were {victim['status_after_kill']} right after it: the kill missed"
                    )
                    statuses = {r: client.get_run(r).info.status for r in victim["runs"]}
                    assert set(statuses.values()) == {"FAILED"}, (
                        f"{ticker}: the run(s) the kill of pid {victim['pid']} left RUNNING are "
                        f"{statuses} after the retry: the retry must mark them FAILED "
                        f"(fail_orphan_runs)\n{logs}"
                    )

            # --- Airflow: the run, the killed tries, their retries ----------------------------
            assert state == "success", (
                f"the run ended {state} after the kills: the retries did not recover\n{logs}\n"
                f"{stack.diagnostics()}"
            )
            tis = _task_instances(stack)
            killed_keys = {("train", v["map_index"]) for v in victims.values()}
            for ticker, victim in victims.items():
                ti = tis[("train", victim["map_index"])]
                assert (ti["try_number"], ti["state"]) == (2, "success"), (
                    f"{ticker}: the killed train instance should have succeeded on try 2, it is "
                    f"try {ti['try_number']} {ti['state']}\n{logs}"
                )
                first = _try_history(stack, victim["map_index"], 1)
                assert first is not None and first["pid"] == victim["pid"], (
                    f"{ticker}: try 1 in task_instance_history should be the killed pid "
                    f"{victim['pid']}, found {first}"
                )
                assert first["state"] in ("up_for_retry", "failed"), (
                    f"{ticker}: the killed try 1 was recorded {first['state']}, not as a failure"
                )
            undisturbed_tries = {
                k: (v["try_number"], v["state"]) for k, v in tis.items() if k not in killed_keys
            }
            assert all(t == (1, "success") for t in undisturbed_tries.values()), (
                f"every task that was not killed should succeed on try 1: {undisturbed_tries}"
            )

            # --- MLflow: versions, aliases, runs, locks -----------------------------------------
            experiment = client.get_experiment_by_name(EXPERIMENT)
            assert experiment is not None, "no MLflow experiment: nothing was logged"
            runs = client.search_runs([experiment.experiment_id], max_results=1000)
            running = [
                (r.data.tags.get("ticker"), r.info.run_id)
                for r in runs
                if r.info.status == "RUNNING"
            ]
            assert not running, f"MLflow runs left RUNNING after the retries: {running}\n{logs}"
            universe = load_universe(stack.universe_file)
            ref_store = PriceStore(undisturbed / "data")
            versions_of: dict[str, Any] = {}
            for instrument in universe:
                ticker, name = instrument.ticker, instrument.model_name
                versions = client.search_model_versions(f"name = '{name}'")
                keys = Counter(
                    (v.tags.get("data_fingerprint"), v.tags.get("config_fingerprint"))
                    for v in versions
                )
                assert len(versions) == 1 and set(keys.values()) == {1}, (
                    f"{ticker}: expected exactly one version for one day, bars and config, found "
                    f"{[(v.version, v.tags.get('data_fingerprint')) for v in versions]}: a "
                    f"killed try registered a version the retry did not reuse\n{logs}"
                )
                (version,) = versions
                versions_of[ticker] = version
                assert version.tags.get("logical_date") == DAY.isoformat(), version.tags
                expected = reference[ticker]
                history = ref_store.load(instrument, until=DAY)
                assert (
                    version.tags.get("data_fingerprint")
                    == expected["data_fingerprint"]
                    == (data_fingerprint(history))
                ), f"{ticker}: the retry trained on other bars than an undisturbed ingest gives"
                assert version.tags.get("config_fingerprint") == expected["config_fingerprint"], (
                    f"{ticker}: the retry trained another config than the undisturbed fit"
                )
                u2 = json.loads(version.tags["test_u2"])
                assert u2.keys() == expected["test_u2"].keys() and all(
                    abs(u2[t] - expected["test_u2"][t]) <= 1e-5 for t in u2
                ), (
                    f"{ticker}: the retried model's test-block U2 {u2} differs from an "
                    f"undisturbed fit of the same bars and config {expected['test_u2']}"
                )
                for alias in ("champion", "challenger"):
                    holder = client.get_model_version_by_alias(name, alias)
                    assert holder.version == version.version, (
                        f"{ticker}: `{alias}` is on v{holder.version}, not on the one version "
                        f"v{version.version} (gate: {version.tags.get('gate_status')}, "
                        f"{version.tags.get('gate_reason')})"
                    )
                ticker_runs = [r for r in runs if r.data.tags.get("ticker") == ticker]
                done = [r.info.run_id for r in ticker_runs if r.info.status == "FINISHED"]
                assert done == [version.run_id], (
                    f"{ticker}: expected one FINISHED run, the version's {version.run_id}; "
                    f"found {[(r.info.run_id, r.info.status) for r in ticker_runs]}"
                )
                if KILL_IN[ticker] == "fit":  # killed before log_candidate: no run of try 1
                    assert len(ticker_runs) == 1, (
                        f"{ticker}: a kill inside the fit should leave no run; found "
                        f"{[(r.info.run_id, r.info.status) for r in ticker_runs]}"
                    )
            locks = [
                m.name for m in client.search_registered_models() if m.name.startswith("lock.")
            ]
            assert not locks, f"registry locks left after the run: {locks}"

            # --- DATA_DIR: report, forecasts, prices, temp files ---------------------------------
            data_dir = stack.data_dir
            report = json.loads((data_dir / "reports" / f"{DAY.isoformat()}.json").read_text())
            assert report["run_id"] == RUN_ID, report["run_id"]
            rows = {r["ticker"]: r["state"] for r in report["tickers"]}
            assert rows == {t: "done" for t, _ in TICKERS} and report["failed"] == [], (
                f"the run report should list every ticker done: {rows}, failed {report['failed']}"
            )
            import pandas as pd

            table = pd.read_csv(
                data_dir / "forecasts" / "forecasts.csv", dtype={"model_version": "string"}
            )
            today = table[table["logical_date"] == DAY.isoformat()]
            forecast_versions = dict(zip(today["ticker"], today["model_version"], strict=True))
            assert forecast_versions == {t: v.version for t, v in versions_of.items()}, (
                f"one forecast per ticker from its one version expected: {forecast_versions}"
            )
            temps = sorted(
                str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if ".tmp" in p.name
            )
            assert not temps, f"temp files left under DATA_DIR: {temps}"
            prices = sorted(p.name for p in (data_dir / "prices").glob("*.parquet"))
            ref_prices = sorted(p.name for p in (undisturbed / "data" / "prices").glob("*.parquet"))
            assert prices == ref_prices and len(prices) == len(TICKERS), (prices, ref_prices)
            for name in prices:
                assert (data_dir / "prices" / name).read_bytes() == (
                    undisturbed / "data" / "prices" / name
                ).read_bytes(), f"prices/{name} differs from the undisturbed ingest's"

            for path in sorted(probe_dir.glob("*.fit")):
                lines = [line.split() for line in path.read_text().splitlines()]
                epochs = sum(1 for line in lines if line[0] == "epoch")
                seconds = float(lines[-1][-1]) - float(lines[0][-1])
                how = "ended" if lines[-1][0] == "end" else "killed"
                print(f"fit of pid {path.stem}: {epochs} epochs in {seconds:.1f} s, {how}")
            print(
                f"airflow kill test: stack up and kills done after {kills_done - started:.0f} s, "
                f"run finished {finished - kills_done:.0f} s after the kills, "
                f"{time.monotonic() - started:.0f} s in all"
            )
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait(timeout=30)
            stack.stop()
