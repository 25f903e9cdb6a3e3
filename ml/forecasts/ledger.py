"""The forecast ledger's database: tables, engine, upserts, and the errors a user can act on.

Three tables in a SQL database through SQLAlchemy Core (`LEDGER_DB_URL`; default SQLite at
`DATA_DIR/ledger.db`, PostgreSQL in production):

    forecasts  one row per (ticker, last_bar_date, model_version): the forecast of the bar after
               `last_bar_date` (the next session's date is not known when forecasting: holidays)
    outcomes   the same key, once that bar is published: errors per target, the same for
               persistence, whether the realized High/Low fell inside the predicted range, and
               whether the direction of Close was right
    monitor    one row per (ticker, as_of): live metrics over the last 20 and 60 scored bars,
               input drift against the champion's training block, and why to retrain (if so)

Every write is an upsert of values that depend only on the forecast and the bar, in one
transaction per run, so re-running a date changes nothing. An outcome is in the units its
forecast was made in: after a split or dividend re-adjusted the published history, the realized
bar is scaled back by the forecast's last Close over the published Close of that date
(`ml.forecasts.monitor.forecast_units`), so an event makes no fake miss or drift. Scoring and monitoring are in
`ml.forecasts.monitor`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.config import Settings
from ml.data.store import CorruptFile
from ml.model.features import JUDGED_TARGETS

if TYPE_CHECKING:
    import pandas as pd
    from sqlalchemy.engine import Engine


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
def ledger_errors(settings: Settings) -> Iterator[None]:
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
    with ledger_errors(settings):
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
        *[Column(f"actual_{t.lower()}", Float, nullable=False) for t in JUDGED_TARGETS],
        *[Column(f"err_{t.lower()}", Float, nullable=False) for t in JUDGED_TARGETS],
        *[Column(f"persistence_err_{t.lower()}", Float, nullable=False) for t in JUDGED_TARGETS],
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


def ledger_table(name: str) -> Any:
    return _metadata().tables[name]


def upsert(connection: Any, name: str, rows: Sequence[dict[str, Any]]) -> None:
    """Insert or replace `rows` by primary key (SQLite and PostgreSQL: ON CONFLICT DO UPDATE)."""
    if not rows:
        return
    table = ledger_table(name)
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
    """Upsert forecast rows (as `ml.forecasts.export.forecast_row` makes them) in one transaction."""
    columns = {c.name for c in ledger_table("forecasts").columns}
    clean = [{k: plain(v) for k, v in row.items() if k in columns} for row in rows]
    with ledger_errors(settings), engine_for(settings).begin() as connection:
        upsert(connection, "forecasts", clean)
    return len(clean)


def read_table(settings: Settings, name: str) -> pd.DataFrame:
    import pandas as pd

    with ledger_errors(settings), engine_for(settings).connect() as connection:
        frame = pd.read_sql_table(name, connection)
    keys = [c.name for c in ledger_table(name).primary_key.columns]
    return frame.sort_values(keys, kind="stable").reset_index(drop=True)


def plain(value: Any) -> Any:
    """A JSON-friendly Python scalar from a pandas/numpy one (NaN as None)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
