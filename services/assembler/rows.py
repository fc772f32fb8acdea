"""The assembler's batched row writer: device_errors, device_status, device_publish_log,
failed captures, device-reported failures and devices.last_seen_at.

Rows are queued by the worker thread and written every DB_FLUSH_INTERVAL_S by one
thread, one transaction per kind.  Two kinds of failure are told apart:

* the database is unreachable (OperationalError/InterfaceError): everything not yet
  written goes back to the queue, in order, and is retried with backoff;
* the database refuses a row (DataError, IntegrityError, a value the driver cannot
  encode...): the batch is bisected until the offending row is alone; that row is
  quarantined (dropped, with a 2205 error row saying which table and why) and every
  other row is written.  A poison row never blocks the fleet and is never re-queued.

The parser already normalizes what PostgreSQL cannot hold (camfleet/protocol/
assembler.py, ``normalize_json``); this is the second line, for whatever it missed.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import psycopg2.extras

from camfleet import db, metrics
from camfleet.protocol import assembler as core

log = logging.getLogger("camfleet.assembler")

# The db writer flushes at least this often (rows of status/errors/logs are not on the
# ACK path) or when this many rows are waiting.
DB_FLUSH_INTERVAL_S = 0.2
DB_FLUSH_ROWS = 2000
# Rows kept while the database is down, per kind; beyond it the oldest go first (and
# are counted in stats["rows_dropped"]).
MAX_PENDING_ROWS = 50_000

KINDS = ("error", "status", "log", "failed", "device_failure")

# device_publish_log gets a row per chunk (the seed's diagnostics query shows chunk ids),
# thousands a second: COPY costs PostgreSQL a third of the time of INSERT ... VALUES and
# this process half the CPU (measured on 20,000 rows).
_PUBLISH_LOG_COPY = (
    "COPY device_publish_log (device_id, topic, direction, payload, received_at)"
    " FROM STDIN WITH (FORMAT csv)"
)


def _copy_publish_log(cur, rows) -> None:
    """(device_id, topic, direction, payload dict, received_at) rows, in one COPY."""
    buf = io.StringIO()
    csv.writer(buf).writerows(
        (d, topic, direction, json.dumps(p, separators=(",", ":")), wall.isoformat())
        for d, topic, direction, p, wall in rows
    )
    buf.seek(0)
    cur.copy_expert(_PUBLISH_LOG_COPY, buf)


class _Unwritten(Exception):
    """The database went away mid-flush; these rows were not written."""

    def __init__(self, rows: list):
        super().__init__(f"{len(rows)} rows not written")
        self.rows = rows


def _short(exc: BaseException) -> str:
    """A one-line, storable description of why a row was refused (no values echoed
    beyond PostgreSQL's own first line; NUL and surrogates removed)."""
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return core._clean_text(text) or text  # noqa: SLF001 - the parser's own cleaner


class RowWriter:
    """Thread-safe queues of rows plus the flush that writes them (see module doc)."""

    def __init__(
        self,
        pool: db.Pool,
        stats: dict[str, int],
        on_device_failure_written: Callable[[core.RecordDeviceFailure, Any], None],
    ):
        self.pool = pool
        self.stats = stats
        self._on_device_failure_written = on_device_failure_written
        self._rows: dict[str, deque] = {k: deque() for k in KINDS}
        self._seen: dict[str, dt.datetime] = {}
        self._lock = threading.Lock()
        for k in ("rows_dropped", "rows_quarantined", "db_errors"):
            stats.setdefault(k, 0)

    # -- queueing (worker / ingest threads) ----------------------------------------------
    def queue(self, kind: str, row) -> None:
        with self._lock:
            rows = self._rows[kind]
            rows.append(row)
            if len(rows) > MAX_PENDING_ROWS:
                rows.popleft()
                self.stats["rows_dropped"] += 1

    def seen(self, device_id: str, wall: dt.datetime) -> None:
        with self._lock:
            self._seen[device_id] = wall

    def pending(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._rows.values()) + len(self._seen)

    # -- flush (db writer thread) --------------------------------------------------------
    def flush(self) -> None:
        """Write everything queued.  Raises a psycopg2 connection error (after putting
        back what was not written) when the database is unreachable."""
        with self._lock:
            taken = {k: list(v) for k, v in self._rows.items()}
            for v in self._rows.values():
                v.clear()
            seen, self._seen = self._seen, {}
        if not any(taken.values()) and not seen:
            return
        devices = sorted(
            set(seen)
            | {r[0] for r in taken["status"]}
            | {r["device_id"] for r in taken["error"] if r["device_id"]}
            | {r.device_id for r in taken["device_failure"]}
        )
        now = dt.datetime.now(dt.UTC)
        order = ["seen", *KINDS]
        batches: dict[str, list] = {"seen": [(d, seen.get(d) or now) for d in devices], **taken}
        for i, kind in enumerate(order):
            try:
                self._write_isolating(kind, batches[kind])
            except _Unwritten as exc:
                self._put_back(exc.rows, kind, {k: batches[k] for k in order[i + 1 :]})
                raise exc.__cause__ from None  # the connection error

    def _put_back(self, unwritten: list, kind: str, later: dict[str, list]) -> None:
        with self._lock:
            if kind == "seen":
                for d, w in unwritten:
                    self._seen.setdefault(d, w)
            else:
                self._rows[kind].extendleft(reversed(unwritten))
            for k, rows in later.items():
                if k == "seen":
                    for d, w in rows:
                        self._seen.setdefault(d, w)
                else:
                    self._rows[k].extendleft(reversed(rows))

    def _write_isolating(self, kind: str, rows: list) -> None:
        """Write rows; on a refused batch bisect down to the offending rows and
        quarantine only those."""
        stack = [rows] if rows else []
        while stack:
            part = stack.pop()
            try:
                self._write(kind, part)
            except db.CONNECTION_ERRORS as exc:
                remaining = part + [r for p in reversed(stack) for r in p]
                raise _Unwritten(remaining) from exc
            except Exception as exc:  # the database (or the driver) refused a value
                if len(part) == 1:
                    self._quarantine(kind, part[0], exc)
                else:
                    mid = len(part) // 2
                    stack.append(part[mid:])
                    stack.append(part[:mid])

    def _quarantine(self, kind: str, row, exc: BaseException) -> None:
        self.stats["rows_quarantined"] += 1
        device_id = _device_of(kind, row)
        log.warning(
            "device %s: %s row refused by the database (%s); quarantined",
            device_id,
            kind,
            type(exc).__name__,
        )
        metrics.count_assembler_error(2205)
        details = {
            "reason": "row_rejected",
            "table": _TABLES[kind],
            "error": type(exc).__name__,
            "message": _short(exc),
        }
        try:
            with self.pool.connection() as conn:
                db.queries.ingest_insert_error(
                    conn,
                    device_id=device_id,
                    capture_id=None,
                    error_code=2205,
                    severity=core.SEVERITY[2205],
                    message=core.DESCRIPTION[2205],
                    details=details,
                )
        except Exception:
            log.exception("device %s: could not record the quarantined row", device_id)
        if kind == "device_failure":  # the device still gets its answer
            try:
                self._on_device_failure_written(row, None)
            except Exception:
                log.exception("device %s: ACK after quarantine failed", device_id)

    def _write(self, kind: str, rows: list) -> None:
        q = db.queries
        acks = []
        with self.pool.connection() as conn:
            if kind == "seen":
                with conn.cursor() as cur:
                    psycopg2.extras.execute_values(cur, q.ingest_touch_devices_values.sql, rows)
            elif kind == "log":
                with conn.cursor() as cur:
                    _copy_publish_log(cur, rows)
            elif kind == "status":
                for device_id, status, pending in rows:
                    q.ingest_insert_status(
                        conn,
                        device_id=device_id,
                        status=status,
                        pending_count=pending,
                        payload={"status": status, "pendingImg": pending},
                    )
            elif kind == "error":
                for row in rows:
                    q.ingest_insert_error(conn, **row)
            elif kind == "failed":
                for f in rows:
                    q.ingest_mark_capture_failed(
                        conn,
                        device_id=f.device_id,
                        device_capture_id=f.image_name,
                        captured_at=None,
                        image_bytes=f.metadata.get("image_size"),
                        total_chunks=f.total_chunks,
                        metadata={**f.metadata, "failed_code": f.code},
                    )
            elif kind == "device_failure":
                acks = _write_device_failures(conn, rows)
        for row, config in acks:  # committed: only now may the device move on
            self._on_device_failure_written(row, config)


_TABLES = {
    "seen": "devices",
    "log": "device_publish_log",
    "status": "device_status",
    "error": "device_errors",
    "failed": "captures",
    "device_failure": "captures",
}


def _device_of(kind: str, row) -> str | None:
    if kind in ("seen", "log", "status"):
        return row[0]
    if kind == "error":
        return row.get("device_id")
    return getattr(row, "device_id", None)


def _write_device_failures(conn, rows: list[core.RecordDeviceFailure]) -> list:
    """A device-reported capture failure: a failed `captures` row saying why, the sensor
    reading the device still took, and an error row with the device's own code."""
    from tasks.mqtt import _captured_at

    q = db.queries
    out = []
    for f in rows:
        meta = {**f.metadata, "device_error": f.device_error, "failure_reason": f.message}
        captured_at = _captured_at(f.metadata)
        row = q.ingest_record_device_failure(
            conn,
            device_id=f.device_id,
            device_capture_id=f.image_name,
            captured_at=captured_at,
            metadata=meta,
        )
        record_id = row[0] if row else None
        if record_id is not None:
            q.ingest_upsert_sensor_reading(
                conn,
                device_id=f.device_id,
                capture_id=record_id,
                recorded_at=captured_at,
                **core.sensor_reading(f.metadata),
            )
        q.ingest_insert_error(
            conn,
            device_id=f.device_id,
            capture_id=record_id or f.image_name,
            error_code=f.device_error,
            severity="error",
            message=f.message,
            details={"reason": "device_reported", "image_name": f.image_name},
        )
        out.append(f)
    configs = {
        r[0]: r[1]
        for r in q.ingest_device_configs(conn, device_ids=sorted({f.device_id for f in out}))
    }
    return [(f, configs.get(f.device_id)) for f in out]
