"""The device API's asyncpg pool: created in the app's lifespan, kept on `app.state.pool`.

Every router uses `request.app.state.pool` (or the `pool` dependency) and the named
queries of `sql/queries/*.sql` through `queries()` (aiosql, asyncpg driver). The
pool is created once per process; `create_app(pool=...)` may hand one in instead.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import asyncpg
from fastapi import FastAPI, Request

from camfleet import db as camfleet_db

# Connections per API process. One uvicorn process on a small box saturates its CPU long
# before 20 PostgreSQL connections are busy; more would only cost server memory.
POOL_MIN_SIZE = 2
POOL_MAX_SIZE = 20
# A request never waits longer than this for a connection or a statement: the device
# retries, which is better than a pile-up of stuck requests.
COMMAND_TIMEOUT_S = 10.0


class PooledConnection(asyncpg.Connection):
    """No reset query on release: asyncpg's default (unlock advisory locks, CLOSE ALL,
    UNLISTEN *, RESET ALL) is a round trip per request, a third of an ingest's database
    time. So pooled connections must never keep session state: no SET, no advisory
    lock, no LISTEN (use a dedicated connection, as the command hub does). An open
    transaction is still rolled back."""

    def get_reset_query(self) -> str:
        return "ROLLBACK;" if self.is_in_transaction() else ""


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb in and out as Python objects, as psycopg2 does for the sync code.
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(kind, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(dsn: str) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        dsn,
        min_size=POOL_MIN_SIZE,
        max_size=POOL_MAX_SIZE,
        command_timeout=COMMAND_TIMEOUT_S,
        init=_init_connection,
        connection_class=PooledConnection,
    )


def queries():
    """All named queries, asyncpg flavour: `await queries().foo(conn, **params)`."""
    return camfleet_db.async_queries()


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the pool unless one was handed in (`create_app(pool=...)`); close ours."""
    own = getattr(app.state, "pool", None) is None
    if own:
        from camfleet.resolve import database_url

        dsn = getattr(app.state, "database_url", None) or database_url()
        app.state.pool = await create_pool(dsn)
    if not hasattr(app.state, "processing_runs"):  # not handed in: from the environment
        from services.api.ingest_batches import runs_from_environment

        app.state.processing_runs = runs_from_environment()
    if app.state.processing_runs is not None:
        app.state.processing_runs.prepare()
    try:
        yield
    finally:
        runs = getattr(app.state, "processing_runs", None)
        if runs is not None:  # the ingest window assigner's Prefect client
            await runs.close()
        presigner = getattr(app.state, "presigner", None)
        if presigner is not None:  # its HTTP client for storage HEADs
            await presigner.aclose()
        if own:
            await app.state.pool.close()
            app.state.pool = None


def pool(request: Request) -> asyncpg.Pool:
    """FastAPI dependency: the process's pool."""
    return request.app.state.pool
