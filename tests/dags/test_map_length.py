"""No hidden wall at `[core] max_map_length`: a 5,000-ticker universe passes `validate` and maps
`train` with the setting as every launcher sets it, and a universe over the configured limit fails
in resolve_tickers with a message naming the setting (instead of failing `validate` after the
whole data phase with Airflow's "pushed value is too large to map").

`dag.test()` runs in a subprocess (`map_probe.py`: the data phase stubbed cheap, `train` marked
success instead of fitting models); validate's list goes through Airflow's own length check.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from ml.config import AIRFLOW_MAX_MAP_LENGTH
from scripts.launcher import TUNABLE
from scripts.launcher import airflow_env as launcher_env
from tests.dags.conftest import HERE, REPO, airflow_env, new_airflow_home, tail
from tests.dags.stack import write_universe

SETTING = "AIRFLOW__CORE__MAX_MAP_LENGTH"
UNIVERSE_SIZE = 5_000


def _run_probe(template: Path, work: Path, tickers: int, **env: str) -> dict[str, Any]:
    home = new_airflow_home(template, work / "airflow")
    universe = write_universe(
        work / "universe.csv", [(f"T{i:04d}", "stock") for i in range(tickers)]
    )
    out, log = work / "probe.json", work / "probe.log"
    with open(log, "wb") as fh:
        proc = subprocess.run(
            [sys.executable, str(HERE / "map_probe.py"), str(out)],
            env=airflow_env(
                home,
                DATA_DIR=str(work / "data"),
                UNIVERSE_FILE=str(universe),
                PRICE_SOURCE="synthetic",
                **env,
            ),
            stdout=fh,
            stderr=subprocess.STDOUT,
            timeout=900,
            check=False,
        )
    assert proc.returncode == 0 and out.exists(), f"map_probe failed:\n{tail(log)}"
    return {**json.loads(out.read_text()), "log": log.read_text(errors="replace")}


def test_every_launcher_sets_a_limit_above_the_universe_tested() -> None:
    assert AIRFLOW_MAX_MAP_LENGTH >= UNIVERSE_SIZE
    assert TUNABLE[SETTING] == str(AIRFLOW_MAX_MAP_LENGTH)
    # The native topology's base has the caller's Airflow settings stripped: the default applies.
    env = launcher_env(
        Path("/nonexistent"), api_port=1, mlflow_uri="x", data_dir=Path("/x"), token="t", base={}
    )
    assert env[SETTING] == str(AIRFLOW_MAX_MAP_LENGTH)
    assert airflow_env(Path("/nonexistent"))[SETTING] == str(AIRFLOW_MAX_MAP_LENGTH)
    compose = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
    common = compose["x-airflow-common"]["environment"]
    assert common[SETTING] == str(AIRFLOW_MAX_MAP_LENGTH)


def test_a_5000_ticker_universe_passes_validate_and_maps_train(
    airflow_db_template: Path, tmp_path: Path
) -> None:
    probe = _run_probe(airflow_db_template, tmp_path, UNIVERSE_SIZE)
    assert probe["tasks"]["plan_training"] == {"success": 1}, probe["log"][-6000:]
    assert probe["tasks"]["train"] == {"success": UNIVERSE_SIZE}
    assert probe["train_map_indexes"] == list(range(UNIVERSE_SIZE))
    assert probe["state"] == "success"


def test_a_universe_over_the_limit_fails_early_naming_the_setting(
    airflow_db_template: Path, tmp_path: Path
) -> None:
    probe = _run_probe(airflow_db_template, tmp_path, 5, **{SETTING: "3"})
    assert probe["tasks"]["resolve_tickers"] == {"failed": 1}
    assert "ingest" not in probe["tasks"] or "success" not in probe["tasks"]["ingest"]
    assert (
        "5 tickers to run, more than Airflow's [core] max_map_length=3 that train can map over: "
        "set AIRFLOW__CORE__MAX_MAP_LENGTH to at least 5" in probe["log"]
    )
    assert probe["state"] == "failed"
