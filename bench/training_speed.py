"""Per-ticker training cost and quality: the fits, the fixed cost around them, test U2.

    python bench/training_speed.py [--tickers AMD,SPY] [--set batch_size=256 --set lr=...]
        [--log 3] [--json OUT.json]

In one process: generates the synthetic history of every ticker of the universe (settings'
`history_start` to `--as-of`, default 2026-11-20; generation is not timed), then runs
`ml.model.training.train_on_history` for each with the default `ModelConfig` (or `--set` overrides) and
prints, per ticker, the fit seconds (sum of `CandidateResult.seconds`; of them, the first step
and validation pass, `trace_seconds`: the graph traces for the process's first ticker), the whole
`train_on_history` seconds, the epochs run per kind, each kind's validation score and the one
selected, and the test U2 of High, Low and Close; then the mean U2 over High/Low/Close over all
tickers, the gate's verdicts (a ticker whose candidate fails it and has no champion gets the
range-aware naive: the "champions" figures count that), and the total fit time; then the
quantiles over the test blocks (`interval_report.pooled`): the pooled coverage (total hits /
total bars) of Close's 90 % interval, High's q0.90 and Low's q0.10, the mean interval-score and
tail-pinball ratios against historical simulation and the Gaussian, and how many tickers fall
outside their block's binomial 99 % band (all also under "probabilistic" in --json).

`--log N` also starts a throwaway SQLite MLflow server and, for the first N tickers, times what
the train step does around the fit: the registry lookup (`reuse_outcome`) and
`ml.registry.tracking.log_candidate` (params, metrics, plot, pyfunc model, registration). The first ticker
pays the process's one-off costs (imports, first traces); later ones show the warm cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import fields, replace
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

GATE = ("High", "Low", "Close")


def _coerce(name: str, raw: str, current: object) -> object:
    if isinstance(current, tuple):
        parts = [p.strip() for p in raw.split(",") if p.strip()]
        if name == "split":
            return tuple(float(p) for p in parts)
        return tuple(int(p) for p in parts) if name == "vol_horizons" else tuple(parts)
    if isinstance(current, bool):
        return raw.lower() in ("1", "true", "yes")
    return type(current)(raw)


def model_config(overrides: list[str]):
    from ml.config import ModelConfig

    config = ModelConfig()
    names = {f.name for f in fields(ModelConfig)}
    changes = {}
    for item in overrides:
        name, _, raw = item.partition("=")
        if name not in names:
            raise SystemExit(f"--set {item}: ModelConfig has no field {name!r}")
        changes[name] = _coerce(name, raw, getattr(config, name))
    return replace(config, **changes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tickers", default=None, help="comma-separated (default: the universe)")
    parser.add_argument("--as-of", default="2026-11-20")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--log", type=int, default=0, metavar="N")
    parser.add_argument("--json", default=None, metavar="OUT")
    args = parser.parse_args()

    from ml.config import get_settings
    from ml.data.sources import SyntheticSource
    from ml.universe import load_universe

    load_start = os.getloadavg()
    settings = get_settings({})
    config = model_config(args.set)
    as_of = date.fromisoformat(args.as_of)
    universe = load_universe(settings.universe_file)
    instruments = universe.select(args.tickers.split(",") if args.tickers else None)
    source = SyntheticSource()
    histories = {i.ticker: source.fetch(i, settings.history_start, as_of) for i in instruments}

    started = time.perf_counter()
    import ml.model.training  # noqa: F401  (timed here; train_row uses it)
    from ml.model.networks import configure_tensorflow

    configure_tensorflow()
    import keras  # noqa: F401

    import_seconds = time.perf_counter() - started
    print(f"config {config}\nimports {import_seconds:.2f}s", flush=True)

    rows, results = [], {}
    for instrument in instruments:
        row, results[instrument.ticker] = train_row(instrument, histories, config, as_of)
        rows.append(row)
    totals = summarize(rows)
    probabilistic = summarize_intervals([r.intervals for r in results.values()])

    logging_rows = []
    if args.log:
        logging_rows = time_logging(instruments[: args.log], results, settings, as_of)

    if args.json:
        payload = {
            "command": " ".join(sys.argv),
            "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
            "load_average_end": os.getloadavg(),
            "config": {f.name: getattr(config, f.name) for f in fields(config)},
            "as_of": as_of.isoformat(),
            "import_seconds": round(import_seconds, 3),
            "fit_seconds_total": round(totals["fit"], 3),
            "first_trace_seconds": totals["first_trace"],
            "train_seconds_total": round(totals["train"], 3),
            "train_cpu_seconds_total": round(totals["cpu"], 3),
            "load_average_start": load_start,
            "mean_u2_hlc": round(totals["mean_u2"], 6),
            "mean_u2_per_target": {t: round(v, 6) for t, v in totals["per_target"].items()},
            "mean_u2_range_naive": {t: round(v, 6) for t, v in totals["naive"].items()},
            "gate_passes": totals["passes"],
            "gate_fails_with_range_naive": totals["gate_fails"],
            "worse_than_range_naive": totals["worse_than_naive"],
            "champions_mean_u2_hlc": round(totals["champion_u2"], 6),
            "chosen": totals["chosen"],
            "per_kind_u2_range_naive_hl": totals["per_kind"],
            "probabilistic": probabilistic,
            "tickers": rows,
            "logging": logging_rows,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


def train_row(instrument, histories, config, as_of) -> tuple[dict, object]:
    """train_on_history for one ticker, timed (wall and CPU), with its test U2 and gate verdicts."""
    import numpy as np
    from interval_report import summarize as summarize_report

    from ml.model.training import train_on_history

    history = histories[instrument.ticker]
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = train_on_history(instrument.ticker, as_of, history, config)
    total, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    u2 = {t: float(v) for t, v in result.evaluation.u2().items()}
    fit = sum(c.seconds for c in result.candidates)
    row = {
        "ticker": instrument.ticker,
        "bars": len(history),
        "fit_seconds": round(fit, 3),
        # the first step and validation pass: the graph traces for the process's first ticker
        "trace_seconds": round(sum(c.trace_seconds for c in result.candidates), 3),
        "train_seconds": round(total, 3),
        "outside_fit_seconds": round(total - fit, 3),
        "train_cpu_seconds": round(cpu, 3),
        "epochs": {c.kind: c.epochs_run for c in result.candidates},
        "best_epoch": {c.kind: c.best_epoch for c in result.candidates},
        "best_val_loss": {c.kind: round(c.best_val_loss, 6) for c in result.candidates},
        "val_score": {c.kind: round(c.val_score, 6) for c in result.candidates},
        # each kind as fitted for the selection: test U2 vs the range-aware naive (H, L), Close
        "kinds_test": result.candidate_tests,
        "chosen": result.forecaster.kind,
        "skill_weights": list(result.forecaster.skill_weights),
        "test_u2": {t: round(v, 6) for t, v in u2.items()},
        "mean_u2_hlc": round(float(np.mean([u2[t] for t in GATE])), 6),
        "gate": gate_verdicts(result),
        # the range-aware naive's U2 against persistence: a first champion that fails the gate
        "naive_u2": {t: round(float(result.evaluation.range_naive.u2[t]), 6) for t in GATE},
        "test_u2_range_naive": {
            t: round(float(result.evaluation.u2_range_naive[t]), 6) for t in ("High", "Low")
        },
        # the quantiles on the test block beside historical simulation and a Gaussian
        "intervals": summarize_report(result.intervals),
    }
    epochs = " ".join(f"{k}:{v:>2}" for k, v in row["epochs"].items() if v)
    print(
        f"{instrument.ticker:<9} fit {fit:6.2f}s (first calls {row['trace_seconds']:5.2f}s)  "
        f"train {total:6.2f}s (cpu {cpu:6.2f}s)  "
        f"epochs {epochs}  "
        f"val {' '.join(f'{k}:{v:.4f}' for k, v in row['val_score'].items())}  "
        f"chosen {row['chosen']:<4}  U2 H {u2['High']:.4f} L {u2['Low']:.4f} "
        f"C {u2['Close']:.4f}" + ("" if row["gate"]["gate"] else "  (fails the gate: naive)"),
        flush=True,
    )
    return row, result


def summarize(rows: list[dict]) -> dict:
    """Prints and returns the totals and means over all tickers."""
    import numpy as np

    per_target = {t: float(np.mean([r["test_u2"][t] for r in rows])) for t in GATE}
    mean_u2 = float(np.mean([r["mean_u2_hlc"] for r in rows]))
    naive = {
        t: float(np.mean([r["test_u2_range_naive"][t] for r in rows])) for t in ("High", "Low")
    }
    passes = {rule: sum(r["gate"][rule] for r in rows) for rule in ("raw_u2", "diebold_mariano")}
    beat_hl = sum(r["test_u2"]["High"] < 1 and r["test_u2"]["Low"] < 1 for r in rows)
    worse_close = sum(r["gate"]["close_significantly_worse"] for r in rows)
    # The champion each ticker ends with on a first run: the selected candidate if it passes
    # the gate, else the range-aware naive.
    champions = [r["test_u2"] if r["gate"]["gate"] else r["naive_u2"] for r in rows]
    champion_u2 = float(np.mean([np.mean([c[t] for t in GATE]) for c in champions]))
    fails = sum(not r["gate"]["gate"] for r in rows)
    worse_naive = sum(r["gate"]["worse_than_range_naive"] for r in rows)
    chosen = [r["chosen"] for r in rows]
    kinds = sorted({k for r in rows for k in r["kinds_test"]})
    per_kind = {
        k: float(np.mean([r["kinds_test"][k][t] for r in rows for t in ("High", "Low")]))
        for k in kinds
    }
    fit_total = sum(r["fit_seconds"] for r in rows)
    first_trace = rows[0]["trace_seconds"]
    train_total = sum(r["train_seconds"] for r in rows)
    cpu_total = sum(r["train_cpu_seconds"] for r in rows)
    print(
        f"\n{len(rows)} tickers: fits {fit_total:.1f}s (mean {fit_total / len(rows):.2f}s), "
        f"train_on_history {train_total:.1f}s, outside the fits "
        f"{train_total - fit_total:.1f}s; train_on_history CPU {cpu_total:.1f}s\n"
        f"the first ticker's first step and validation pass (the traces): {first_trace:.2f}s\n"
        f"mean test U2 over H/L/C {mean_u2:.4f}  "
        + "  ".join(f"{t} {v:.4f}" for t, v in per_target.items())
        + "\nmean test U2 vs the range-aware naive  "
        + "  ".join(f"{t} {v:.4f}" for t, v in naive.items())
        + f"\ngate against persistence passed: {passes['raw_u2']} of {len(rows)} with the raw "
        f"U2 rule (H < 1, L < 1, C <= 1), {passes['diebold_mariano']} with the Diebold-Mariano "
        f"rule; High and Low U2 < 1: {beat_hl}; Close significantly worse: {worse_close}\n"
        f"selected by validation: "
        + ", ".join(f"{k} {chosen.count(k)}" for k in sorted(set(chosen)))
        + "; each kind's mean test U2 vs the range-aware naive over High and Low: "
        + ", ".join(f"{k} {v:.4f}" for k, v in per_kind.items())
        + f"\nthe gate (with the range-aware naive): {len(rows) - fails} of {len(rows)} pass; "
        f"significantly worse than the range-aware naive on High or Low: {worse_naive}; "
        f"champions (the naive where the gate fails) mean test U2 over H/L/C {champion_u2:.4f}",
        flush=True,
    )
    return {"per_target": per_target, "mean_u2": mean_u2, "naive": naive, "passes": passes,
            "champion_u2": champion_u2, "gate_fails": fails, "worse_than_naive": worse_naive,
            "chosen": {k: chosen.count(k) for k in set(chosen)}, "per_kind": per_kind,
            "fit": fit_total, "train": train_total, "cpu": cpu_total,
            "first_trace": first_trace}  # fmt: skip


def summarize_intervals(reports: list) -> dict:
    """Prints and returns the quantiles' figures over every ticker's test block: the pooled
    coverage (total hits / total bars) of Close's 90 % interval, High's q0.90 and Low's q0.10,
    the mean interval-score and tail-pinball ratios against both baselines, and the tickers
    outside their block's binomial 99 % band (`interval_report.pooled`)."""
    from interval_report import CHECKS, TARGET_RANGE, pooled

    figures = pooled(reports)
    if not figures.get("pooled_coverage"):
        print("no quantiles on any test block", flush=True)
        return figures
    low, high = TARGET_RANGE
    cover, hist = figures["pooled_coverage"], figures["pooled_historical_coverage"]
    band = figures["pooled_band"]
    print(
        f"quantiles over {figures['blocks']} test blocks ({figures['bars']} bars), pooled "
        "coverage (historical simulation's): "
        + ", ".join(f"{label} {cover[k]:.4f} ({hist[k]:.4f})" for k, label in CHECKS.items())
        + f"; the pooled binomial 99 % band of 90 %: {band[0]:.4f}..{band[1]:.4f}; "
        f"Close 90 % within [{low}, {high}]: {'yes' if low <= cover['close_90'] <= high else 'NO'}"
        f"\nmean ratios: interval score of Close 90 % / historical "
        f"{figures['mean_interval_ratio_historical']:.4f}, / Gaussian "
        f"{figures['mean_interval_ratio_gaussian']:.4f}; pinball of High q90 + Low q10 / "
        f"historical {figures['mean_tail_ratio_historical']:.4f}, / Gaussian "
        f"{figures['mean_tail_ratio_gaussian']:.4f}\n"
        "tickers outside their binomial 99 % band: "
        + ", ".join(f"{label} {figures['outside_band'][k]}" for k, label in CHECKS.items())
        + f" (any of the three: {figures['outside_band_any']} of {figures['blocks']})"
        + f"; outside [{low}, {high}]: "
        + ", ".join(f"{label} {figures['outside_target_range'][k]}" for k, label in CHECKS.items()),
        flush=True,
    )
    return figures


def gate_verdicts(result) -> dict[str, bool]:
    """The gate against persistence on this test block: the raw U2 rule it replaced (U2 < 1 on
    High and Low, <= 1 on Close) and today's Diebold-Mariano rule (`ml.registry.gate.gate_failures`)."""
    from ml.config import GateConfig
    from ml.registry.gate import gate_failures

    u2 = result.evaluation.u2()
    dm = dict(result.evaluation.dm_vs_persistence)
    dm_naive = dict(result.evaluation.dm_vs_range_naive)
    raw = u2["High"] < 1 and u2["Low"] < 1 and u2["Close"] <= 1
    return {
        "raw_u2": bool(raw),
        "diebold_mariano": not gate_failures(u2, dm, GateConfig()),
        "gate": not gate_failures(u2, dm, GateConfig(), dm_naive),
        "worse_than_range_naive": any(
            dm_naive[t]["p_worse"] < GateConfig().p_value for t in ("High", "Low")
        ),
        "close_significantly_worse": bool(dm["Close"]["p_worse"] < GateConfig().p_value),
    }


def time_logging(instruments, results, settings, as_of) -> list[dict]:
    """Registry lookup + log_candidate for each of `instruments` against a throwaway server."""
    from ml.registry.client import get_client
    from ml.registry.tracking import log_candidate
    from ml.registry.versions import reuse_outcome
    from ml.servers import sqlite_mlflow_server

    out = []
    with (
        tempfile.TemporaryDirectory(prefix="training-speed-mlflow-") as tmp,
        sqlite_mlflow_server(Path(tmp)) as server,
    ):
        logged = replace(settings, mlflow_tracking_uri=server.uri, experiment_name="training-speed")
        for instrument in instruments:
            result = results[instrument.ticker]
            t0 = time.perf_counter()
            found = reuse_outcome(
                get_client(logged),
                instrument,
                as_of,
                result.data_fingerprint,
                result.config_fingerprint,
            )
            lookup = time.perf_counter() - t0
            assert found is None
            t0 = time.perf_counter()
            outcome = log_candidate(result, instrument, logged)
            seconds = time.perf_counter() - t0
            row = {
                "ticker": instrument.ticker,
                "lookup_seconds": round(lookup, 3),
                "log_candidate_seconds": round(seconds, 3),
                "version": outcome.version,
            }
            out.append(row)
            print(
                f"log {instrument.ticker:<9} lookup {lookup:5.2f}s  "
                f"log_candidate {seconds:5.2f}s  (version {outcome.version})",
                flush=True,
            )
    return out


if __name__ == "__main__":
    raise SystemExit(main())
