"""One pipeline step for one ticker in a fresh process, without Airflow (`ml.steps.*.*_step`: the
DAG's train instances run `train_step` for one ticker; its other tasks run the batch versions).

    python [-X importtime] bench/profile_steps.py STEP TICKER AS_OF OUT.json
        [--trained TRAINED.json] [--cprofile]

STEP is ingest | publish | train | promote | forecast. Settings come from the environment, as in a
task (DATA_DIR, MLFLOW_TRACKING_URI, MODEL_*, ...). Records the step's result and its time. The
step is framed on stderr by BENCH-STEP-START / BENCH-STEP-END lines, so that the caller can read the
imports made inside it from `-X importtime`. With --cprofile, the step runs under cProfile (which
slows Python-heavy code, imports most) and the calls with the most cumulative and own time are
recorded as well.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

T0 = time.perf_counter()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchlib import ROOT, write_json  # noqa: E402

# Import machinery and module bodies: the imports are measured with -X importtime instead.
_SKIP = (
    "importlib._bootstrap",
    "<frozen importlib",
    "<built-in method builtins.exec>",
    "<built-in method builtins.__import__>",
    "<module>",
)


# Calls worth naming in the report, whatever their rank (matched by function name, in the project,
# MLflow, Keras or GX): where a step's time goes beyond "the step".
_WATCHED = """
    stage_ticker publish_staged validate_prices publish train_on_history fit_candidate fit predict
    evaluate reuse_outcome registry_lock log_candidate _plot_test_block log_figure log_model
    _validate_serving_input infer_signature register_model set_registered_model_alias
    search_model_versions code_version save promote_if_better rescore_u2 load_forecaster
    load_model warn_dependency_requirement_mismatches download_artifacts configure_tensorflow
    champion_as_of forecast_all forecast_row predict_frame read_forecasts upsert_forecasts
"""
WATCH = set(_WATCHED.split())
_WATCH_FILES = ("/ml/", "mlflow/", "keras/", "great_expectations/")


def _name(key: tuple) -> str:
    filename, line, func = key
    for marker in ("site-packages/", str(ROOT) + "/"):
        if marker in filename:
            filename = filename.split(marker, 1)[1]
    return f"{filename}:{line}({func})"


def run_step(args: argparse.Namespace) -> Any:
    from ml.config import get_settings
    from ml.steps.data import ingest_step, publish_step
    from ml.steps.forecast import forecast_step
    from ml.steps.model import promote_step, train_step

    settings = get_settings()
    if args.step == "promote":
        trained = json.loads(Path(args.trained).read_text())
        return promote_step(args.ticker, args.as_of, trained, settings)
    steps = {"ingest": ingest_step, "publish": publish_step, "train": train_step}
    return steps.get(args.step, forecast_step)(args.ticker, args.as_of, settings)


def calls(profiler: cProfile.Profile, top: int) -> dict[str, list[dict[str, Any]]]:
    """The calls with the most cumulative and own time, and the WATCH calls by cumulative time."""
    entries = pstats.Stats(profiler).stats  # {(file, line, func): (cc, nc, tottime, cumtime, _)}
    interesting = [
        (k, v) for k, v in entries.items() if not any(s in k[0] or s in k[2] for s in _SKIP)
    ]
    by_cum = sorted(interesting, key=lambda kv: kv[1][3], reverse=True)
    by_own = sorted(interesting, key=lambda kv: kv[1][2], reverse=True)
    watched = [
        {"call": _name(k), "calls": v[1], "cumulative": round(v[3], 3)}
        for k, v in entries.items()
        if k[2] in WATCH and any(f in k[0] for f in _WATCH_FILES)
    ]
    return {
        "top_cumulative": [
            {"call": _name(k), "calls": v[1], "cumulative": round(v[3], 3)} for k, v in by_cum[:top]
        ],
        "watched": sorted(watched, key=lambda c: c["cumulative"], reverse=True)[:top],
        "top_own": [
            {"call": _name(k), "calls": v[1], "own": round(v[2], 3)} for k, v in by_own[:top]
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["ingest", "publish", "train", "promote", "forecast"])
    parser.add_argument("ticker")
    parser.add_argument("as_of", type=date.fromisoformat)
    parser.add_argument("out")
    parser.add_argument("--trained", help="the train step's result (JSON), for promote")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--cprofile", action="store_true")
    args = parser.parse_args()

    profiler = cProfile.Profile() if args.cprofile else None
    sys.stderr.write("BENCH-STEP-START\n")
    sys.stderr.flush()
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    result = run_step(args)
    if profiler is not None:
        profiler.disable()
    seconds = time.perf_counter() - started
    sys.stderr.write("BENCH-STEP-END\n")
    sys.stderr.flush()
    out = {
        "step": args.step,
        "ticker": args.ticker,
        "result": result,
        "step_seconds": round(seconds, 3),
        "process_seconds": round(time.perf_counter() - T0, 3),
    }
    write_json(args.out, {**out, **calls(profiler, args.top)} if profiler else out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
