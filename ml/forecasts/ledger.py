"""The forecast ledger's database: tables, engine, upserts, and the errors a user can act on.

Three tables in a SQL database through SQLAlchemy Core (`LEDGER_DB_URL`; default SQLite at
`DATA_DIR/ledger.db`, PostgreSQL in production):

    forecasts  one row per (ticker, last_bar_date, model_version): the forecast of the bar after
               `last_bar_date` (the next session's date is not known when forecasting: holidays),
               its points and its quantiles (NULL from a model saved before them)
    outcomes   the same key, once that bar is published: errors per target, the same for
               persistence, whether the realized High/Low fell inside the predicted range,
               whether the direction of Close was right, and the quantiles' coverage flags and
               Close's 90 % interval score beside historical simulation's (NULL without)
    monitor    one row per (ticker, as_of): live metrics over the last 20 and 60 scored bars,
               input drift against the champion's training block, and why to retrain (if so)

Every write is an upsert of values that depend only on the forecast and the bar, in one
transaction per run, so re-running a date changes nothing. An outcome is in the units its
forecast was made in: after a split or dividend re-adjusted the published history, the realized
bar is scaled back by the forecast's last Close over the published Close of that date
(`ml.forecasts.monitor.forecast_units`), so an event makes no fake miss or drift. A ledger
created by an earlier version gets the nullable columns it lacks when it is opened. Scoring and
monitoring are in `ml.forecasts.monitor`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml.config import ConfigError, Settings
from ml.data.store import CorruptFile
from ml.model.features import JUDGED_TARGETS
from ml.model.quantiles import RECORD_KEYS

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
    """SQLite could not write the ledger (disk full, a file size limit, an I/O error, a read-only
    file or filesystem); the transaction was not committed (SQLite rolls it back from its
    journal)."""


class LedgerConfigError(ConfigError):
    """The ledger's setting points where no database can be: a folder that does not exist, a
    folder where the SQLite file should be, a file where a folder should be, a driver that is
    not installed. Nothing was done; the command line exits 2, as for any other bad setting."""


class LedgerUnavailable(OSError):
    """The ledger's database cannot be reached or opened now (a PostgreSQL server down or
    refusing the login, an SQLite file this user may not open): the step fails, a retry once it
    is back does the work."""


# The outcome's coverage flags (`covered_<name>`): Close inside its 80 % and 90 % intervals, High
# at or below its 0.90 quantile, Low at or above its 0.10 quantile (`ml.model.probabilistic`'s
# INTERVALS and TAILS of the same names).
COVERAGES = ("close_80", "close_90", "high_q90", "low_q10")


# SQLite result codes (sqlite3 exceptions carry them as `sqlite_errorname`, Python >= 3.11).
_SQLITE_CORRUPT = ("SQLITE_NOTADB", "SQLITE_CORRUPT")


_SQLITE_WRITE_FAILED = ("SQLITE_FULL", "SQLITE_IOERR")

_SQLITE_READONLY = "SQLITE_READONLY"

_SQLITE_CANTOPEN = "SQLITE_CANTOPEN"

# Seconds a PostgreSQL connection attempt may take (libpq's `connect_timeout`, unless the URL
# sets one): without it, a host that drops packets holds the step for the system's TCP timeout,
# minutes.
PG_CONNECT_TIMEOUT = 10


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
    from urllib.parse import urlsplit

    from sqlalchemy.engine import make_url

    url = make_url(ledger_url(settings))
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    if url.query.get("uri") == "true" and url.database.startswith("file:"):
        return Path(urlsplit(url.database).path)  # sqlite:///file:/path?mode=ro&uri=true
    return Path(url.database)


def _setting(settings: Settings) -> str:
    """The setting that chose the ledger's location, for messages."""
    return "LEDGER_DB_URL" if settings.ledger_url else "DATA_DIR"


def _unopenable(settings: Settings, path: Path, error: str) -> Exception:
    """What an SQLite file that cannot be opened or created means: LedgerConfigError when the
    setting points where no file can be (a file where a folder should be, a folder where the
    file should be, an LEDGER_DB_URL folder that does not exist), LedgerUnavailable otherwise
    (no permission, a read-only filesystem)."""
    setting = _setting(settings)
    if path.is_dir():
        return LedgerConfigError(
            f"{setting}: the forecast ledger {path} is a folder, not an SQLite file ({error}): "
            f"point {setting} at a file (e.g. {path / 'ledger.db'})"
        )
    blocking = next((p for p in path.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        return LedgerConfigError(
            f"{setting}: the forecast ledger {path} cannot be created: {blocking} is a file, "
            f"not a folder ({error}); point {setting} into a folder"
        )
    if settings.ledger_url and not path.parent.is_dir():
        # DATA_DIR is created on first use; a folder named in the URL is not: a typo would start
        # an empty ledger beside the real one.
        return LedgerConfigError(
            f"LEDGER_DB_URL: the forecast ledger {path} cannot be created: the folder "
            f"{path.parent} does not exist ({error}); create it (mkdir -p {path.parent}) or fix "
            "LEDGER_DB_URL"
        )
    return LedgerUnavailable(
        f"the forecast ledger {path} cannot be opened or created ({error}): make it and its "
        f"folder writable by this user (a read-only filesystem?) or point {setting} elsewhere, "
        "then run the step again"
    )


@contextmanager
def ledger_errors(settings: Settings) -> Iterator[None]:
    """Raise what a failure of the ledger's database means for the user, naming the file or the
    server and the way out: CorruptLedger (not a database, malformed), LedgerWriteError (disk
    full, I/O error, read-only), LedgerConfigError or LedgerUnavailable (cannot be opened or
    reached: see `_unopenable`; a PostgreSQL server down or refusing the login). Other errors
    (a bug, a constraint) pass unchanged."""
    try:
        yield
    except (CorruptLedger, LedgerWriteError, LedgerConfigError, LedgerUnavailable):
        raise
    except Exception as exc:
        meaning = _meaning(settings, exc)
        if meaning is None:
            raise
        raise meaning from exc


def _meaning(settings: Settings, exc: Exception) -> Exception | None:
    """The error `ledger_errors` raises for `exc`, or None to raise `exc` as it is."""
    path = _sqlite_path(settings)
    if path is None:
        return _unreachable(settings, exc)
    cause = _sqlite_error(exc)
    name = str(getattr(cause, "sqlite_errorname", "") or "")
    if cause is None:
        return None
    if name.startswith(_SQLITE_CORRUPT):
        return _corrupt(path, f"{name}: {cause}")
    if name.startswith(_SQLITE_CANTOPEN):
        return _unopenable(settings, path, f"{name}: {cause}")
    if name.startswith(_SQLITE_READONLY):
        return LedgerWriteError(
            f"the forecast ledger {path} is read-only here ({name}: {cause}; a read-only file, "
            "folder or filesystem, or a URL with mode=ro): the transaction was not committed, "
            f"the ledger holds what it held before. Make it writable by this user (or point "
            f"{_setting(settings)} at a writable place) and run the step again."
        )
    if name.startswith(_SQLITE_WRITE_FAILED):
        return LedgerWriteError(
            f"the forecast ledger {path} could not be written ({name}: {cause}; a full disk, a "
            "file size limit or a failing disk): the transaction was not committed, the ledger "
            "holds what it held before. Free space (or fix the disk) and run the step again."
        )
    return None


def _unreachable(settings: Settings, exc: Exception) -> LedgerUnavailable | None:
    """LedgerUnavailable for a database server that could not be connected to, or dropped the
    connection (SQLAlchemy: no statement yet, or an invalidated connection); else None."""
    from sqlalchemy.exc import DBAPIError

    if not isinstance(exc, DBAPIError) or not (exc.statement is None or exc.connection_invalidated):
        return None
    reason = " ".join(str(exc.orig or exc).split()) or type(exc.orig or exc).__name__
    return LedgerUnavailable(
        f"the forecast ledger's database {ledger_location(settings)} (LEDGER_DB_URL) cannot be "
        f"reached ({reason}): start it, or fix the host, port, user, password or database in "
        "LEDGER_DB_URL; then run the step again"
    )


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
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    connect_args: dict[str, Any] = {}
    if (
        parsed.get_driver_name() in ("psycopg2", "psycopg")
        and "connect_timeout" not in parsed.query
    ):
        connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT
    engine = create_engine(url, future=True, pool_pre_ping=True, connect_args=connect_args)
    if engine.dialect.name == "sqlite":
        # A damaged page may sit where no query of this run looks: check the whole file once per
        # process (milliseconds for a ledger) before anything is written into it.
        with engine.connect() as connection:
            problems = [row[0] for row in connection.execute(text("PRAGMA quick_check"))]
        if problems != ["ok"] and engine.url.database:
            found = "; ".join(" ".join(str(p).split()) for p in problems[:3])
            raise _corrupt(Path(engine.url.database), f"PRAGMA quick_check: {found}")
    _metadata().create_all(engine)
    _add_missing_columns(engine)
    return engine


def _add_missing_columns(engine: Engine) -> None:
    """Add the nullable columns a ledger created by an earlier version lacks (its rows read them
    as NULL: an older forecast has no quantiles). Another process may be adding them too: on
    PostgreSQL `IF NOT EXISTS`, on SQLite a duplicate column is taken as done."""
    from sqlalchemy import inspect, text
    from sqlalchemy.exc import OperationalError

    quote = engine.dialect.identifier_preparer.quote
    guard = "IF NOT EXISTS " if engine.dialect.name == "postgresql" else ""
    for table in _metadata().sorted_tables:
        present = {c["name"] for c in inspect(engine).get_columns(table.name)}
        for col in table.columns:
            if col.name in present or not col.nullable:
                continue
            kind = col.type.compile(dialect=engine.dialect)
            statement = (
                f"ALTER TABLE {quote(table.name)} ADD COLUMN {guard}{quote(col.name)} {kind}"
            )
            try:
                with engine.begin() as connection:
                    connection.execute(text(statement))
            except OperationalError as exc:
                if "duplicate column" not in str(exc).lower():
                    raise


def engine_for(settings: Settings) -> Engine:
    """The ledger's engine (tables created on first use); DATA_DIR is created for the default
    SQLite file. An SQLite file that is not a sound database raises CorruptLedger (it is never
    recreated); a location or a server that cannot serve, LedgerConfigError or
    LedgerUnavailable (`ledger_errors`)."""
    with ledger_errors(settings):
        if not settings.ledger_url:
            try:
                settings.data_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                error = f"{type(exc).__name__}: {exc}"
                raise _unopenable(settings, settings.data_dir / "ledger.db", error) from exc
        try:
            return _engine(ledger_url(settings))
        except ImportError as exc:  # the URL's driver (postgresql+psycopg) is not installed
            raise LedgerConfigError(
                f"LEDGER_DB_URL: the database driver of {ledger_location(settings)} is not "
                f"installed ({exc}): install it, or name an installed one "
                "(postgresql+psycopg2://...)"
            ) from exc


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
        # The next bar's quantiles (`ml.model.quantiles.record_key`); NULL from a model without.
        *[Column(k, Float, nullable=True) for k in RECORD_KEYS],
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
        # The quantiles' scores (`ml.forecasts.monitor.interval_scores`); NULL without quantiles.
        *[Column(f"covered_{k}", Boolean, nullable=True) for k in COVERAGES],
        Column("interval_score_close_90", Float, nullable=True),
        Column("hs_interval_score_close_90", Float, nullable=True),
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
    table = ledger_table("forecasts")
    columns = {c.name for c in table.columns}
    # A row without quantiles (a model saved before them) stores NULL there.
    empty = {c.name: None for c in table.columns if c.nullable}
    clean = [{**empty, **{k: plain(v) for k, v in row.items() if k in columns}} for row in rows]
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
