"""BENCHMARKS.md from a run's results: the figures (ratios, verdicts, table rows) are computed
here, the prose is `templates/BENCHMARKS.md.j2` (Jinja2, StrictUndefined: a figure the template
names that the results lack fails the rendering instead of printing a blank). The hand-written
parts are files placed verbatim in every rendering (`make bench` and `--render-only` alike):
`probabilistic.md` at the top, `notes.md` after the run's description, `history.md` at the end.

    python bench/run.py --render-only RESULTS_JSON [--notes OTHER_NOTES.md]
"""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path
from typing import Any

import jinja2
from benchlib import HISTORY_START

BENCH = Path(__file__).resolve().parent
TEMPLATES = BENCH / "templates"
TEMPLATE = "BENCHMARKS.md.j2"
# Hand-written Markdown that every rendering includes (a missing or empty file is left out).
TOP = BENCH / "probabilistic.md"  # figures measured outside bench/run.py (realdata, training_speed)
NOTES = BENCH / "notes.md"  # on the latest run, after its description
HISTORY = BENCH / "history.md"  # earlier runs and the figures behind code settings, at the end
# The targets. (2)/(1) is reported without a target (the issue sets none).
TARGET_DAILY = 1.0  # whole daily run / notebook loop
TARGET_NO_NEW_DATA = 0.05  # no-new-data day / full day, with zero train instances
TARGET_TASK_INSTANCES = 40  # task instances of a day with TARGET_TASK_TICKERS tickers
TARGET_TASK_TICKERS = 31
TARGET_TRAIN_FIXED = 1.5  # s: a train task's wall time outside its epochs (traces included)
FLAT_TOLERANCE = 0.10  # growth: wall per ticker each within +10 % of the previous size
MEMORY_STEPS = ("ingest", "validate", "train", "promote", "forecast")
# The data phase's tasks since it was split (results recorded before name only "validate").
SPLIT_DATA_TASKS = ("validate_and_publish", "find_versions", "plan_training")


# --- formatting --------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: None -> '-', floats to `digits`, anything else as str()."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.{digits}f}"
    return str(value)


def fixed(value: float, digits: int = 1) -> str:
    return f"{value:.{digits}f}"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += [
        "| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in r) + " |" for r in rows
    ]
    return "\n".join(lines)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def mean(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.fmean(values) if values else float("nan")


def u2_hlc(u2: dict[str, float]) -> float:
    return mean([u2[t] for t in ("High", "Low", "Close")])


def rows_fetched(run: dict[str, Any]) -> list[int]:
    return [v["rows_fetched"] for v in run["fetched"].values() if v["rows_fetched"] is not None]


# --- the summary -------------------------------------------------------------------------------


def ratio(value: float, base: dict[str, Any] | None, key: str) -> float | None:
    return value / base[key] if base else None


def task_count(daily: dict | None, growth: list[dict]) -> dict[str, Any] | None:
    """The task-instance target is for a day of 31 tickers: (3), or else the growth run at 31."""
    runs = [r for r in [daily, *growth] if r and "train_instances" in r]
    full_day = [r for r in runs if r["tickers"] == TARGET_TASK_TICKERS]
    counted = (full_day or runs or [None])[0]
    if not counted:
        return None
    full = counted["tickers"] == TARGET_TASK_TICKERS
    ok = counted["task_instances"] <= TARGET_TASK_INSTANCES if full else None
    return {"run": counted, "is_daily": counted is daily, "verdict": verdict(ok)}


def growth_summary(growth: list[dict]) -> dict[str, Any] | None:
    if not growth:
        return None
    per = [g["per_ticker_seconds"] for g in growth]
    ok = all(b <= a * (1 + FLAT_TOLERANCE) for a, b in itertools.pairwise(per))
    change = per[-1] / per[0] - 1
    trend = "falls" if change < -FLAT_TOLERANCE else "rises" if change > FLAT_TOLERANCE else None
    return {
        "sizes": ", ".join(str(g["size"]) for g in growth),
        "per": " / ".join(f"{p:.2f}" for p in per) + " s",
        "relative": " / ".join(f"{p / per[0]:.2f}" for p in per),
        "verdict": verdict(ok if len(per) > 1 else None),
        "change": f"{trend or 'stays flat'} ({change:+.0%})" if len(per) > 1 else None,
    }


def day_summary(
    r: dict[str, Any], daily: dict | None, repeats: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """One row of the summary table; for the no-new-data day, `r` is the run with the median
    wall of `repeats` (all its runs), and every one of them must have run no train instance."""
    fetched = rows_fetched(r)
    low, high = (min(fetched), max(fetched)) if fetched else (None, None)
    share = ratio(r["wall_seconds"], daily, "wall_seconds")
    no_new = r["label"] == "no-new-data"
    runs = repeats or [r]
    counts = [x.get("train_instances") for x in runs]
    n_train = None if None in counts else max(counts)
    ok = share <= TARGET_NO_NEW_DATA and n_train == 0 if share is not None else None
    return {
        "r": r,
        "no_new": no_new,
        "fetched": "?" if not fetched else f"{low}" if low == high else f"{low}..{high}",
        "trained": r["training"].get("trained", 0),
        "n_train": n_train,
        "ratio": f"{share:.3f} of (3)" if share is not None else "-",
        "verdict": verdict(ok) if no_new and ok is not None else "",
        "runs": " / ".join(fmt(x["wall_seconds"], 2) for x in runs) if len(runs) > 1 else "",
        "n_runs": len(runs),
    }


def day_summaries(runs: list[dict[str, Any]], daily: dict | None) -> list[dict[str, Any]]:
    """The summary rows of (6): each day once; the no-new-data day's runs as one row, their
    median (the middle run by wall time; of an even number, the slower middle one)."""
    repeats = [r for r in runs if r["label"] == "no-new-data"]
    rows = [day_summary(r, daily) for r in runs if r["label"] != "no-new-data"]
    if repeats:
        middle = sorted(repeats, key=lambda r: r["wall_seconds"])[len(repeats) // 2]
        rows.append(day_summary(middle, daily, repeats))
    return rows


# --- tables ------------------------------------------------------------------------------------


def training_rows(sides: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for name, side in sides.items():
        t = side["result"]["tickers"]
        head = [side["wall"], side["import_seconds"], side["fit_seconds"]]
        if name == "notebook":
            loss = f"{mean([x['val_loss'] for x in t]):.4f} (std. levels)"
            val, test = (mean([u2_hlc(x[k]) for x in t]) for k in ("val_u2", "test_u2"))
            rows.append([name, *head, loss, f"{val:.3f}", f"{test:.3f}"])
            continue
        loss = f"{mean([x['best_val_loss'] for x in t]):.4f} (std. log-ratios)"
        for variant, vk, tk, note in (
            ("raw network", "val_u2_raw", "test_u2_raw", ""),
            ("shipped (skill weights)", "val_u2", "test_u2", " (in-sample weights)"),
        ):
            val, test = (mean([u2_hlc(x[k]) for x in t]) for k in (vk, tk))
            rows.append([f"{name}, {variant}", *head, loss, f"{val:.3f}{note}", f"{test:.3f}"])
    return rows


def comparison(sides: dict[str, Any]) -> dict[str, Any] | None:
    """Ours (batch 32, else the first) against the notebook: validation U2, per ticker."""
    nb = sides.get("notebook")
    ours = sides.get("ours@32") or next((v for k, v in sides.items() if k.startswith("ours")), None)
    if not (nb and ours):
        return None
    nb_t = {x["ticker"]: x for x in nb["result"]["tickers"]}
    ours_t = ours["result"]["tickers"]
    ours_val = mean([u2_hlc(x["val_u2_raw"]) for x in ours_t])
    nb_val = mean([u2_hlc(x["val_u2"]) for x in nb["result"]["tickers"]])
    rows = []
    for x in ours_t:
        n = nb_t[x["ticker"]]
        rows.append(
            [x["ticker"], n["bars"], n["fit_seconds"], x["fit_seconds"]]
            + [f"{n['val_loss']:.4f}", f"{x['best_val_loss']:.4f}"]
            + [f"{u2_hlc(u):.3f}" for u in (n["val_u2"], x["val_u2_raw"])]
            + [f"{u2_hlc(u):.3f}" for u in (n["test_u2"], x["test_u2"])]
        )
    return {
        "verdict": verdict(ours_val <= nb_val),
        "ours_val": ours_val,
        "nb_val": nb_val,
        "better": sum(
            1 for x in ours_t if u2_hlc(x["val_u2_raw"]) <= u2_hlc(nb_t[x["ticker"]]["val_u2"])
        ),
        "n": len(nb_t),
        "rows": rows,
    }


def task_rows(r: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for short, p in r["per_task"].items():
        d, q = p["duration"], p["queue_delay"]
        states = ", ".join(f"{k} {v}" for k, v in p["states"].items())
        states += f"; {p['retried']} retried" if p["retried"] else ""
        memory = [p["peak_rss_mb"], p["peak_private_mb"], p["memory_sampled"]]
        times = [d.get("n", 0), d.get("mean"), d.get("max"), q.get("mean"), q.get("max")]
        rows.append([short, *times, *memory, states])
    return rows


def day_rows(runs: list[dict], daily: dict | None) -> list[list[Any]]:
    rows = []
    for r in runs:
        got = rows_fetched(r)
        share = ratio(r["wall_seconds"], daily, "wall_seconds")
        fetched = f"{min(got)}..{max(got)} (median {statistics.median(got):g})" if got else "-"
        added = sum(v["rows_added"] or 0 for v in r["fetched"].values())
        training = ", ".join(f"{k} {v}" for k, v in sorted(r["training"].items()))
        head = [r["label"], r["as_of"], r["state"], r["wall_seconds"]]
        tasks = f"{r['task_instances']} ({r.get('train_instances', '?')})"
        share_text = "-" if share is None else fmt(share, 3)
        rows.append([*head, share_text, fetched, added, training, tasks])
        rows[-1].append(r["components_task_seconds"]["training"])
    return rows


def growth_rows(growth: list[dict]) -> list[list[Any]]:
    rows = []
    for g in growth:
        pt, n = g["per_task"], g["tickers"]
        memory = [
            " / ".join(fmt(_step_memory(pt, s, k), 0) for s in MEMORY_STEPS)
            for k in ("peak_rss_mb", "peak_private_mb")
        ]
        per_ticker = (
            [round(g["task_seconds"] / n, 2), round(g["gap_seconds"] / n, 3)] if n else [None, None]
        )
        tasks = f"{g['task_instances']} ({g.get('train_instances', '?')})"
        head = [g["size"], g["state"], g["wall_seconds"], g["per_ticker_seconds"], tasks]
        rows.append(
            [*head, *per_ticker, g["effective_parallelism"], *memory, g["peak_total_rss_mb"]]
        )
    return rows


def cpu_line(run: dict | None) -> str:
    """ "component s, ..." for one run, largest first ("" for a run from before it was measured)."""
    cpu = (run or {}).get("cpu_seconds") or {}
    return ", ".join(f"{k} {fmt(v, 1)} s" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]))


def cpu_rows(runs: list[dict]) -> tuple[list[str], list[list[Any]]]:
    """CPU seconds by component of the stack per run, and per ticker (runs from before the bench
    measured it have none and are left out)."""
    runs = [r for r in runs if r.get("cpu_seconds")]
    components = sorted(
        {k for r in runs for k in r["cpu_seconds"]},
        key=lambda k: -max(r["cpu_seconds"].get(k, 0.0) for r in runs),
    )
    rows = []
    for r in runs:
        cpu, n = r["cpu_seconds"], r["tickers"] or 1
        total = sum(cpu.values())
        cells = [f"{fmt(cpu.get(k), 1)} ({fmt(cpu.get(k, 0.0) / n, 3)})" for k in components]
        rows.append(
            [
                r.get("size", r["label"]),
                r["wall_seconds"],
                *cells,
                f"{fmt(total, 1)} ({fmt(total / n, 3)})",
            ]
        )
    return ["run", "wall s", *components, "all"], rows


def import_rows(imports: list[dict]) -> list[list[str]]:
    def seconds(r: dict) -> str:
        if r["min"] is None:
            return f"failed: {r['error']}"
        return f"{fmt(r['min'], 2)} .. {fmt(r['max'], 2)}"

    return [[r["what"], seconds(r)] for r in imports]


def profile_tables(prof: dict[str, Any]) -> dict[str, Any]:
    steps = prof["steps"]
    out: dict[str, list] = {"steps": [], "named": [], "top": []}
    for step, p in steps.items():
        biggest = ", ".join(
            f"{i['module']} {i['seconds']:.1f}" for i in p.get("top_imports", [])[:4]
        )
        times = [p.get("process_wall"), p.get("step_seconds"), p.get("import_seconds")]
        out["steps"].append([step, *times, biggest])
    for s in ("publish", "train", "promote", "forecast"):
        if (steps.get(s) or {}).get("watched"):
            calls = "; ".join(f"`{c['call']}` {c['cumulative']}" for c in steps[s]["watched"][:10])
            out["named"].append((s, steps[s], calls))
    for s in ("train", "promote", "forecast"):
        if (steps.get(s) or {}).get("top_cumulative"):
            calls = [
                [f"`{c['call']}`", c["calls"], c["cumulative"]] for c in steps[s]["top_cumulative"]
            ]
            out["top"].append((s, calls))
    return out


# --- the closing note --------------------------------------------------------------------------


def closing(results: dict[str, Any], daily: dict | None) -> dict[str, Any]:
    """The figures the closing note quotes that are not plain fields of the results."""
    out: dict[str, Any] = {"imports": None, "steps": None, "bare_train": None, "named": []}
    if daily:
        train = daily["per_task"].get("train", {}).get("duration", {})
        n_train = train.get("n") or 0
        rest = (train.get("sum") or 0) - daily["fit_seconds"] - daily["mlflow_run_seconds"]
        out["train"] = {
            "d": train,
            "n": n_train,
            "rest": rest,
            "per_task": rest / n_train if n_train else 0,
        }
        batch = [
            s
            for s in ("ingest", "validate", *SPLIT_DATA_TASKS, "promote", "forecast")
            if s in daily["per_task"]
        ]
        out["batch"] = ", ".join(
            f"{s} {daily['per_task'][s]['duration'].get('sum')} s" for s in batch
        )
    imports = {r["what"]: r["min"] for r in results.get("imports") or []}
    if imports:
        out["imports"] = ", ".join(f"{k} {v} s" for k, v in imports.items() if v is not None)
    prof = results.get("profile")
    if prof:
        steps = prof["steps"]
        out["steps"] = ", ".join(
            f"{k} {fmt(v.get('import_seconds'))} / {fmt(v.get('process_wall'))} s"
            for k, v in steps.items()
        )
        train_task = daily and (daily["per_task"].get("train") or {}).get("duration", {})
        if train_task and train_task.get("mean") is not None and "train" in steps:
            out["bare_train"] = (train_task["mean"], steps["train"].get("process_wall"))
            out["preloading"] = "Preloading" in str(daily.get("executor"))
        for step in ("train", "forecast"):
            watched = (steps.get(step) or {}).get("watched", [])[:8]
            calls = (
                f"`{c['call'].split(':')[0]}:{c['call'].split('(')[-1][:-1]}` {c['cumulative']}"
                for c in watched
            )
            if watched:
                out["named"].append((step, "; ".join(calls)))
    return out


# --- rendering ---------------------------------------------------------------------------------


def context(results: dict[str, Any]) -> dict[str, Any]:
    meta = results["meta"]
    sides = (results.get("training") or {}).get("sides") or {}
    day = results.get("daily") or {}
    daily, incr = day.get("daily"), day.get("incremental") or []
    # The sizes that ran (a failed size is a row with its error), the first topology's only: the
    # targets compare sizes of one topology (bench/growth.py summarizes each).
    ran = [g for g in results.get("growth") or [] if "state" in g]
    first = ran[0].get("topology") if ran else None
    growth = [g for g in ran if g.get("topology") == first]
    nb = sides.get("notebook")
    prof = results.get("profile")
    return {
        "meta": meta,
        "m": meta["machine"],
        "args": meta["args"],
        "errors": [
            (p, e.splitlines()[-1] if e else "") for p, e in results.get("errors", {}).items()
        ],
        "training": results.get("training"),
        "nb": nb,
        "ours": [
            (k, v, ratio(v["wall"], nb, "wall")) for k, v in sides.items() if k.startswith("ours")
        ],
        "training_rows": training_rows(sides),
        "compare": comparison(sides),
        "day": day,
        "daily": daily,
        "daily_ratio": ratio(daily["wall_seconds"], nb, "wall") if daily else None,
        "task_count": task_count(daily, growth),
        "incr": incr,
        "days": day_summaries(incr, daily),
        "day_rows": day_rows([daily, *incr] if daily else incr, daily),
        "growth": growth,
        "growth_summary": growth_summary(growth),
        "growth_rows": growth_rows(growth),
        "growth_cpu": cpu_rows(growth),
        "imports": results.get("imports"),
        "prof": prof,
        "profile": profile_tables(prof) if prof else None,
        "closing": closing(results, daily),
    }


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters.update(fmt=fmt, fixed=fixed, cpu_line=cpu_line)
    env.globals.update(
        table=table,
        task_rows=task_rows,
        import_rows=import_rows,
        verdict=verdict,
        tojson=lambda value: json.dumps(value),
        HISTORY_START=HISTORY_START,
        TARGET_DAILY=TARGET_DAILY,
        TARGET_NO_NEW_DATA=TARGET_NO_NEW_DATA,
        TARGET_TASK_INSTANCES=TARGET_TASK_INSTANCES,
        TARGET_TASK_TICKERS=TARGET_TASK_TICKERS,
        TARGET_TRAIN_FIXED=TARGET_TRAIN_FIXED,
        FLAT_PERCENT=int(FLAT_TOLERANCE * 100),
    )
    return env


def _step_memory(per_task: dict[str, Any], step: str, key: str) -> float | None:
    """A step's memory figure; "validate" is the largest of the data-phase tasks it was split
    into, for results recorded after the split."""
    if step == "validate" and "validate" not in per_task:
        found = [(per_task.get(t) or {}).get(key) for t in SPLIT_DATA_TASKS]
        found = [v for v in found if v is not None]
        return max(found) if found else None
    return (per_task.get(step) or {}).get(key)


def hand_written(part: str | Path | None) -> str | None:
    """A hand-written part: a file's text (nothing if it does not exist), or the text itself."""
    if isinstance(part, Path):
        part = part.read_text() if part.exists() else None
    return part.strip() or None if part else None


def render(
    results: dict[str, Any],
    notes: str | Path | None = NOTES,
    top: str | Path | None = TOP,
    history: str | Path | None = HISTORY,
) -> str:
    """BENCHMARKS.md from the results (everything it needs is in them, see `--render-only`)
    and the hand-written parts, each a file (by default bench/notes.md, bench/probabilistic.md,
    bench/history.md), a text, or None to leave it out: `top` after the title, `notes` after the
    run's description, `history` at the end."""
    parts = {"notes": notes, "top": top, "history": history}
    texts = {name: hand_written(part) for name, part in parts.items()}
    return environment().get_template(TEMPLATE).render(context(results), **texts)
