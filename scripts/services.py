"""The PostgreSQL databases and the Redis broker of the native production topology
(scripts/production_native.py): throwaway databases named by a token, an empty Redis database
number with a key prefix, and their removal.

PF_PG_HOST / PF_PG_PORT / PF_PG_USER and PF_REDIS_HOST / PF_REDIS_PORT point it elsewhere than
127.0.0.1:5432 (user `postgres`, trust auth) and 127.0.0.1:6379.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

PG_HOST = os.environ.get("PF_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("PF_PG_PORT", "5432"))
PG_USER = os.environ.get("PF_PG_USER", "postgres")
REDIS_HOST = os.environ.get("PF_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("PF_REDIS_PORT", "6379"))
DB_PREFIXES = ("pf_airflow_", "pf_mlflow_", "pf_mlflow_auth_", "pf_ledger_")


def pg_dsn(dbname: str = "postgres") -> str:
    return f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname={dbname} connect_timeout=5"


def pg_url(dbname: str, scheme: str = "postgresql") -> str:
    return f"{scheme}://{PG_USER}@{PG_HOST}:{PG_PORT}/{dbname}"


def pg_exec(sql: str, dbname: str = "postgres") -> list[tuple]:
    import psycopg2

    conn = psycopg2.connect(pg_dsn(dbname))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def existing_databases(prefixes: Iterable[str] = DB_PREFIXES) -> list[str]:
    """Databases whose name starts with one of `prefixes` (leftovers of the topology)."""
    names = [r[0] for r in pg_exec("SELECT datname FROM pg_database")]
    return sorted(n for n in names if n.startswith(tuple(prefixes)))


def redis_client(db: int = 0) -> Any:
    import redis

    return redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, socket_timeout=5)


@dataclass
class Resources:
    """The databases and Redis keys of one topology (named by `token`)."""

    token: str
    databases: list[str] = field(default_factory=list)  # created, so to drop
    redis_db: int | None = None
    redis_prefix: str = ""

    def __post_init__(self) -> None:
        self.redis_prefix = self.redis_prefix or f"pf_{self.token}:"

    def database(self, kind: str) -> str:
        """`pf_<kind>_<token>`: kind is airflow, mlflow, mlflow_auth or ledger."""
        return f"pf_{kind}_{self.token}"

    def create_database(self, name: str) -> None:
        pg_exec(f'CREATE DATABASE "{name}"')
        self.databases.append(name)

    def pick_redis_db(self) -> int:
        """An empty Redis database number (others' data stays out of reach); the key prefix
        keeps our keys apart even if all are busy."""
        import redis

        try:
            count = int(redis_client().config_get("databases").get("databases", 16))
        except redis.RedisError:
            count = 16
        candidates = list(range(1, count))
        secrets.SystemRandom().shuffle(candidates)
        self.redis_db = next(
            (n for n in candidates if redis_client(n).dbsize() == 0), candidates[0]
        )
        return self.redis_db

    @property
    def broker_url(self) -> str:
        return f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.redis_db}"

    def remove(self, report: dict[str, Any]) -> None:
        """Drop our databases and delete our Redis keys; each step runs even if one failed, and
        errors go to report["errors"]."""
        for name in self.databases:
            try:
                pg_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except Exception as exc:
                report["errors"].append(f"dropping {name}: {exc!r}")
        try:
            report["databases_left"] = sorted(set(existing_databases()) & set(self.databases))
        except Exception as exc:
            report["errors"].append(f"listing databases: {exc!r}")
        if self.redis_db is None:
            return
        try:
            client = redis_client(self.redis_db)
            keys = list(client.scan_iter(match=f"{self.redis_prefix}*", count=500))
            if keys:
                client.delete(*keys)
            report["redis_keys_deleted"] = len(keys)
            report["redis_keys_left"] = sum(
                1 for _ in client.scan_iter(match=f"{self.redis_prefix}*")
            )
        except Exception as exc:
            report["errors"].append(f"deleting Redis keys: {exc!r}")
