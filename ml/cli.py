"""Command line: `python -m ml run|ingest|train|forecast|export|universe|config`.

Each command prints one line per ticker and exits non-zero if any ticker failed (1) or the input
was bad (2).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from datetime import date
from typing import Any

from ml.config import (
    ConfigError,
    Settings,
    check_as_of,
    get_settings,
    parse_day,
    settings_table,
)
from ml.universe import UniverseError, load_universe, validate_ticker


def _date(text: str) -> date:
    """The form of --date (strictly YYYY-MM-DD); its range is checked against the settings in
    `main`, once they are read."""
    try:
        return parse_day(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ticker(text: str) -> str:
    try:
        return validate_ticker(text)
    except UniverseError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ml",
        description="Daily price forecasting: ingest and validate bars, train and promote models, forecast.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        (
            "run",
            "the whole day as the DAG runs it, in this process: ingest, validate, train, "
            "promote, forecast, report",
        ),
        ("ingest", "fetch, validate (Great Expectations) and publish bars up to --date"),
        ("train", "train candidates on bars up to --date, register them, promote if better"),
        ("forecast", "forecast the bar after --date with each ticker's champion"),
    ):
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument(
            "--date",
            type=_date,
            required=True,
            help="logical date (YYYY-MM-DD, not after today in UTC nor before HISTORY_START)",
        )
        cmd.add_argument(
            "--tickers",
            nargs="+",
            type=_ticker,
            help="subset of the universe (default: all); a ticker named twice runs once",
        )
        if name in ("train", "run"):
            cmd.add_argument(
                "--force", action="store_true", help="retrain even if the data did not change"
            )
        if name in ("ingest", "run"):
            cmd.add_argument(
                "--full-refresh",
                action="store_true",
                help="fetch each ticker's whole history again, validate it whole and replace the "
                "published one (a vendor's correction of old bars); the file it replaces is kept "
                "under quarantine/<slug>/superseded-*",
            )
    sub.add_parser("export", help="write the forecasts CSV again from the ledger (every forecast)")
    sub.add_parser("universe", help="list the tickers, asset classes and slugs")
    sub.add_parser("config", help="print the effective settings")
    return parser


class TickerFailed(Exception):
    """A ticker's step failed; the message already names the error."""


def _run_per_ticker(tickers: Sequence[str], step: Callable[[str], str]) -> int:
    from ml.registry.client import MlflowUnreachable

    failed = 0
    for ticker in tickers:
        try:
            line = step(ticker)
        except MlflowUnreachable:
            raise  # every other ticker would fail the same way: one line says it (`main`)
        except Exception as exc:  # report every ticker, then fail
            failed += 1
            error = str(exc) if isinstance(exc, TickerFailed) else f"{type(exc).__name__}: {exc}"
            print(f"{ticker:<10} FAILED  {error}", flush=True)
        else:
            print(f"{ticker:<10} {line}", flush=True)
    if failed:
        print(f"{failed} of {len(tickers)} ticker(s) failed", file=sys.stderr)
    return 1 if failed else 0


def run_day(
    tickers: Sequence[str],
    as_of: date,
    settings: Settings,
    *,
    force: bool,
    full_refresh: bool = False,
) -> int:
    """`python -m ml run`: the day as `ml.pipeline` declares it, in this process; exits 1 if
    any ticker failed or the report could not be written. A ledger whose setting cannot work
    (LedgerConfigError) ends the run before any work (exit 2)."""
    from ml.forecasts.ledger import LedgerConfigError, engine_for
    from ml.pipeline import run_day as walk
    from ml.steps.records import DayRequest

    try:
        engine_for(settings)
    except LedgerConfigError:
        raise
    except Exception:  # down or unreadable now: the forecast stage meets it again and reports it
        pass
    # `main` resolved the tickers against the universe already.
    request = DayRequest(as_of, tuple(tickers), force_retrain=force, full_refresh=full_refresh)
    report = walk(request, settings)
    return 1 if report.failed or report.path is None else 0


def _fmt_u2(u2: dict[str, Any]) -> str:
    return " ".join(f"{k}={float(v):.3f}" for k, v in u2.items() if k in ("High", "Low", "Close"))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings: Settings = get_settings()
        universe = load_universe(settings.universe_file)
        if args.command == "universe":
            for i in universe:
                print(f"{i.ticker:<10} {i.asset_class:<7} {i.slug:<10} {i.name}")
            return 0
        if args.command == "config":
            for key, value in settings_table(settings):
                print(f"{key:<24} {value}")
            return 0
        tickers = [i.ticker for i in universe.select(getattr(args, "tickers", None))]
        if getattr(args, "date", None) is not None:
            check_as_of(args.date, settings.history_start)
    except (ConfigError, UniverseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from ml.data.store import CorruptFile
    from ml.forecasts.ledger import LedgerUnavailable, LedgerWriteError
    from ml.registry.client import MlflowUnreachable

    try:
        return _dispatch(args, tickers, settings)
    except ConfigError as exc:  # LedgerConfigError: the ledger's setting cannot work
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (CorruptFile, LedgerWriteError, LedgerUnavailable, MlflowUnreachable) as exc:
        print(
            f"error: {exc}", file=sys.stderr
        )  # the message names the file or server and the way out
        return 1
    except OSError as exc:  # a file of DATA_DIR that cannot be written (read-only, full)
        print(f"error: {_os_error(exc, settings)}", file=sys.stderr)
        return 1


def _os_error(exc: OSError, settings: Settings) -> str:
    """One line for a filesystem error: what failed, on which file, and the way out."""
    from pathlib import Path

    what = f"{type(exc).__name__}: {exc.strerror or exc}"
    if not exc.filename:
        return what
    if Path(exc.filename).is_relative_to(settings.data_dir):
        return (
            f"{what}: {exc.filename} (DATA_DIR={settings.data_dir}): make it writable by this "
            "user, or point DATA_DIR at a writable folder"
        )
    return f"{what}: {exc.filename}: make it readable and writable by this user"


def _dispatch(args: argparse.Namespace, tickers: list[str], settings: Settings) -> int:
    if args.command == "export":
        from ml.forecasts.export import rebuild_export

        path, rows, moved = rebuild_export(settings)
        if moved is not None:
            print(f"the unreadable export was moved to {moved}")
        print(f"{path}: {rows} forecasts from the ledger")
        return 0
    from ml.steps.data import ingest_all, validate_all
    from ml.steps.forecast import forecast_all
    from ml.steps.model import promote_step, train_step

    as_of: date = args.date
    if args.command == "run":
        return run_day(tickers, as_of, settings, force=args.force, full_refresh=args.full_refresh)
    if args.command == "ingest":
        ingested = ingest_all(tickers, as_of, settings, full_refresh=args.full_refresh)
        validated = validate_all(list(ingested["staged"]), as_of, settings, check_registry=False)
        failed = {**ingested["failed"], **validated["failed"]}

        def ingest(ticker: str) -> str:
            if ticker in failed:
                raise TickerFailed(failed[ticker])
            staged, published = ingested["staged"][ticker], validated["tickers"][ticker]
            mode = "incremental" if staged["incremental"] else "full history"
            notes = "".join(f"\n    note: {note}" for note in staged.get("notes") or ())
            if published.get("revision"):
                notes += f"\n    revision: {published['revision']}"
            return (
                f"fetched {staged['rows_fetched']:>5} ({mode}, {staged['source']})  "
                f"added {published['rows_added']:>5}  updated {published['rows_updated']:>3}  "
                f"validation {published['validation']} ({published['checks']} checks)  "
                f"history {published['total_rows']} bars to {published['last_date']}{notes}"
            )

        return _run_per_ticker(tickers, ingest)

    if args.command == "train":

        def train(ticker: str) -> str:
            trained = train_step(ticker, as_of, settings, force=args.force)
            decision = promote_step(ticker, as_of, trained, settings)
            verdict = "PROMOTED" if decision["promoted"] else "not promoted"
            return (
                f"{trained['status']:<8} v{trained.get('version')}  U2 vs persistence "
                f"{_fmt_u2(trained.get('metrics') or {})}  vs range-aware naive "
                f"{_fmt_u2(trained.get('metrics_range_naive') or {})}  "
                f"{verdict}: {decision['reason']}"
            )

        return _run_per_ticker(tickers, train)

    forecasted = forecast_all(tickers, as_of, settings)

    def forecast(ticker: str) -> str:
        if ticker in forecasted["failed"]:
            raise TickerFailed(forecasted["failed"][ticker])
        row = forecasted["forecasts"].get(ticker)
        if row is None:
            return "no champion yet: nothing forecast"
        return (
            f"next bar after {row['last_bar_date']}: High {row['pred_high']:.4f}  "
            f"Low {row['pred_low']:.4f}  Close {row['pred_close']:.4f}  "
            f"Adj Close {row['pred_adj_close']:.4f}  (v{row['model_version']})"
        )

    return _run_per_ticker(tickers, forecast)
