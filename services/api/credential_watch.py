"""Close command streams whose credential died (issue 13, item 13).

An SSE command stream is bound to the token it was opened with (or to "no token" in
device-id-only mode). When that token is rotated, or the device is revoked, suspended,
deleted or given a token, the stream must stop receiving and claiming triggers: else
the holder of a stolen or retired token keeps taking commands the real device never
gets.

The database announces every such change on `camfleet_device_credentials`
(sql/migrations/0091), whichever API instance or CLI made it; each API instance LISTENs
on one dedicated connection, re-reads the device's credentials and closes its own
streams of that device whose token is no longer the live one. Commands queued for a
closed stream are dropped before they are claimed: they stay pending in the table and
go to the device's next (legitimate) stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator

import asyncpg
from fastapi import APIRouter, FastAPI

from camfleet.pg_listener import PgListener
from services.api.db import queries

log = logging.getLogger("camfleet.api.credentials")

CHANNEL = "camfleet_device_credentials"


def still_valid(row, token_hash: str | None) -> bool:
    """Whether a stream opened with `token_hash` (None: id-only) may stay open."""
    return (
        row is not None
        and row["revoked_at"] is None
        and row["status"] == "active"
        and row["device_token_hash"] == token_hash
    )


class CredentialWatch:
    def __init__(self, dsn: str, pool: asyncpg.Pool) -> None:
        self.dsn = dsn
        self.pool = pool
        # device id -> {stream: token hash it was opened with}; weak, so a stream that
        # ended (and was dropped by the command hub) needs no unbinding.
        self._streams: dict[str, weakref.WeakKeyDictionary] = {}
        self._listener = PgListener(
            dsn, CHANNEL, self._on_notify, on_reconnect=self._recheck_all, name="credential watch"
        )
        self._tasks: set[asyncio.Task] = set()
        self.closed = 0  # streams closed for a dead credential (for tests and logs)

    async def start(self) -> None:
        await self._listener.start()

    async def stop(self) -> None:
        await self._listener.stop()
        for task in list(self._tasks):
            task.cancel()

    async def _recheck_all(self) -> None:
        """After LISTEN reconnected: a notification may have been missed, check every
        stream."""
        for device_id in list(self._streams):
            self._recheck_soon(device_id)

    def bind(self, stream, token_hash: str | None) -> None:
        """Tie `stream` (command_hub.Stream) to the credential it was opened with."""
        self._streams.setdefault(stream.device_id, weakref.WeakKeyDictionary())[stream] = token_hash
        # The credential may have changed between authentication and this bind, and its
        # notification been handled before the stream was known: check once now.
        self._recheck_soon(stream.device_id)

    def _on_notify(self, device_id: str) -> None:
        if device_id in self._streams:
            self._recheck_soon(device_id)

    def _recheck_soon(self, device_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._recheck(device_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _recheck(self, device_id: str) -> None:
        streams = self._streams.get(device_id)
        if not streams:
            self._streams.pop(device_id, None)
            return
        try:
            async with self.pool.acquire() as conn:
                row = await queries().access_device_credentials(conn, device_id=device_id)
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("credential re-check of a stream failed: %s", type(exc).__name__)
            return
        for stream, token_hash in list(streams.items()):
            if not still_valid(row, token_hash):
                del streams[stream]
                self._close(stream)
        if not streams:
            self._streams.pop(device_id, None)

    def _close(self, stream) -> None:
        # Queued commands are dropped unclaimed (they stay pending for the next stream).
        with contextlib.suppress(asyncio.QueueEmpty):
            while True:
                stream.queue.get_nowait()
        stream.offer(None)
        self.closed += 1
        log.info(
            "closed a command stream of %s: its credential is no longer live", stream.device_id
        )


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    from camfleet.resolve import database_url

    dsn = getattr(app.state, "database_url", None) or database_url()
    watch = CredentialWatch(dsn, app.state.pool)
    await watch.start()
    app.state.credential_watch = watch
    try:
        yield
    finally:
        await watch.stop()


router = APIRouter(lifespan=lifespan)  # no routes: the watch's lifecycle only
