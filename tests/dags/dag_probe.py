"""Describe the DAG folder as JSON (run in a subprocess: Airflow configures itself on import).

    python tests/dags/dag_probe.py DAGS_FOLDER OUT.json            # DagBag + DAG structure
    python tests/dags/dag_probe.py --parse-time DAG_FILE OUT.json  # cost of parsing the file

The first form loads the folder with Airflow's DagBag and records the import errors and, for
`price_forecast`, the DAG attributes and every task's settings (for mapped tasks the operator's
partial kwargs). The second form imports `airflow.sdk` first, as the dag-processor has, then times
the import of the DAG file alone and lists the heavy libraries it pulled in.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HEAVY = (
    "tensorflow",
    "keras",
    "mlflow",
    "great_expectations",
    "pandas",
    "numpy",
    "pyarrow",
    "matplotlib",
    "sklearn",
    "yfinance",
)


def parse_time(dag_file: str) -> dict:
    import importlib.util

    t0 = time.perf_counter()
    import airflow.sdk  # noqa: F401  (already loaded in a dag-processor)

    airflow_seconds = time.perf_counter() - t0
    before = set(sys.modules)
    t1 = time.perf_counter()
    spec = importlib.util.spec_from_file_location("price_forecast_parse_probe", dag_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag_seconds = time.perf_counter() - t1
    new = sorted({m.split(".")[0] for m in set(sys.modules) - before})
    return {
        "airflow_import_seconds": airflow_seconds,
        "dag_file_seconds": dag_seconds,
        "heavy_loaded": [m for m in HEAVY if m in sys.modules],
        "new_top_level_modules": new,
    }


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def _task_info(task) -> dict:
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    mapped = isinstance(task, MappedOperator)
    kwargs = dict(task.partial_kwargs) if mapped else {}

    def attr(name):
        if mapped and name in kwargs:
            return kwargs[name]
        return getattr(task, name, None)

    timeout = attr("execution_timeout")
    outlets = attr("outlets") or []
    return {
        "task_id": task.task_id,
        "mapped": mapped,
        "retries": attr("retries"),
        "execution_timeout": timeout.total_seconds() if timeout is not None else None,
        "trigger_rule": str(getattr(attr("trigger_rule"), "value", attr("trigger_rule"))),
        "pool": attr("pool"),
        "map_index_template": attr("map_index_template"),
        "multiple_outputs": attr("multiple_outputs"),
        "outlets": [
            {
                "type": type(o).__name__,
                "name": getattr(o, "name", None),
                "uri": getattr(o, "uri", None),
            }
            for o in outlets
        ],
        "upstream": sorted(task.upstream_task_ids),
        "downstream": sorted(task.downstream_task_ids),
    }


def describe(dags_folder: str) -> dict:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=dags_folder)
    out: dict = {
        "import_errors": {str(k): str(v) for k, v in bag.import_errors.items()},
        "dag_ids": sorted(bag.dag_ids),
    }
    dag = bag.dags.get("price_forecast")  # get_dag() would query the metadata DB
    if dag is None:
        return out
    timetable = dag.timetable
    params = {}
    for name in dag.params:
        param = dag.params.get_param(name)
        params[name] = {"default": _jsonable(param.value), "schema": _jsonable(param.schema)}
    out["dag"] = {
        "dag_id": dag.dag_id,
        "timetable": type(timetable).__name__,
        "timetable_summary": getattr(timetable, "summary", None),
        "timetable_expression": getattr(timetable, "_expression", None),
        "timetable_timezone": str(getattr(timetable, "_timezone", "")),
        "schedule": repr(dag.schedule),
        "start_date": str(dag.start_date),
        "catchup": dag.catchup,
        "max_active_runs": dag.max_active_runs,
        "tags": sorted(dag.tags),
        "doc_md": dag.doc_md,
        "fileloc": dag.fileloc,
        "params": params,
        "tasks": {t.task_id: _task_info(t) for t in dag.tasks},
    }
    return out


def main(argv: list[str]) -> int:
    if argv[0] == "--parse-time":
        result = parse_time(argv[1])
        Path(argv[2]).write_text(json.dumps(result))
    else:
        Path(argv[1]).write_text(json.dumps(describe(argv[0]), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
