"""camfleet/pg_listener.py against a real PostgreSQL that is stopped and restarted.

The command hub and the credential watch both rest on it: if it did not reconnect,
an API would silently stop delivering commands (and closing streams of revoked
devices) after the first database restart.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import pytest

from camfleet.localsvc import PostgresInstance
from camfleet.pg_listener import PgListener

CHANNEL = "camfleet_test_channel"
# Generous: a loaded 2-core machine restarts PostgreSQL in seconds, not milliseconds.
DEADLINE_S = 60.0


async def _notify(dsn: str, payload: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)
    finally:
        await conn.close()


async def _until(predicate, what: str) -> None:
    """Poll `predicate` until true, failing after DEADLINE_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def test_listener_reconnects_after_postgres_restarts_and_reloads(caplog):
    caplog.set_level(logging.WARNING, logger="camfleet.pg_listener")

    async def scenario(pg: PostgresInstance) -> None:
        received: asyncio.Queue[str] = asyncio.Queue()
        reloads: list[bool] = []

        async def reload() -> None:
            reloads.append(listener.connected)  # the owner re-reads on a live connection

        listener = PgListener(
            pg.dsn, CHANNEL, received.put_nowait, on_reconnect=reload, retry_seconds=0.1
        )
        await listener.start()
        try:
            await _notify(pg.dsn, "before")
            assert await asyncio.wait_for(received.get(), DEADLINE_S) == "before"

            await asyncio.to_thread(pg.stop)
            await _until(lambda: not listener.connected, "the listener to see the stop")
            # It keeps trying while the database stays down (several failed attempts)...
            await _until(
                lambda: sum("reconnect failed" in r.getMessage() for r in caplog.records) >= 2,
                "failed reconnect attempts",
            )
            assert reloads == []
            await asyncio.to_thread(pg.start)
            # ...and once it is back: LISTENs again, then lets its owner re-load.
            await _until(lambda: reloads, "the re-load after reconnecting")
            assert reloads == [True] and listener.reconnects == 1

            await _notify(pg.dsn, "after")
            assert await asyncio.wait_for(received.get(), DEADLINE_S) == "after"
        finally:
            await listener.stop()
        assert not listener.connected

    with PostgresInstance(fast=True) as pg:
        asyncio.run(scenario(pg))


def test_a_failing_reload_does_not_stop_the_listener(postgres, caplog):
    """The owner's re-load may fail (e.g. its pool is still reconnecting); notifications
    must keep flowing and the failure is logged without its message (no DSN in logs)."""
    caplog.set_level(logging.WARNING, logger="camfleet.pg_listener")

    async def scenario() -> None:
        received: asyncio.Queue[str] = asyncio.Queue()

        async def reload() -> None:
            raise RuntimeError("postgresql://user:hunter2@host/db")

        listener = PgListener(
            postgres.dsn, CHANNEL, received.put_nowait, on_reconnect=reload, retry_seconds=0.1
        )
        await listener.start()
        try:
            # End the listener's connection from the server side, as a restart would.
            admin = await asyncpg.connect(postgres.dsn)
            try:
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE pid <> pg_backend_pid() AND query LIKE 'LISTEN %' || $1 || '%'",
                    CHANNEL,
                )
            finally:
                await admin.close()
            await _until(lambda: listener.reconnects == 1, "the reconnect")
            await _until(
                lambda: any("re-load" in r.getMessage() for r in caplog.records), "the log"
            )
            await _notify(postgres.dsn, "still here")
            assert await asyncio.wait_for(received.get(), DEADLINE_S) == "still here"
        finally:
            await listener.stop()

    asyncio.run(scenario())
    assert "hunter2" not in caplog.text


def test_start_raises_when_the_database_is_unreachable():
    """A service must not come up deaf: the first connect's failure is the caller's."""
    with PostgresInstance(fast=True) as pg:
        dsn = pg.dsn
    listener = PgListener(dsn, CHANNEL, lambda _p: None)
    with pytest.raises(OSError):
        asyncio.run(listener.start())
