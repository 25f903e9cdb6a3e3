"""What the fault scenarios share: a day run by `python -m ml run` in a child process, and a
snapshot of what it left (store files, registry, runs, forecasts) to compare with an undisturbed
day.

The child is the real CLI (`ml.cli.run_day`: the DAG's steps in one process) on synthetic bars and
small models. `ML_FAULT_KILL_AT=<point>` makes it SIGKILL itself at that point (`ml/faults.py`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml.config import without_pipeline_env
from tests.dags.conftest import pipeline_env

REPO = Path(__file__).resolve().parents[2]
DAY = "2024-06-27"
EXPERIMENT = "faults"


def day_env(root: Path, mlflow_uri: str, tickers: list[str], **extra: str) -> dict[str, str]:
    """A store and a universe of made-up stock `tickers` under `root`, small fast models."""
    universe = root / "universe.csv"
    if not universe.exists():
        root.mkdir(parents=True, exist_ok=True)
        universe.write_text(
            "ticker,asset_class,name\n" + "".join(f"{t},stock,{t}\n" for t in tickers)
        )
    return {
        **without_pipeline_env(os.environ),
        "PYTHONPATH": str(REPO),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        **pipeline_env(
            root / "data",
            mlflow_uri,
            UNIVERSE_FILE=str(universe),
            MLFLOW_EXPERIMENT_NAME=EXPERIMENT,
            MODEL_KINDS="gru",
            MODEL_MAX_EPOCHS="3",
            **extra,
        ),
    }


def start_day(
    env: dict[str, str], *, kill_at: str | None = None, day: str = DAY
) -> subprocess.Popen:
    """`python -m ml run --date day` started in a child process (SIGKILLed at `kill_at` if given)."""
    env = dict(env)
    if kill_at:
        env["ML_FAULT_KILL_AT"] = kill_at
    return subprocess.Popen(
        [sys.executable, "-m", "ml", "run", "--date", day],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 900) -> subprocess.CompletedProcess:
    """Wait for a day started by `start_day`; its exit status and output (killed on timeout)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_day(
    env: dict[str, str], *, kill_at: str | None = None, day: str = DAY, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`python -m ml run --date day` in a child process, to its end."""
    return finish(start_day(env, kill_at=kill_at, day=day), timeout)


def killed(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode == -signal.SIGKILL


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


@dataclass
class DayState:
    """What a day left behind, in a form two stores can be compared by."""

    files: dict[str, bytes]  # store files that must be byte-identical, by relative path
    temp_files: list[str]  # leftovers of atomic writes (must be none)
    staging: list[str]  # staged batches not published (must be none)
    versions: list[dict[str, Any]]  # one per registered version of each ticker's model
    aliases: dict[str, dict[str, str | None]]  # model -> alias -> version
    run_status: dict[str, int]  # MLflow run status -> count
    forecasts: list[dict[str, Any]]  # the ledger's forecasts (what it predicted, not when)
    exported: list[dict[str, Any]]  # the forecasts CSV export


def snapshot(env: dict[str, str], tickers: list[str]) -> DayState:
    from mlflow import MlflowClient

    from ml.config import get_settings
    from ml.forecasts.export import read_forecasts
    from ml.forecasts.ledger import read_table
    from ml.universe import load_universe

    settings = get_settings(env)
    root = settings.data_dir
    universe = load_universe(settings.universe_file)
    slugs = [universe.get(t).slug for t in tickers]
    paths = [root / "prices" / f"{slug}.parquet" for slug in slugs]
    paths += [p for slug in slugs for p in sorted((root / "validation" / slug).rglob("*"))]
    files = {str(p.relative_to(root)): p.read_bytes() for p in paths if p.is_file()}
    temp_files = [str(p.relative_to(root)) for p in root.rglob(".*.tmp")]
    staging = [str(p.relative_to(root)) for p in (root / "staging").rglob("*") if p.is_file()]
    client = MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)
    versions, aliases = [], {}
    for ticker in tickers:
        name = universe.get(ticker).model_name
        for mv in client.search_model_versions(f"name = '{name}'"):
            keep = ("ticker", "logical_date", "data_fingerprint", "config_fingerprint")
            versions.append(
                {
                    "version": mv.version,
                    **{k: mv.tags.get(k) for k in keep},
                    "gate_status": mv.tags.get("gate_status"),
                    "model_kind": mv.tags.get("model_kind"),
                }
            )
        aliases[name] = {a: _alias(client, name, a) for a in ("champion", "challenger")}
    experiment = client.get_experiment_by_name(EXPERIMENT)
    run_status: dict[str, int] = {}
    if experiment is not None:
        for run in client.search_runs([experiment.experiment_id], max_results=1000):
            if run.data.tags.get("ticker") in tickers:
                run_status[run.info.status] = run_status.get(run.info.status, 0) + 1
    ledger = read_table(settings, "forecasts")
    ledger = ledger.loc[ledger["ticker"].isin(tickers)]
    columns = ["ticker", "logical_date", "last_bar_date", "model_version"]
    predicted = [c for c in ledger.columns if c.startswith("pred_")]
    forecasts = ledger[columns + predicted].sort_values(columns).to_dict("records")
    csv = read_forecasts(settings)
    csv = csv.loc[csv["ticker"].isin(tickers)]
    exported = csv[[c for c in columns + predicted if c in csv.columns]].to_dict("records")
    return DayState(files, temp_files, staging, versions, aliases, run_status, forecasts, exported)


def _alias(client: Any, name: str, alias: str) -> str | None:
    from ml.registry.client import get_alias

    mv = get_alias(client, name, alias)
    return None if mv is None else str(mv.version)
