"""One PostgreSQL LISTEN connection that survives database restarts.

The API's command hub (`camfleet_triggers`) and credential watch
(`camfleet_device_credentials`) each hold one dedicated asyncpg connection LISTENing on
a channel. When PostgreSQL restarts, that connection dies and every notification sent
while it was down is lost; so the listener reconnects, re-LISTENs and then calls the
owner's `on_reconnect`, which re-reads from the tables whatever it may have missed.
This is the one copy of that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import asyncpg

log = logging.getLogger("camfleet.pg_listener")

# How long to wait before trying to reconnect after the connection dropped (and between
# failed attempts while the database is still down).
RETRY_SECONDS = 1.0


class PgListener:
    """LISTEN on `channel` over a dedicated connection; `on_notify(payload)` per NOTIFY.

    `start()` connects once (and raises if the database is unreachable, so a service
    does not come up deaf); afterwards a background task notices the connection's end,
    reconnects every `retry_seconds` until it succeeds, then awaits `on_reconnect()`.
    """

    def __init__(
        self,
        dsn: str,
        channel: str,
        on_notify: Callable[[str], None],
        *,
        on_reconnect: Callable[[], Awaitable[None]] | None = None,
        retry_seconds: float = RETRY_SECONDS,
        name: str = "listener",
    ) -> None:
        self.dsn = dsn
        self.channel = channel
        self.on_notify = on_notify
        self.on_reconnect = on_reconnect
        self.retry_seconds = retry_seconds
        self.name = name
        self.reconnects = 0  # successful reconnections (for tests and logs)
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def start(self) -> None:
        await self._connect()
        self._task = asyncio.create_task(self._keep_listening(), name=f"{self.name}-listen")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()

    async def _connect(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.add_listener(self.channel, self._deliver)
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.close()
            raise
        # Told when the connection ends (server restart, network), so the watchdog
        # reacts at once instead of at its next poll.
        conn.add_termination_listener(lambda _conn: self._lost.set())
        self._lost.clear()
        self._conn = conn

    def _deliver(self, _conn, _pid, _channel, payload: str) -> None:
        self.on_notify(payload)

    async def _keep_listening(self) -> None:
        while True:
            # The termination listener is the fast path; the timeout is the safety net
            # for a connection that ended without calling it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), self.retry_seconds)
            if self.connected:
                self._lost.clear()
                continue
            await asyncio.sleep(self.retry_seconds)
            try:
                await self._connect()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # The class name only: a libpq/asyncpg message could carry the DSN.
                log.warning("%s reconnect failed: %s", self.name, type(exc).__name__)
                self._lost.set()  # try again after retry_seconds
                continue
            self.reconnects += 1
            log.info("%s reconnected to LISTEN %s", self.name, self.channel)
            if self.on_reconnect is not None:
                try:
                    await self.on_reconnect()
                except Exception as exc:  # the listener itself must keep running
                    log.warning(
                        "%s re-load after reconnect failed: %s", self.name, type(exc).__name__
                    )
