"""What a run left behind, read without going through Airflow: the metadata DB (SQLite,
read-only), and the MLflow runs (REST) with their `training_summary.json` artifacts."""

from __future__ import annotations

import base64
import contextlib
import json
import sqlite3
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DAG_ID = "price_forecast"


def parse_ts(value: Any) -> datetime | None:
    """A timestamp from the metadata DB (SQLite text) or the REST API, as an aware UTC datetime."""
    if value in (None, ""):
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    text = str(value).replace("Z", "+00:00").replace(" ", "T", 1)
    stamp = datetime.fromisoformat(text)
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def query(db: Path | str, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
    """Rows of `sql` (`?` placeholders) from the SQLite file `db`, or from the PostgreSQL database
    named `db` (the production topology's, scripts/services.py)."""
    if isinstance(db, str):
        import psycopg2.extras

        from scripts.services import pg_dsn

        conn = psycopg2.connect(pg_dsn(db))
        try:
            with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
                cur.execute(sql.replace("?", "%s"), args)
                return [dict(r) for r in cur.fetchall()]
        finally:
            conn.close()
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql, args).fetchall()]
    finally:
        conn.close()


def dag_run(db: Path, run_id: str) -> dict[str, Any]:
    sql = "SELECT run_id, state, queued_at, start_date, end_date FROM dag_run WHERE dag_id = ? AND run_id = ?"
    rows = query(db, sql, (DAG_ID, run_id))
    return rows[0] if rows else {}


def task_instances(db: Path, run_id: str) -> list[dict[str, Any]]:
    columns = "id, task_id, map_index, rendered_map_index, state, try_number, start_date, "
    columns += "end_date, duration, queued_dttm, scheduled_dttm, pid"
    sql = f"SELECT {columns} FROM task_instance WHERE dag_id = ? AND run_id = ?"
    rows = query(db, sql, (DAG_ID, run_id))
    for row in rows:
        row["id"] = str(row["id"]).replace("-", "").lower()
    return rows


def xcom(db: Path, run_id: str, task_id: str) -> Any:
    """A task's return value in a run (None if absent); Airflow stores it as JSON text."""
    sql = "SELECT value FROM xcom WHERE dag_id = ? AND run_id = ? AND task_id = ? AND key = ? AND map_index = -1"
    rows = query(db, sql, (DAG_ID, run_id, task_id, "return_value"))
    value = rows[0]["value"] if rows else None
    while isinstance(value, str | bytes):  # JSON column holding the serialized value
        try:
            value = json.loads(value)
        except ValueError:
            break
    return value


def _mlflow(uri: str, path: str, body: dict | None = None, login: tuple | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if login:
        token = base64.b64encode(":".join(login).encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    req = urllib.request.Request(f"{uri}/api/2.0/mlflow/{path}", data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read().decode() or "{}")


def _fit_seconds(artifacts: Path) -> tuple[float | None, float | None]:
    """The Keras fit seconds of a train run and, of them, its first step and validation pass
    (the graph traces: `CandidateResult.trace_seconds`), from its training_summary.json."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        candidates = json.loads((artifacts / "training_summary.json").read_text())["candidates"]
        return (
            sum(float(c["seconds"]) for c in candidates),
            sum(float(c.get("trace_seconds", 0.0)) for c in candidates),
        )
    return None, None


def _stamp(ms: Any) -> datetime | None:
    return datetime.fromtimestamp(int(ms) / 1000, UTC) if ms else None


def mlflow_runs(uri: str, artifacts_dir: Path, experiment: str = "price-forecast",
                login: tuple[str, str] | None = None) -> list[dict]:  # fmt: skip
    """Every run of the experiment: id, ticker, logical date, start, end, the fit seconds and
    the traces' share of them (`login`: the server's basic auth, if it has one)."""
    try:
        found = _mlflow(uri, f"experiments/get-by-name?experiment_name={experiment}", None, login)
        exp_id = found["experiment"]["experiment_id"]
    except (urllib.error.URLError, KeyError, json.JSONDecodeError):
        return []
    runs: list[dict[str, Any]] = []
    body: dict[str, Any] = {"experiment_ids": [exp_id], "max_results": 1000}
    while True:
        page = _mlflow(uri, "runs/search", body, login)
        for run in page.get("runs", []):
            info = run["info"]
            tags = {t["key"]: t["value"] for t in run.get("data", {}).get("tags", [])}
            fit, trace = _fit_seconds(artifacts_dir / exp_id / info["run_id"] / "artifacts")
            runs.append(
                {
                    "run_id": info["run_id"],
                    "ticker": tags.get("ticker"),
                    "logical_date": tags.get("logical_date"),
                    "start": _stamp(info["start_time"]),
                    "end": _stamp(info.get("end_time")),
                    "fit_seconds": fit,
                    "trace_seconds": trace,
                }
            )
        body["page_token"] = page.get("next_page_token")
        if not body["page_token"]:
            return runs
