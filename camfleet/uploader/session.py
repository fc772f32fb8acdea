"""The `events` table and the lock that keeps one event in one uploader at a time.

`EventSession` is one PostgreSQL connection per run. It holds a session-level advisory
lock per claimed event (`pg_try_advisory_lock`, never waiting), and every phase
statement for those events runs on that same connection. So:

- two runs at once (a slow run and the next scheduled one, or two machines sharing the
  pending directory) never work on the same event: the second one skips it;
- a crashed uploader releases its locks by dying (the server ends the session);
- if the connection drops mid-run, the locks are gone too, and a write on it fails;
  `ensure()` reconnects and re-claims, and drops the events someone else took meanwhile.

The statements are named queries in sql/queries/events.sql.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable

import psycopg2

from camfleet import db

# First key of every event-upload advisory lock (the second is hashtext(event_id)), so
# these locks never collide with other advisory locks in the same database. "cF" 0x01.
LOCK_NAMESPACE = 0x6346_0001
# A database that does not answer a connection attempt within this time is down for
# this attempt; the task retries with backoff and the files stay where they are.
CONNECT_TIMEOUT_S = 10
# No phase statement touches more than one row; one that runs this long is stuck.
STATEMENT_TIMEOUT_MS = 30_000
# TCP keepalive, so a database host that vanished is noticed within about a minute.
KEEPALIVE_IDLE_S = 30

# Errors that mean "the connection is gone", as opposed to a statement being refused.
CONNECTION_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)


class LockLost(RuntimeError):
    """Our connection dropped and another uploader took the event meanwhile."""


class EventSession:
    """One connection for one run: event locks plus the phase statements."""

    def __init__(self, dsn: str):
        self._dsn = dsn
        self._conn: psycopg2.extensions.connection | None = None
        self._lock = threading.Lock()
        self.locked: set[str] = set()

    # ---- connection ---------------------------------------------------------------

    def _connect(self) -> psycopg2.extensions.connection:
        conn = db.connect(
            self._dsn,
            connect_timeout=CONNECT_TIMEOUT_S,
            application_name="camfleet-event-upload",
            options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
            keepalives=1,
            keepalives_idle=KEEPALIVE_IDLE_S,
        )
        # Session-level locks and one statement per phase: nothing to group in a
        # transaction, and no transaction left open between phases.
        conn.autocommit = True
        return conn

    def _alive(self) -> bool:
        if self._conn is None or self._conn.closed:
            return False
        try:
            with self._conn.cursor() as cur:
                cur.execute("SELECT 1")
            return True
        except CONNECTION_ERRORS:
            return False

    def ensure(self) -> set[str]:
        """Reconnect if the connection died; returns the event ids whose lock was lost."""
        with self._lock:
            if self._alive():
                return set()
            self._discard()
            self._conn = self._connect()
            had, self.locked = self.locked, set()
            if not had:
                return set()
            regained = self._claim(sorted(had))
            return had - set(regained)

    def _discard(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: S110 - already broken
                pass
        self._conn = None

    def close(self) -> None:
        """Close the connection, which releases every lock it holds."""
        with self._lock:
            self._discard()
            self.locked.clear()

    def __enter__(self) -> EventSession:
        self.ensure()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- locks --------------------------------------------------------------------

    def claim(self, event_ids: Iterable[str]) -> list[str]:
        """Lock whichever of `event_ids` no other session holds; returns those."""
        self.ensure()
        with self._lock:
            return self._claim(list(event_ids))

    def _claim(self, event_ids: list[str]) -> list[str]:
        if not event_ids:
            return []
        rows = db.queries.events_claim(self._conn, event_ids=event_ids, namespace=LOCK_NAMESPACE)
        got = [row[0] for row in rows]
        self.locked.update(got)
        return got

    def release(self, event_id: str) -> None:
        with self._lock:
            if event_id in self.locked and self._conn is not None and not self._conn.closed:
                db.queries.events_unlock(self._conn, event_id=event_id, namespace=LOCK_NAMESPACE)
            self.locked.discard(event_id)

    def holds(self, event_id: str) -> bool:
        """Whether this run still holds the event's lock: its session is alive (one
        round trip). Asked right before a remote file is renamed into place, so an
        uploader whose session died mid-transfer never renames over another's work."""
        with self._lock:
            return event_id in self.locked and self._alive()

    def _require(self, event_id: str) -> None:
        if event_id not in self.locked:
            raise LockLost(f"event {event_id} is not locked by this run")

    # ---- phase statements -----------------------------------------------------------

    def insert_pending(self, event_id: str, metadata: dict, video_bytes: int) -> bool:
        """Phase 1. True: the row is 'pending' now; False: it was already 'completed'."""
        with self._lock:
            self._require(event_id)
            rows = db.queries.events_insert_pending_many(
                self._conn,
                event_ids=[event_id],
                metadata=[json.dumps(metadata)],
                video_bytes=[video_bytes],
            )
        return any(True for _ in rows)

    def insert_pending_many(self, jobs) -> set[str]:
        """Phase 1 for a batch in one statement; returns the ids now 'pending'."""
        jobs = list(jobs)
        with self._lock:
            for job in jobs:
                self._require(job.event_id)
            rows = db.queries.events_insert_pending_many(
                self._conn,
                event_ids=[j.event_id for j in jobs],
                metadata=[json.dumps(j.metadata) for j in jobs],
                video_bytes=[j.video_size for j in jobs],
            )
        return {row[0] for row in rows}

    def mark_completed_many(self, jobs) -> set[str]:
        """Phase 3 for a batch in one statement; returns the ids it completed."""
        jobs = list(jobs)
        with self._lock:
            for job in jobs:
                self._require(job.event_id)
            rows = db.queries.events_mark_completed_many(
                self._conn,
                event_ids=[j.event_id for j in jobs],
                remote_video_paths=[j.remote_video_path for j in jobs],
                remote_json_paths=[j.remote_json_path for j in jobs],
            )
        return {row[0] for row in rows}

    def mark_completed(self, event_id: str, remote_video_path: str, remote_json_path: str) -> bool:
        """Phase 3. True when this call moved the row from 'pending' to 'completed'."""
        with self._lock:
            self._require(event_id)
            count = db.queries.events_mark_completed(
                self._conn,
                event_id=event_id,
                remote_video_path=remote_video_path,
                remote_json_path=remote_json_path,
            )
        return count == 1

    def note_error(self, event_id: str, error: str) -> None:
        with self._lock:
            db.queries.events_note_error(self._conn, event_id=event_id, error=error)

    def mark_failed(self, event_id: str, error: str) -> None:
        with self._lock:
            db.queries.events_mark_failed(self._conn, event_id=event_id, error=error)

    def get(self, event_id: str) -> dict | None:
        with self._lock:
            row = db.queries.events_get(self._conn, event_id=event_id)
        if row is None:
            return None
        keys = (
            "event_id status metadata remote_video_path remote_json_path video_bytes "
            "attempts last_error created_at updated_at"
        ).split()
        return dict(zip(keys, row, strict=True))
