"""PostgreSQL access: migrations (yoyo), named queries (aiosql) and connections.

SQL lives in `sql/`: numbered migrations in `sql/migrations/`, named queries in
`sql/queries/*.sql` (`-- name: foo`), loaded once into the flat namespace `queries`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import aiosql
import psycopg2
import psycopg2.extras
import psycopg2.pool

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
MIGRATIONS_DIR = SQL_DIR / "migrations"
QUERIES_DIR = SQL_DIR / "queries"

# jsonb columns come back as dicts and dicts go in as jsonb.
psycopg2.extensions.register_adapter(dict, psycopg2.extras.Json)

queries = aiosql.from_path(QUERIES_DIR, "psycopg2", mandatory_parameters=False)


def connect(dsn: str, **kwargs) -> psycopg2.extensions.connection:
    """A new connection; the caller commits (or uses `transaction`)."""
    return psycopg2.connect(dsn, **kwargs)


@contextlib.contextmanager
def transaction(dsn_or_conn) -> Iterator[psycopg2.extensions.connection]:
    """Commit on success, roll back on error; closes the connection it opened."""
    own = isinstance(dsn_or_conn, str)
    conn = connect(dsn_or_conn) if own else dsn_or_conn
    try:
        with conn:  # psycopg2: commit/rollback, does not close
            yield conn
    finally:
        if own:
            conn.close()


# A connection the server dropped (restart, network): worth one retry on a fresh one.
CONNECTION_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)


class Pool:
    """A small thread-safe pool that keeps idle connections and drops broken ones.

    psycopg2's pool closes every connection handed back beyond `minconn`, so with
    minconn=0 each transaction forked a PostgreSQL backend (~10 ms of server CPU); it
    also keeps dead connections after a server restart. This pool opens connections
    only when needed (minconn 0 at start), keeps up to `maxconn` of them idle, and on
    a connection error drops every idle one: they died with the same server.
    """

    def __init__(self, dsn: str, maxconn: int = 8) -> None:
        self._pool = psycopg2.pool.ThreadedConnectionPool(0, maxconn, dsn)
        self._pool.minconn = maxconn  # keep what was opened; nothing opened up front

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg2.extensions.connection]:
        conn = self._pool.getconn()
        broken = False
        try:
            with conn:
                yield conn
        except CONNECTION_ERRORS:
            broken = True
            raise
        finally:
            self._pool.putconn(conn, close=broken or bool(conn.closed))
            if broken:
                self.close_idle()

    def close_idle(self) -> None:
        pool = self._pool
        with pool._lock:  # noqa: SLF001 - psycopg2 exposes no API for this
            idle, pool._pool = pool._pool, []  # noqa: SLF001
        for conn in idle:
            conn.close()

    def close(self) -> None:
        self._pool.closeall()


def migrate(dsn: str) -> list[str]:
    """Apply pending migrations; returns the ids applied (empty when up to date)."""
    from yoyo import get_backend, read_migrations

    backend = get_backend(_yoyo_uri(dsn))
    try:
        migrations = read_migrations(str(MIGRATIONS_DIR))
        with backend.lock():
            pending = backend.to_apply(migrations)
            backend.apply_migrations(pending)
        return [m.id for m in pending]
    finally:
        backend.connection.close()


def pending_migrations(dsn: str) -> list[str]:
    from yoyo import get_backend, read_migrations

    backend = get_backend(_yoyo_uri(dsn))
    try:
        return [m.id for m in backend.to_apply(read_migrations(str(MIGRATIONS_DIR)))]
    finally:
        backend.connection.close()


def _yoyo_uri(dsn: str) -> str:
    # yoyo picks its driver from the scheme: postgresql:// means psycopg2.
    if dsn.startswith("postgres://"):
        return "postgresql://" + dsn.removeprefix("postgres://")
    if "://" not in dsn:
        raise ValueError("DATABASE_URL must be a URL such as postgresql://user@host:5432/db")
    return dsn


def async_queries():
    """The same named queries for asyncpg (the device API's async code paths)."""
    global _async_queries
    if _async_queries is None:
        _async_queries = aiosql.from_path(QUERIES_DIR, "asyncpg", mandatory_parameters=False)
    return _async_queries


_async_queries = None
