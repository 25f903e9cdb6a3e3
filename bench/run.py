"""Benchmarks: the pipeline against the notebook it replaces, and how its cost grows (issue 6).

    python bench/run.py                       everything, full size (what `make bench` runs)
    python bench/run.py --quick               a tiny smoke run of every part (minutes)
    python bench/run.py --parts notebook,ours --tickers 31 --epochs 3
    python bench/run.py --parts growth --growth-sizes 31,124,500
    python bench/run.py --parts growth --topology both --growth-sizes 31,500,2000 \
        --growth-epochs 1 --growth-history-start 2024-01-02

Parts (all by default, always run in this order):
  imports      fresh-process import times of the heavy libraries each task process pays for
  notebook     (1) the notebook's training loop, one process, N tickers (bench/notebook_baseline.py)
  ours         (2) ml.model.training.train_on_history on the same histories and model config, one
               process, no MLflow (bench/ours_training.py); at the notebook's batch 32
  daily        (3) the whole price_forecast run through Airflow standalone (LocalExecutor) on a
               private stack, seed model config, trigger -> end of `report`, with its split
  incremental  (6) then a weekend day, the next weekday and the same day again (no new data)
  growth       (5) the whole run for each --growth-sizes universe of made-up tickers, on the
               embedded stack and/or (--topology) the production topology (bench/growth.py)
  profile      one ticker's steps (ingest, publish, train, promote, forecast), each in a fresh
               process, timed and under cProfile (which calls)

Writes BENCHMARKS.md (or --out) with the machine, the command, the versions and every figure, and
the raw figures as JSON in the work folder. Every process it starts is stopped, also on failure.
The parts are in bench/parts.py; the report is bench/render.py (figures) filling
bench/templates/BENCHMARKS.md.j2 (prose); --render-only re-renders it from a results.json. Both
include the hand-written bench/probabilistic.md (top), bench/notes.md (after the run's
description) and bench/history.md (end) every time.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import growth as bench_growth  # noqa: E402
import parts as bench_parts  # noqa: E402
from benchlib import AS_OF, ROOT, read_universe  # noqa: E402
from parts import PY, StackRegistry, log  # noqa: E402
from render import NOTES, render  # noqa: E402

PARTS = ("imports", "notebook", "ours", "daily", "incremental", "growth", "profile")
QUICK_TICKERS = ["AMD", "SPY", "EURUSD=X"]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = p.add_argument
    add("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    add("--quick", action="store_true", help="tiny sizes: a smoke test of every part")
    add("--tickers", type=int, help="first N tickers of universe.csv (default all 31; --quick: 3)")
    add("--epochs", type=int, help="epochs for (1) and (2) (default 3; --quick 1)")
    add("--ours-batches", type=_ints, help="batch sizes for (2) (default 32)")
    add("--repeat", type=int, default=1, help="alternating repetitions of (1)/(2); the median "
        "is reported")  # fmt: skip
    add("--daily-max-epochs", type=int, help="override the seed max epochs in (3)/(6) (default: "
        "seed 40; --quick 1)")  # fmt: skip
    add("--no-new-data-runs", type=int, default=3, help="runs of the no-new-data day in (6), "
        "one after the other; the verdict takes their median (default 3)")  # fmt: skip
    add("--growth-sizes", type=_ints, help="default 31,124,500 (--quick 4,8)")
    add("--growth-history-start", type=date.fromisoformat, default=date(2022, 1, 3))
    add("--growth-epochs", type=int, help="max epochs in (5) (default 2; --quick 1)")
    add("--growth-kinds", default="har", help="model kinds in (5), comma list (default har, "
        "the cheapest candidate: orchestration dominates)")  # fmt: skip
    add("--topology", choices=(*bench_growth.TOPOLOGIES, "both"), default="embedded",
        help="stack(s) of (5): the embedded stack (standalone, SQLite), the production "
        "topology (Celery, PostgreSQL, Redis, started natively) or both, one after the other")  # fmt: skip
    add("--as-of", type=date.fromisoformat, default=AS_OF)
    add("--executor", help="executor of the stacks: 'stock' (LocalExecutor), 'preloading' "
        "(preloading_executor.PreloadingLocalExecutor) or a class path; default: what "
        "scripts/launcher.py picks (embedded_env)")  # fmt: skip
    add("--profile-ticker", default="SPY")
    add("--import-repeat", type=int, help="default 2 (--quick 1)")
    add("--run-timeout", type=float, default=12 * 3600, help="seconds per run/process (12 h)")
    add("--start-timeout", type=float, default=900)
    add("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    add("--workdir", type=Path, help="default: a new temp folder")
    add("--keep", action="store_true", help="keep the work folder (stacks' state, logs)")
    add("--render-only", type=Path, metavar="RESULTS_JSON",
        help="only write --out from the results.json of an earlier run (runs nothing)")  # fmt: skip
    add("--notes", type=Path, default=NOTES, metavar="MARKDOWN", help="hand-written notes placed "
        "verbatim after the run's description (default: bench/notes.md; an empty file: none)")  # fmt: skip
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    q = args.quick
    args.parts_list = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in args.parts_list if x not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    args.epochs = args.epochs or (1 if q else 3)
    args.ours_batches = args.ours_batches or [32]
    args.daily_max_epochs = args.daily_max_epochs or (1 if q else None)
    args.growth_sizes = args.growth_sizes or ([4, 8] if q else [31, 124, 500])
    args.growth_epochs = args.growth_epochs or (1 if q else 2)
    args.growth_kinds = [k.strip() for k in args.growth_kinds.split(",") if k.strip()]
    args.topologies = bench_growth.TOPOLOGIES if args.topology == "both" else (args.topology,)
    args.import_repeat = args.import_repeat or (1 if q else 2)
    executors = {
        "stock": "LocalExecutor",
        "preloading": "preloading_executor.PreloadingLocalExecutor",
    }
    executor = executors.get(args.executor, args.executor)
    args.stack_env = {"AIRFLOW__CORE__EXECUTOR": executor} if executor else {}
    args.universe = read_universe()
    if args.tickers is None and q:
        args.chosen = [t for t in args.universe if t.ticker in QUICK_TICKERS]
    else:
        args.chosen = args.universe[: args.tickers] if args.tickers else args.universe
    everything = len(args.chosen) == len(args.universe)
    args.tickers_list = [] if everything else [t.ticker for t in args.chosen]
    return args


def commit() -> str | None:
    """The short commit of the checkout the bench runs from (None outside git)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_meta(args: argparse.Namespace, parts: set[str], work: Path) -> dict[str, Any]:
    """The run's description: command, start, machine, versions, parts and the arguments the
    report quotes (everything `render` needs besides the figures)."""
    command = shlex.join([os.path.relpath(PY, ROOT) if PY.startswith(str(ROOT)) else PY, *sys.argv])
    return {
        "command": command,
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "commit": commit(),
        "machine": bench_parts.machine(),
        "versions": bench_parts.versions(),
        "parts": [p for p in PARTS if p in parts],
        "workdir": str(work),
        "json": str(work / "results.json"),
        "args": {
            "quick": args.quick,
            "as_of": args.as_of.isoformat(),
            "repeat": args.repeat,
            "growth_history_start": args.growth_history_start.isoformat(),
            "growth_epochs": args.growth_epochs,
            "growth_kinds": args.growth_kinds,
            "topologies": list(args.topologies),
            "import_repeat": args.import_repeat,
        },
    }


def plan(args: argparse.Namespace, parts: set[str], work: Path, registry: StackRegistry,
         results: dict[str, Any]) -> list[tuple[str, Any]]:  # fmt: skip
    """(results key, the part to run) in the order they run."""
    steps: list[tuple[str, Any]] = []
    if "imports" in parts:
        steps.append(("imports", lambda: bench_parts.part_imports(args)))
    if parts & {"notebook", "ours"}:
        steps.append(("training", lambda: bench_parts.training_parts(args, work, parts)))
    if parts & {"daily", "incremental"}:
        results["daily"] = {}
        daily = results["daily"]
        steps.append(("daily", lambda: bench_parts.part_daily(args, work, registry, parts, daily)))
    if "growth" in parts:
        results["growth"] = []
        rows = results["growth"]
        steps.append(
            ("growth_summary", lambda: bench_growth.part_growth(args, work, registry, rows))
        )
    if "profile" in parts:
        steps.append(("profile", lambda: bench_parts.part_profile(args, work)))
    return steps


def shown(path: Path) -> str:
    """`path` relative to the repository when it is inside it (a results file kept in
    bench/results), else as it is."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def write_report(args: argparse.Namespace, results: dict[str, Any], source: Path) -> None:
    """BENCHMARKS.md (--out) from `results`, with the hand-written parts (render.render's
    defaults: bench/probabilistic.md, bench/history.md; the notes from --notes). Re-rendered from
    a file, the report names that file as the raw figures."""
    if args.render_only:
        results = {**results, "meta": {**results["meta"], "json": shown(source)}}
    text = render(results, args.notes)
    args.out.write_text(text)
    print(text)
    log(f"written: {args.out} (figures: {source}; notes: {args.notes})")


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run the chosen parts; every stack is stopped and results.json written, whatever happens."""
    parts = set(args.parts_list)
    results: dict[str, Any] = {"meta": run_meta(args, parts, work), "errors": {}}
    log(f"bench: parts {', '.join(results['meta']['parts'])}; work folder {work}")
    registry = StackRegistry()
    try:
        for name, run in plan(args, parts, work, registry, results):
            log(f"== {name} ==")
            part_started = time.perf_counter()
            try:
                results[name] = run()
            except Exception as exc:
                results["errors"][name] = traceback.format_exc()
                log(f"  part {name} FAILED: {exc!r}")
            log(f"  ({name} took {time.perf_counter() - part_started:.0f}s)")
    finally:
        registry.stop_all()
        results["meta"]["finished"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
        results["meta"]["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
        (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_only:
        write_report(args, json.loads(args.render_only.read_text()), args.render_only)
        return 0

    def on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="price-forecast-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results = measure(args, work)
    print()
    write_report(args, results, work / "results.json")
    failed = bool(results["errors"])
    if not args.keep and not failed:
        for child in work.iterdir():
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            elif child.name != "results.json":
                child.unlink(missing_ok=True)
        log("stack state and logs removed (use --keep to keep them)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
