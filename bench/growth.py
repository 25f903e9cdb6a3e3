"""(5) growth: the whole daily run for each universe size, on the embedded stack (`harness.Stack`:
Airflow standalone, the preloading LocalExecutor, SQLite) and/or the production topology
(`production.ProductionStack`: CeleryExecutor, PostgreSQL, Redis), one fresh stack (fresh
databases) per size, with a cheap model config so that orchestration dominates (`--growth-kinds`,
default the statistical `har`; a short `--growth-history-start`; synthetic bars).

`summarize` puts the sizes side by side per topology (wall, wall per ticker, the scheduler
process's CPU per ticker, task instances), checks issue 31's targets where the sizes were measured
and projects 5,000 tickers from the measured sizes (`MODELS`).

    python bench/growth.py RESULTS.json [RESULTS.json ...] [--json OUT]

prints that table from the growth rows of one or more bench/run.py results files (e.g. one run
per topology) and writes the merged rows and the summary to OUT.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from harness import Stack
from scenarios import analyze, logical_dates, run_dag, universe_csv

TOPOLOGIES = ("embedded", "production")
PROJECT_TO = 5_000
# Issue 31's targets: wall per ticker from 500 to 2,000 tickers within +15 %; the scheduler's CPU
# per ticker at 2,000 at most 1.5x its figure at 31.
WALL_SIZES, WALL_TOLERANCE = (500, 2_000), 0.15
CPU_SIZES, CPU_FACTOR = (31, 2_000), 1.5
MODELS = {
    "wall": "wall = a + b * tickers (least squares over the measured sizes)",
    "scheduler_cpu": "scheduler CPU = b * tickers + c * tickers^2 (least squares, through 0: "
    "each scheduler loop reads every task instance of the run, and the loops grow with it)",
}


def new_stack(topology: str, registry: Any, state: Path, env: dict[str, str]) -> Stack:
    if topology == "embedded":
        return registry.new(state, env)
    from parts import log
    from production import ProductionStack

    stack = ProductionStack(state, env, log=log)
    registry.stacks.append(stack)
    return stack


def part_growth(args: argparse.Namespace, work: Path, registry: Any,
                rows: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """One fresh stack per topology and size; fills `rows` as it goes (a failed size is a row
    with its error, the next size still runs). Returns the summary."""
    from parts import log, warm_up

    for topology in args.topologies:
        for size in args.growth_sizes:
            state = work / f"stack-growth-{topology}-{size}"
            state.mkdir(parents=True, exist_ok=True)
            universe = state / "universe.csv"
            universe_csv(universe, size, args.universe)
            env = {
                "UNIVERSE_FILE": str(universe),
                "HISTORY_START": args.growth_history_start.isoformat(),
                "MODEL_MAX_EPOCHS": str(args.growth_epochs),
                "MODEL_KINDS": ",".join(args.growth_kinds),
            }
            if topology == "embedded":
                env.update(args.stack_env)
            stack = new_stack(topology, registry, state, env)
            try:
                stack.start(args.start_timeout)
                log(f"  growth {topology} {size}: stack up in {stack.startup_seconds:.0f}s")
                mine: set[str] = set()
                dates = logical_dates(2)
                warm_up(stack, dates[0], mine, args.run_timeout)
                conf = {"max_epochs": args.growth_epochs, "model_kinds": list(args.growth_kinds)}
                label = f"growth-{topology}-{size}"
                raw = run_dag(stack, label, args.as_of, dates[1], conf, args.run_timeout, mine,
                              log)  # fmt: skip
                result = {**analyze(raw), "size": size, "topology": topology}
                rows.append(result)
                log(
                    f"  growth {topology} {size}: {result['state']} in {result['wall_seconds']}s "
                    f"({result['per_ticker_seconds']} s/ticker, scheduler CPU "
                    f"{result['scheduler_cpu_seconds']} s, {result['task_instances']} task instances)"
                )
            except Exception as exc:
                rows.append({"size": size, "topology": topology, "error": repr(exc)})
                log(f"  growth {topology} {size} FAILED: {exc!r}")
            finally:
                registry.stop(stack)
    summary = summarize(rows)
    print(table(summary), flush=True)
    return summary


# --- the summary -------------------------------------------------------------------------------


def _solve(matrix: list[list[float]], vector: list[float]) -> list[float]:
    """Least squares by the normal equations (2 unknowns at most, tiny and well conditioned)."""
    n = len(matrix[0])
    ata = [[sum(r[i] * r[j] for r in matrix) for j in range(n)] for i in range(n)]
    atb = [sum(r[i] * y for r, y in zip(matrix, vector, strict=True)) for i in range(n)]
    if n == 1:
        return [atb[0] / ata[0][0]]
    det = ata[0][0] * ata[1][1] - ata[0][1] * ata[1][0]
    return [
        (atb[0] * ata[1][1] - ata[0][1] * atb[1]) / det,
        (ata[0][0] * atb[1] - atb[0] * ata[1][0]) / det,
    ]


def fit(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The two models (`MODELS`) fitted on one topology's successful sizes, and 5,000 from them."""
    ok = [r for r in rows if r.get("state") == "success"]
    sizes = sorted({r["size"] for r in ok})
    out: dict[str, Any] = {"fitted_on": sizes, "models": MODELS, "tickers": PROJECT_TO}
    if len(sizes) < 2:
        return out
    xs = [float(r["size"]) for r in ok]
    a, b = _solve([[1.0, x] for x in xs], [r["wall_seconds"] for r in ok])
    wall = a + b * PROJECT_TO
    out["wall"] = {"a": round(a, 2), "b": round(b, 4), "seconds": round(wall),
                   "per_ticker": round(wall / PROJECT_TO, 3)}  # fmt: skip
    cpu = [r for r in ok if r.get("scheduler_cpu_seconds") is not None]
    if len({r["size"] for r in cpu}) >= 2:
        xc = [float(r["size"]) for r in cpu]
        b2, c2 = _solve([[x, x * x] for x in xc], [r["scheduler_cpu_seconds"] for r in cpu])
        if c2 < 0:  # small sizes: the scheduler's idle loop over the wall, not the tickers
            out["scheduler_cpu_note"] = f"not projected: the fit bends down (c={c2:.3g})"
            return out
        sched = b2 * PROJECT_TO + c2 * PROJECT_TO**2
        out["scheduler_cpu"] = {"b": round(b2, 5), "c": round(c2, 9), "seconds": round(sched),
                                "per_ticker": round(sched / PROJECT_TO, 4)}  # fmt: skip
    return out


def _by_size(rows: list[dict[str, Any]], size: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["size"] == size and r.get("state") == "success"), None)


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 31's two targets on one topology's rows: True/False where both sizes were measured,
    None (not measured) otherwise."""
    lo, hi = (_by_size(rows, s) for s in WALL_SIZES)
    wall = hi["per_ticker_seconds"] / lo["per_ticker_seconds"] - 1 if lo and hi else None
    c_lo, c_hi = (_by_size(rows, s) for s in CPU_SIZES)
    ratio = None
    if (
        c_lo
        and c_hi
        and c_lo.get("scheduler_cpu_per_ticker")
        and c_hi.get("scheduler_cpu_per_ticker")
    ):
        ratio = c_hi["scheduler_cpu_per_ticker"] / c_lo["scheduler_cpu_per_ticker"]
    return {
        "wall_per_ticker_change_500_to_2000": None if wall is None else round(wall, 3),
        "wall_met": None if wall is None else wall <= WALL_TOLERANCE,
        "scheduler_cpu_per_ticker_2000_over_31": None if ratio is None else round(ratio, 2),
        "scheduler_cpu_met": None if ratio is None else ratio <= CPU_FACTOR,
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": [], "topologies": {}}
    for r in rows:
        out["rows"].append({
            k: r.get(k) for k in ("topology", "size", "state", "error", "wall_seconds",
                                  "per_ticker_seconds", "scheduler_cpu_seconds",
                                  "scheduler_cpu_per_ticker", "task_instances", "train_instances",
                                  "executor")
        })  # fmt: skip
    for topology in dict.fromkeys(r.get("topology", "embedded") for r in rows):
        mine = [r for r in rows if r.get("topology", "embedded") == topology and "error" not in r]
        out["topologies"][topology] = {"targets": targets(mine), "projection": fit(mine)}
    return out


def _cell(value: Any, digits: int = 2) -> str:
    return (
        "-" if value is None else f"{value:,.{digits}f}" if isinstance(value, float) else str(value)
    )


def table(summary: dict[str, Any]) -> str:
    """The sizes side by side (markdown), then the projection and the targets per topology."""
    head = ["topology", "tickers", "state", "wall s", "wall s / ticker", "scheduler CPU s",
            "scheduler CPU s / ticker", "task instances"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in summary["rows"]:
        cells = [r["topology"], r["size"], r.get("state") or f"error: {r.get('error')}",
                 _cell(r.get("wall_seconds"), 1), _cell(r.get("per_ticker_seconds"), 3),
                 _cell(r.get("scheduler_cpu_seconds"), 1),
                 _cell(r.get("scheduler_cpu_per_ticker"), 3), _cell(r.get("task_instances"))]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    for topology, t in summary["topologies"].items():
        p = t["projection"]
        lines.append(f"\n{topology}: fitted on {p['fitted_on']}")
        if "wall" in p:
            w = p["wall"]
            lines.append(f"  {PROJECT_TO:,} tickers: wall {w['seconds']:,} s ({w['per_ticker']} s/ticker)"
                         f" from {MODELS['wall']}: a={w['a']}, b={w['b']}")  # fmt: skip
        if "scheduler_cpu" in p:
            s = p["scheduler_cpu"]
            lines.append(f"  {PROJECT_TO:,} tickers: scheduler CPU {s['seconds']:,} s "
                         f"({s['per_ticker']} s/ticker) from scheduler CPU = b*n + c*n^2: "
                         f"b={s['b']}, c={s['c']}")  # fmt: skip
        if "scheduler_cpu_note" in p:
            lines.append(f"  scheduler CPU {p['scheduler_cpu_note']}")
        lines.append(f"  targets: {json.dumps(t['targets'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--json", type=Path, help="write the merged rows and the summary here")
    args = p.parse_args(argv)
    rows = [r for f in args.results for r in json.loads(f.read_text()).get("growth") or []]
    summary = summarize(rows)
    print(table(summary))
    if args.json:
        sources = [str(f) for f in args.results]
        args.json.write_text(json.dumps({"sources": sources, "growth": rows,
                                         "growth_summary": summary}, indent=2, default=str))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
