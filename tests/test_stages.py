"""The day declared once (ml.pipeline): its stages hand each other typed records whose plain
form survives XCom, the DAG runs one task per stage with no sideways pull, and the command line
walks the same declaration."""

from __future__ import annotations

import ast
import inspect
import json
import typing
from datetime import date
from pathlib import Path

from ml import pipeline
from ml.data.ingest import StagedBatch
from ml.registry.gate import PromotionDecision
from ml.steps import records as r

REPO = Path(__file__).resolve().parent.parent


def _day() -> r.DayResults:
    figures = r.IntervalFigures(160, (0.84, 0.96), {"close_90": 0.9}, 0.95, 0.93, {"p_worse": 0.7})
    return r.DayResults(
        request=r.DayRequest(date(2024, 6, 28), ("AMD", "SPY"), True, False, ("har",), 3),
        ingested=r.Ingested(
            {"AMD": StagedBatch("AMD", "2024-06-28", "2024-06-20", "2024-06-28", 6, True, "x")},
            {"SPY": "YahooError: 429"},
        ),
        published=r.Published(
            {"AMD": r.Publication(6, 0, 900, "2024-06-28", "passed", 32, "ab" * 8, "2024-06-28")},
            {},
        ),
        registered=r.Registered(
            {"AMD": r.Coverage("3", "2024-06-27", None, {"High": 0.8}, {"High": 0.97}, figures)},
            {},
            {"AMD": r.RetrainAsk("live U2 High 1.02 >= 1", "2024-06-27")},
        ),
        orders=(r.TrainOrder("AMD", "new or revised bars", 7),),
        trained=r.Trained(
            (r.TrainOutcome("AMD", "trained", "4", "run", "ok", {"High": 0.8}, {}, figures),),
            {},
        ),
        promoted=r.Promoted(
            {"AMD": PromotionDecision("AMD", "4", True, "first champion", None, 0.8, None)}, {}
        ),
        forecasted=r.Forecasted(
            {
                "AMD": r.ForecastRecord(
                    "AMD", "2024-06-28", "2024-06-28", 160.0, 162.0, 158.0, 160.1, 160.1,
                    "price-forecast-amd", "4", "synthetic", {"pred_close_q05": 155.0},
                )
            },
            (),
            (),
            {},
            {"AMD": r.Watch({"n": 12.0, "u2_high": 0.9}, False, None)},
            {"AMD": "har"},
        ),
        step_errors={"forecast": "boom"},
    )  # fmt: skip


def test_every_record_survives_its_plain_form() -> None:
    """What a DAG task returns goes through XCom as JSON and comes back as the same record."""
    day = _day()
    plain = json.loads(json.dumps(r.to_plain(day)))
    assert r.from_plain(r.DayResults, plain) == day
    orders = json.loads(json.dumps(r.to_plain(day.orders)))
    assert r.from_plain(tuple[r.TrainOrder, ...], orders) == day.orders
    assert r.from_plain(r.Registered, None) is None  # a task that returned nothing


def test_a_forecast_record_is_the_ledger_row_it_came_from() -> None:
    from ml.model.quantiles import RECORD_KEYS

    record = r.forecast_record(r.forecast_row(_day().forecasted.forecasts["AMD"]))
    assert tuple(record.quantiles) == RECORD_KEYS  # every column, None where the model had none
    assert (
        record.quantiles["pred_close_q05"] == 155.0 and record.quantiles["pred_close_q95"] is None
    )
    assert r.forecast_record(r.forecast_row(record)) == record


def _stage_types() -> dict[str, dict[str, typing.Any]]:
    stages = {name: getattr(pipeline, name) for name in pipeline.STAGES if name != "report"}
    del stages["resolve_tickers"]  # takes the run's params
    return {name: typing.get_type_hints(fn) for name, fn in stages.items()}


def test_stages_take_and_return_records_not_dicts() -> None:
    """No `dict[str, Any]` passes between stages: every input a stage takes from another and
    every result is a record of ml.steps.records (or a tuple of them)."""

    def is_record(kind: typing.Any) -> bool:
        args = [a for a in typing.get_args(kind) if a is not type(None) and a is not Ellipsis]
        if args:
            return all(is_record(a) for a in args)
        return inspect.isclass(kind) and getattr(kind, "__module__", "") == r.__name__

    for name, hints in _stage_types().items():
        for arg, kind in hints.items():
            if arg in ("settings", "strict"):
                continue
            assert is_record(kind), f"{name}({arg}: {kind})"
    assert set(pipeline.STAGES) >= {"validate_and_publish", "find_versions", "plan_training"}


def test_the_dag_runs_one_task_per_stage_and_pulls_nothing_sideways() -> None:
    source = (REPO / "dags" / "price_forecast.py").read_text()
    assert "xcom_pull" not in source
    tree = ast.parse(source)
    tasks = [
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef)
        and any("task" in ast.unparse(d) for d in node.decorator_list)
    ]
    assert tasks == list(pipeline.STAGES)


def test_the_command_line_walks_the_same_declaration() -> None:
    """`python -m ml run` is `ml.pipeline.run_day`: the CLI holds no stage of its own."""
    source = (REPO / "ml" / "cli.py").read_text()
    for call in ("ingest_all", "validate_all", "promote_all", "forecast_all", "summarize_day"):
        assert call not in source.split("def run_day(")[1].split("\ndef ")[0], call
    body = inspect.getsource(pipeline.run_day)
    for stage in pipeline.STAGES[1:]:
        assert stage.split("_")[0] in body, stage
