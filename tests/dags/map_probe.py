"""Run `price_forecast` up to the mapping of `train` with `dag.test()` in THIS process; write JSON.

    python tests/dags/map_probe.py OUT.json

The environment gives AIRFLOW_HOME, the DAG folder, UNIVERSE_FILE and `[core] max_map_length`
(Airflow reads its configuration at import). The data phase is made cheap: `ingest_all` stages
nothing, `publish_all` publishes every ticker with new bars and no version is looked up, so
what runs for real is the DAG's wiring, resolve_tickers' own check, plan_training and
Airflow's: plan_training's list goes through the execution
API's length check, and the scheduler loop of `dag.test()` expands `train` over it. `train` is
marked success instead of run (`mark_success_pattern`): its expansion is what is tested, not
thousands of model fits. promote, forecast and report are left out (a subset of the DAG).

OUT gets the run's state and, per task, the states of its instances and how many there are, plus
the log of resolve_tickers' failure when there is one.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path


def _stub_data_phase() -> None:
    import ml.steps.data as data
    from ml.steps.records import Publication, Published, Registered

    def ingest_all(tickers, as_of, settings, **_):
        day = as_of.isoformat()
        batch = {"as_of": day, "start": day, "end": day, "rows_fetched": 1}
        batch |= {"incremental": True, "source": "stub"}
        return {"staged": {t: {"ticker": t, **batch} for t in tickers}, "failed": {}}

    def publish_all(staged, as_of, settings):
        day = as_of.isoformat()
        return Published(
            {t: Publication(1, 0, 1, day, "passed", 0, "stub", day) for t in staged}, {}
        )

    def registered_versions(published, as_of, settings, **_):
        return Registered({}, {}, {})

    data.ingest_all = ingest_all
    data.publish_all = publish_all
    data.registered_versions = registered_versions


def main(out_path: str) -> int:
    import os

    from airflow.dag_processing.dagbag import DagBag

    _stub_data_phase()
    bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    dag = bag.dags["price_forecast"].partial_subset(
        ["train"], include_upstream=True, include_downstream=False
    )
    dr = dag.test(
        logical_date=datetime(2024, 6, 14, 22, 30, tzinfo=UTC), mark_success_pattern="train"
    )
    tis = dr.get_task_instances()
    states: dict[str, Counter] = {}
    for ti in tis:
        states.setdefault(ti.task_id, Counter())[str(getattr(ti.state, "value", ti.state))] += 1
    out = {
        "state": str(getattr(dr.state, "value", dr.state)),
        "tasks": {task: dict(counts) for task, counts in states.items()},
        "train_map_indexes": sorted(ti.map_index for ti in tis if ti.task_id == "train"),
    }
    Path(out_path).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
