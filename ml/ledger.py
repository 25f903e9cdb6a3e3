"""The forecast ledger: every forecast, scored when its bar arrives; live metrics and input drift.

Three tables in a SQL database through SQLAlchemy Core (`LEDGER_DB_URL`; default SQLite at
`DATA_DIR/ledger.db`, PostgreSQL in production):

    forecasts  one row per (ticker, last_bar_date, model_version): the forecast of the bar after
               `last_bar_date` (the next session's date is not known when forecasting: holidays)
    outcomes   the same key, once that bar is published: errors per target, the same for
               persistence, whether the realized High/Low fell inside the predicted range, and
               whether the direction of Close was right
    monitor    one row per (ticker, as_of): live metrics over the last 20 and 60 scored bars,
               input drift against the champion's training block, and why to retrain (if so)

Point in time: a run for D scores only bars dated <= D and computes metrics from outcomes whose
bar is dated <= D. Every write is an upsert of values that depend only on the forecast and the
bar, in one transaction per run, so re-running a date changes nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.config import Settings
from ml.store import CorruptFile

if TYPE_CHECKING:
    import pandas as pd
    from sqlalchemy.engine import Engine

TARGETS = ("High", "Low", "Close")
LIVE_WINDOWS = (20, 60)
# Input drift: a two-sample Kolmogorov-Smirnov test per input (returns, log range, log volume) of
# the last DRIFT_BARS bars against the champion's training block; drifted when an input's p-value
# is below DRIFT_ALPHA / 3 (Bonferroni over the three inputs) AND its KS statistic is at least
# DRIFT_MIN_KS. The effect size matters: volatility clusters, so 60 bars often differ
# significantly from years of history (p alone flagged 12-16 of the 31 synthetic GARCH tickers on
# each of four dates; with KS >= 0.5, 0-2), while four times the volatility gives KS ~0.9.
DRIFT_BARS = 60
DRIFT_ALPHA = 0.01
DRIFT_MIN_KS = 0.5
# Retrain when the champion's live U2 on High or Low is >= 1 over the last LIVE_WINDOWS[0] bars.
LIVE_U2_LIMIT = 1.0


def ledger_url(settings: Settings) -> str:
    return settings.ledger_url or f"sqlite:///{settings.data_dir / 'ledger.db'}"


def ledger_location(settings: Settings) -> str:
    """Where the ledger is, for messages: the SQLite file, or the URL without its password."""
    from sqlalchemy.engine import make_url

    path = _sqlite_path(settings)
    return str(path) if path else make_url(ledger_url(settings)).render_as_string(True)


class CorruptLedger(CorruptFile):
    """The SQLite ledger file is not a readable database. It is left in place: the ledger is the
    store of record of every forecast, so it is never recreated behind the user's back."""


class LedgerWriteError(OSError):
    """SQLite could not write the ledger (disk full, a file size limit, an I/O error); the
    transaction was not committed (SQLite rolls it back from its journal)."""


# SQLite result codes (sqlite3 exceptions carry them as `sqlite_errorname`, Python >= 3.11).
_SQLITE_CORRUPT = ("SQLITE_NOTADB", "SQLITE_CORRUPT")
_SQLITE_WRITE_FAILED = ("SQLITE_FULL", "SQLITE_IOERR")


def _sqlite_error(exc: BaseException) -> Any:
    """The sqlite3 error behind `exc` (SQLAlchemy's `.orig`, pandas' `__cause__`), or None."""
    import sqlite3

    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, sqlite3.Error):
            return current
        todo.extend([getattr(current, "orig", None), current.__cause__, current.__context__])
    return None


def _sqlite_path(settings: Settings) -> Path | None:
    from sqlalchemy.engine import make_url

    url = make_url(ledger_url(settings))
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


@contextmanager
def _ledger_errors(settings: Settings) -> Iterator[None]:
    """Raise what an SQLite ledger's failure means for the user, naming the file and the way out:
    CorruptLedger (not a database, malformed) or LedgerWriteError (disk full, I/O error). Other
    errors, and every PostgreSQL error, pass unchanged."""
    try:
        yield
    except (CorruptLedger, LedgerWriteError):
        raise
    except Exception as exc:
        path = _sqlite_path(settings)
        cause = _sqlite_error(exc) if path is not None else None
        name = str(getattr(cause, "sqlite_errorname", "") or "")
        if cause is None or not name.startswith(_SQLITE_CORRUPT + _SQLITE_WRITE_FAILED):
            raise
        if name.startswith(_SQLITE_CORRUPT):
            raise _corrupt(path, f"{name}: {cause}") from exc
        raise LedgerWriteError(
            f"the forecast ledger {path} could not be written ({name}: {cause}; a full disk, a "
            "file size limit or a failing disk): the transaction was not committed, the ledger "
            "holds what it held before. Free space (or fix the disk) and run the step again."
        ) from exc


def _corrupt(path: Path, error: str) -> CorruptLedger:
    return CorruptLedger(
        f"the forecast ledger {path} is not a readable SQLite database ({error}). It is the "
        "store of record of every forecast and its score, so it is not recreated: restore it "
        f"from a backup, or move it aside (mv {path} {path}.corrupt) and the next run starts an "
        "empty ledger. The forecasts CSV export lists past forecasts but is not a backup: "
        "nothing reads it back into the ledger.",
        path,
    )


@lru_cache(maxsize=8)
def _engine(url: str) -> Engine:
    from sqlalchemy import create_engine, text

    engine = create_engine(url, future=True, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        # A damaged page may sit where no query of this run looks: check the whole file once per
        # process (milliseconds for a ledger) before anything is written into it.
        with engine.connect() as connection:
            problems = [row[0] for row in connection.execute(text("PRAGMA quick_check"))]
        if problems != ["ok"] and engine.url.database:
            found = "; ".join(" ".join(str(p).split()) for p in problems[:3])
            raise _corrupt(Path(engine.url.database), f"PRAGMA quick_check: {found}")
    _metadata().create_all(engine)
    return engine


def engine_for(settings: Settings) -> Engine:
    """The ledger's engine (tables created on first use); SQLite's folder is created too. An
    SQLite file that is not a sound database raises CorruptLedger (it is never recreated)."""
    if not settings.ledger_url:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    with _ledger_errors(settings):
        return _engine(ledger_url(settings))


@lru_cache(maxsize=1)
def _metadata() -> Any:
    from sqlalchemy import Boolean, Column, Float, MetaData, String, Table, Text

    metadata = MetaData()

    def key() -> list[Any]:
        return [
            Column("ticker", String(32), primary_key=True),
            Column("last_bar_date", String(10), primary_key=True),
            Column("model_version", String(32), primary_key=True),
        ]

    Table(
        "forecasts",
        metadata,
        *key(),
        Column("logical_date", String(10), nullable=False),
        Column("model_name", String(200), nullable=False),
        Column("last_close", Float, nullable=False),
        *[
            Column(f"pred_{t}", Float, nullable=False)
            for t in ("high", "low", "close", "adj_close")
        ],
        Column("source", String(32), nullable=False),
    )
    Table(
        "outcomes",
        metadata,
        *key(),
        Column("target_date", String(10), nullable=False, index=True),
        *[Column(f"actual_{t.lower()}", Float, nullable=False) for t in TARGETS],
        *[Column(f"err_{t.lower()}", Float, nullable=False) for t in TARGETS],
        *[Column(f"persistence_err_{t.lower()}", Float, nullable=False) for t in TARGETS],
        Column("inside_range", Boolean, nullable=False),
        Column("direction_hit", Boolean, nullable=True),  # None: no move, or no call
    )
    Table(
        "monitor",
        metadata,
        Column("ticker", String(32), primary_key=True),
        Column("as_of", String(10), primary_key=True),
        Column("model_version", String(32), nullable=True),
        Column("live", Text, nullable=False),  # JSON: window -> metrics
        Column("drift", Text, nullable=False),  # JSON
        Column("retrain_reason", Text, nullable=True),
    )
    return metadata


def _table(name: str) -> Any:
    return _metadata().tables[name]


def _upsert(connection: Any, name: str, rows: Sequence[dict[str, Any]]) -> None:
    """Insert or replace `rows` by primary key (SQLite and PostgreSQL: ON CONFLICT DO UPDATE)."""
    if not rows:
        return
    table = _table(name)
    keys = [c.name for c in table.primary_key.columns]
    dialect = connection.dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - the two databases the project runs on
        raise ValueError(f"the ledger supports SQLite and PostgreSQL, not {dialect}")
    statement = insert(table)
    updates = {c.name: statement.excluded[c.name] for c in table.columns if c.name not in keys}
    connection.execute(statement.on_conflict_do_update(index_elements=keys, set_=updates), rows)


def record_forecasts(settings: Settings, rows: Iterable[dict[str, Any]]) -> int:
    """Upsert forecast rows (as `ml.forecasting.forecast_row` makes them) in one transaction."""
    columns = {c.name for c in _table("forecasts").columns}
    clean = [{k: _plain(v) for k, v in row.items() if k in columns} for row in rows]
    with _ledger_errors(settings), engine_for(settings).begin() as connection:
        _upsert(connection, "forecasts", clean)
    return len(clean)


def read_table(settings: Settings, name: str) -> pd.DataFrame:
    import pandas as pd

    with _ledger_errors(settings), engine_for(settings).connect() as connection:
        frame = pd.read_sql_table(name, connection)
    keys = [c.name for c in _table(name).primary_key.columns]
    return frame.sort_values(keys, kind="stable").reset_index(drop=True)


# --- scoring -------------------------------------------------------------------------------------


def outcome_row(forecast: dict[str, Any], bar: dict[str, Any]) -> dict[str, Any]:
    """The outcome of one forecast against the realized `bar` (the first bar after its
    last_bar_date): errors (prediction - actual) per target, persistence's, range and direction."""
    last = float(forecast["last_close"])
    row = {k: forecast[k] for k in ("ticker", "last_bar_date", "model_version")}
    row["target_date"] = bar["Date"]
    for target in TARGETS:
        actual = float(bar[target])
        row[f"actual_{target.lower()}"] = actual
        row[f"err_{target.lower()}"] = float(forecast[f"pred_{target.lower()}"]) - actual
        row[f"persistence_err_{target.lower()}"] = last - actual
    row["inside_range"] = bool(
        float(bar["High"]) <= float(forecast["pred_high"])
        and float(bar["Low"]) >= float(forecast["pred_low"])
    )
    moved = float(bar["Close"]) - last
    called = float(forecast["pred_close"]) - last
    row["direction_hit"] = None if moved == 0 or called == 0 else (moved > 0) == (called > 0)
    return row


def score_outcomes(
    settings: Settings, histories: dict[str, pd.DataFrame], as_of: date
) -> dict[str, int]:
    """Score every forecast of these tickers whose next bar is now published (dated <= as_of).

    `histories` are the published bars per ticker up to `as_of`. Returns the number of scored
    outcomes per ticker (all of them, so a re-run reports the same). One transaction.
    """
    import pandas as pd
    from sqlalchemy import select

    forecasts = _table("forecasts")
    rows: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    with _ledger_errors(settings), engine_for(settings).begin() as connection:
        for ticker, history in histories.items():
            found = connection.execute(
                select(forecasts).where(
                    forecasts.c.ticker == ticker, forecasts.c.last_bar_date < as_of.isoformat()
                )
            ).mappings()
            dates = history["Date"].dt.strftime("%Y-%m-%d").to_numpy()
            counts[ticker] = 0
            for forecast in found:
                i = int(pd.Index(dates).searchsorted(forecast["last_bar_date"], side="right"))
                if i >= len(dates):
                    continue  # its bar has not arrived yet (as of this run)
                bar = history.iloc[i]
                rows.append(
                    outcome_row(
                        dict(forecast),
                        {
                            "Date": dates[i],
                            **{t: bar[t] for t in TARGETS},
                        },
                    )
                )
                counts[ticker] += 1
        _upsert(connection, "outcomes", rows)
    return counts


# --- live metrics and drift ----------------------------------------------------------------------


def live_metrics(outcomes: pd.DataFrame, windows: Sequence[int] = LIVE_WINDOWS) -> dict[str, Any]:
    """Over the last `w` scored bars (by target date) for each w in `windows`: MAE and U2 against
    persistence per target, range coverage and directional accuracy of Close, and the count."""
    import numpy as np

    ordered = outcomes.sort_values("target_date", kind="stable")
    out: dict[str, Any] = {}
    for w in windows:
        last = ordered.tail(w)
        stats: dict[str, Any] = {"n": len(last)}
        for target in TARGETS:
            err = last[f"err_{target.lower()}"].to_numpy(dtype=float)
            ref = last[f"persistence_err_{target.lower()}"].to_numpy(dtype=float)
            stats[f"mae_{target.lower()}"] = float(np.mean(np.abs(err))) if len(err) else None
            ref_rmse = float(np.sqrt(np.mean(ref**2))) if len(ref) else 0.0
            stats[f"u2_{target.lower()}"] = (
                float(np.sqrt(np.mean(err**2))) / ref_rmse if ref_rmse > 0 else None
            )
        stats["coverage"] = float(last["inside_range"].astype(bool).mean()) if len(last) else None
        calls = last["direction_hit"].dropna()
        stats["directional_accuracy"] = float(calls.astype(bool).mean()) if len(calls) else None
        out[str(w)] = stats
    return out


def _drift_inputs(bars: pd.DataFrame) -> dict[str, Any]:
    import numpy as np

    close = bars["Close"].to_numpy(dtype=float)
    return {
        "return": np.diff(np.log(close)),
        "log_range": np.log(bars["High"].to_numpy(dtype=float) / bars["Low"].to_numpy(dtype=float))[
            1:
        ],
        "log_volume": np.log1p(bars["Volume"].to_numpy(dtype=float))[1:],
    }


def input_drift(history: pd.DataFrame, train_end: date, bars: int = DRIFT_BARS) -> dict[str, Any]:
    """Two-sample Kolmogorov-Smirnov tests of the last `bars` bars of `history` against the
    training block (bars dated <= `train_end`), per input: returns, log range, log volume.

    KS because it needs no binning and no distribution, and reacts to a change of location or of
    scale (a regime of larger ranges is a change of scale); a constant input (forex volume) is
    skipped. Drifted when one input has p < DRIFT_ALPHA / 3 (Bonferroni) and KS >= DRIFT_MIN_KS.
    """
    import pandas as pd
    from scipy.stats import ks_2samp

    train = history.loc[history["Date"] <= pd.Timestamp(train_end)]
    recent = history.tail(bars + 1)
    if len(train) < bars or len(recent) < bars // 2:
        return {"tested": False, "reason": "too few bars", "drifted": False}
    before, after = _drift_inputs(train), _drift_inputs(recent)
    tests = {}
    for name in before:
        if before[name].std() == 0 and after[name].std() == 0:
            continue
        result = ks_2samp(after[name], before[name])
        tests[name] = {"ks": float(result.statistic), "p": float(result.pvalue)}
    return {
        "tested": True,
        "bars": bars,
        "train_end": train_end.isoformat(),
        "tests": tests,
        "drifted": any(
            t["p"] < DRIFT_ALPHA / 3 and t["ks"] >= DRIFT_MIN_KS for t in tests.values()
        ),
    }


def retrain_reason(live: dict[str, Any], drift: dict[str, Any]) -> str | None:
    """Why the next run should retrain this ticker, or None: live U2 >= 1 on High or Low over
    the first live window (when full), or input drift."""
    w = str(LIVE_WINDOWS[0])
    stats = live.get(w) or {}
    reasons = []
    if stats.get("n", 0) >= LIVE_WINDOWS[0]:
        for target in ("High", "Low"):
            value = stats.get(f"u2_{target.lower()}")
            if value is not None and value >= LIVE_U2_LIMIT:
                reasons.append(f"live U2 {target} {value:.3f} >= {LIVE_U2_LIMIT} over {w} bars")
    if drift.get("drifted"):
        worst = min(drift["tests"].items(), key=lambda kv: kv[1]["p"])
        reasons.append(
            f"input drift: {worst[0]} KS {worst[1]['ks']:.3f} (p {worst[1]['p']:.2g}) over the "
            f"last {drift['bars']} bars vs the training block"
        )
    return "; ".join(reasons) or None


@dataclass(frozen=True)
class Monitor:
    ticker: str
    as_of: str
    model_version: str | None
    live: dict[str, Any]
    drift: dict[str, Any]
    retrain_reason: str | None

    def row(self) -> dict[str, Any]:
        return {
            "ticker": self.ticker,
            "as_of": self.as_of,
            "model_version": self.model_version,
            "live": json.dumps(self.live, sort_keys=True),
            "drift": json.dumps(self.drift, sort_keys=True),
            "retrain_reason": self.retrain_reason,
        }


def monitor(
    settings: Settings,
    histories: dict[str, pd.DataFrame],
    champions: dict[str, tuple[str, date] | None],
    as_of: date,
) -> dict[str, Monitor]:
    """Score what can be scored, then live metrics and drift per ticker; one monitor row each.

    `champions` maps a ticker to its champion's (version, logical date) as of this run, or None.
    Live metrics cover every scored forecast of the ticker (the forecasts users saw, whichever
    version made them) with a bar dated <= as_of.
    """
    score_outcomes(settings, histories, as_of)
    outcomes = read_table(settings, "outcomes")
    outcomes = outcomes.loc[outcomes["target_date"] <= as_of.isoformat()]
    result: dict[str, Monitor] = {}
    for ticker, history in histories.items():
        champion = champions.get(ticker)
        live = live_metrics(outcomes.loc[outcomes["ticker"] == ticker])
        drift = (
            input_drift(history, _train_end(history, champion[1], settings))
            if champion
            else {"tested": False, "reason": "no champion", "drifted": False}
        )
        result[ticker] = Monitor(
            ticker,
            as_of.isoformat(),
            champion[0] if champion else None,
            live,
            drift,
            retrain_reason(live, drift) if champion else None,
        )
    with _ledger_errors(settings), engine_for(settings).begin() as connection:
        _upsert(connection, "monitor", [m.row() for m in result.values()])
    return result


def _train_end(history: pd.DataFrame, trained_for: date, settings: Settings) -> date:
    """The last bar date of the champion's training block: the first `split[0]` share of the
    bars it was trained on (those dated <= its logical date)."""
    import pandas as pd

    seen = history.loc[history["Date"] <= pd.Timestamp(trained_for)]
    if seen.empty:
        return trained_for
    n_train = max(1, int(len(seen) * settings.model.split[0]))
    return seen["Date"].iloc[n_train - 1].date()


def pending_retrains(
    settings: Settings, tickers: Iterable[str], as_of: date
) -> dict[str, tuple[str, str]]:
    """Tickers whose latest monitor row from before `as_of` asks for a retrain: (reason, the
    date of that row)."""
    from sqlalchemy import func, select

    table = _table("monitor")
    tickers = list(tickers)
    if not tickers:
        return {}
    latest = (
        select(table.c.ticker, func.max(table.c.as_of).label("as_of"))
        .where(table.c.ticker.in_(tickers), table.c.as_of < as_of.isoformat())
        .group_by(table.c.ticker)
        .subquery()
    )
    query = select(table.c.ticker, table.c.retrain_reason, table.c.as_of).join(
        latest, (table.c.ticker == latest.c.ticker) & (table.c.as_of == latest.c.as_of)
    )
    with _ledger_errors(settings), engine_for(settings).connect() as connection:
        return {t: (r, day) for t, r, day in connection.execute(query) if r}


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
