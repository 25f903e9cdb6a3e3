"""A real Airflow 3 stack as subprocesses, for the tests that go through the scheduler.

`new_stack` prepares a temp AIRFLOW_HOME (a copy of the migrated template DB), a universe file, a
DATA_DIR and the environment (scripts/launcher.py's `embedded_env`, as `make demo`'s stack, with
the test's settings); `Stack.boot` starts `airflow api-server` (LocalExecutor tasks report to its
execution API), `airflow dag-processor` and `airflow scheduler` (the project's
`plugins/preloading_executor.py` LocalExecutor on the SQLite metadata DB), imports the pools,
waits until the DAG is parsed and unpauses it. `Stack.stop` (scripts/launcher.py's) stops every
process it started and their descendants; call it in a `finally`.

Used by the backfill test (tests/dags/test_backfill.py) and the fault tests (tests/faults/).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ml.servers import free_port
from scripts.launcher import DAG_ID, PRELOADING_EXECUTOR, AirflowStack, embedded_env
from tests.dags.conftest import clean_env, new_airflow_home, pipeline_env

__all__ = ["DAG_ID", "Stack", "new_stack", "write_universe"]


@dataclass
class Stack(AirflowStack):
    universe_file: Path | None = None

    @property
    def metadata_db(self) -> Path:
        return self.home / "airflow.db"

    def boot(self, timeout: float = 180) -> None:
        """Start api-server, dag-processor and scheduler, import the pools, wait until the DAG
        is parsed and unpause it."""
        self.start("api-server", "dag-processor", "scheduler")
        self.import_pools()
        self.wait_healthy(timeout)
        # The DAG must be parsed (by the dag-processor) before it can be unpaused; note that
        # `airflow dags unpause` exits 0 ("No paused DAGs were found") for an unknown DAG.
        self.wait_for_dag(timeout)
        self.unpause()
        assert str(self.dags()[DAG_ID]["is_paused"]) == "False"


def write_universe(path: Path, tickers: list[tuple[str, str]]) -> Path:
    """A universe file of (ticker, asset class) pairs."""
    path.write_text("ticker,asset_class,name\n" + "".join(f"{t},{c},{t}\n" for t, c in tickers))
    return path


def new_stack(
    template_db: Path,
    work: Path,
    *,
    mlflow_uri: str,
    tickers: list[tuple[str, str]],
    experiment: str,
    **overrides: str,
) -> Stack:
    """A stack on `work` (AIRFLOW_HOME, logs, universe, DATA_DIR), not started yet.

    `overrides` are added to the environment of every process (pipeline settings, test hooks).
    """
    new_airflow_home(template_db, work / "airflow")
    universe = write_universe(work / "universe.csv", tickers)
    stack = Stack(work, universe_file=universe)
    stack.env = embedded_env(
        work,
        api_port=free_port(),
        mlflow_uri=mlflow_uri,
        token=stack.token,
        # The embedded stack's executor: LocalExecutor workers that preload TF/MLflow/GX.
        executor=PRELOADING_EXECUTOR,
        base=clean_env(),
        AIRFLOW__CORE__PARALLELISM="3",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True",
        # Only the runs the test creates: no scheduled run for "today" once the DAG is unpaused.
        AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="False",
        AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
        **pipeline_env(
            work / "data",
            mlflow_uri,
            UNIVERSE_FILE=str(universe),
            MLFLOW_EXPERIMENT_NAME=experiment,
            **overrides,
        ),
    )
    return stack
