"""Run `price_forecast` with `dag.test()` in THIS process and write what happened as JSON.

    python tests/dags/dag_runner.py SPEC.json OUT.json

SPEC is {"dags_folder": "...", "runs": [{"logical_date": "<ISO datetime>", "conf": {...}}, ...]}.
The runs execute one after the other in the same process (imports of TensorFlow, GX and MLflow
are paid once). Airflow reads its configuration when it is imported, so the caller passes
AIRFLOW_HOME, the DAG folder and the pipeline settings (DATA_DIR, MLFLOW_TRACKING_URI, ...) in the
environment of this process; each task reads the pipeline settings from that same environment.

OUT gets, per run: the exception if `dag.test()` raised (e.g. a ParamValidationError at trigger),
else the run's id and state and every task instance (task_id, map_index, rendered_map_index,
state), plus the run report `DATA_DIR/reports/<D>.json` as it was right after that run (the next
run for the same date overwrites the file). OUT is rewritten after every run.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from datetime import date, datetime
from pathlib import Path


def _report_after(as_of: date) -> dict | None:
    path = Path(os.environ["DATA_DIR"]) / "reports" / f"{as_of.isoformat()}.json"
    return json.loads(path.read_text()) if path.exists() else None


def main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(out_path)
    results: list[dict] = []

    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=spec["dags_folder"])
    header = {
        "import_errors": {str(k): str(v) for k, v in bag.import_errors.items()},
        "runs": results,
    }
    dag = bag.dags.get("price_forecast")  # get_dag() would query the metadata DB
    if dag is None:
        out.write_text(json.dumps({**header, "error": "price_forecast not in the DagBag"}))
        return 2

    for run in spec["runs"]:
        logical_date = datetime.fromisoformat(run["logical_date"])
        conf = run.get("conf") or {}
        as_of = date.fromisoformat(conf["as_of"]) if conf.get("as_of") else logical_date.date()
        record: dict = {"logical_date": run["logical_date"], "conf": conf}
        print(f"=== dag_runner: dag.test({run['logical_date']}, {conf}) ===", flush=True)
        started = time.monotonic()
        try:
            dr = dag.test(logical_date=logical_date, run_conf=conf)
        except Exception as exc:
            record["exception"] = {
                "type": type(exc).__name__,
                "message": str(exc),
                "traceback": traceback.format_exc(),
            }
        else:
            record["run_id"] = dr.run_id
            record["state"] = str(getattr(dr.state, "value", dr.state))
            record["task_instances"] = [
                {
                    "task_id": ti.task_id,
                    "map_index": ti.map_index,
                    "rendered_map_index": ti.rendered_map_index,
                    "state": str(getattr(ti.state, "value", ti.state)),
                }
                for ti in dr.get_task_instances()
            ]
        record["seconds"] = round(time.monotonic() - started, 1)
        record["report"] = _report_after(as_of)
        results.append(record)
        out.write_text(json.dumps(header, indent=2, default=str))
        print(f"=== dag_runner: done in {record['seconds']} s ===", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
