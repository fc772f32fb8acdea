"""The long-running MQTT chunk assembler (seed 002, "GXP MQTT Worker"), `camfleet assembler`.

A thin shell around the sans-IO core `camfleet.protocol.assembler.Assembler`:

    paho network thread   on_message: (topic, payload, t) -> inbox queue. Nothing else:
                          it never parses, blocks, touches SQL or Prefect.
    worker thread         feeds the core, ticks it at next_deadline(), publishes NACKs,
                          hands finished images to the ingest thread and rows
                          (errors, status, last_seen, publish log) to the db writer.
    ingest thread         its own asyncio loop; collects finished images into batches
                          and runs ONE `mqtt-ingest` flow run per batch (up to
                          MAX_CONCURRENT_BATCHES at once): store objects, write rows,
                          then ACK_OK (flows/mqtt_ingest.py).
    db writer thread      batched inserts for device_errors, device_status,
                          device_publish_log and devices.last_seen_at.

Decision: no flow run between a device's last chunk and its ACK_OK (measured)
---------------------------------------------------------------------------
ACK_OK may only be sent once the object and its row are durable, and the target is
p99 <= 1 s after the last chunk at 100 devices.  Both designs are implemented and
measured by bench/bench_mqtt_ingest.py on this 2-core machine (100 devices x 10
images x 45 chunks, QoS 1; the machine was shared with other benchmarks, so the
plain-subscriber baseline itself drifted between ~3,400 and ~6,700 chunks/s):

* ``--ack-path flow``: one in-process async `mqtt-ingest` flow run per batch whose
  tasks store, write rows and ACK.  A run took p50 0.6-1.0 s, p99 1.3-2.8 s (the flow
  run, three task runs and their events compete with the assembler for the GIL and
  with the Prefect server for the CPUs): ACK p50 0.9-1.6 s, p99 1.5-3.4 s, 0.28-0.56x
  the plain subscriber.  Misses the target.
* ``--ack-path direct`` (default): the service's batch runs the very same task bodies
  (store with retries and exponential backoff, one transaction for the rows, then
  ACK) without Prefect: batch p50 ~50-95 ms, ACK p50 0.18-0.29 s, p99 0.66-0.77 s,
  0.51-0.82x.  Every RECORD_INTERVAL_S the ACKed captures go to ONE
  `mqtt-ingest-record` flow run (in a child process, so Prefect's client never holds
  this process's GIL) that verifies their objects and stamps its id on their rows
  (``flow_run_id``): the UI shows which run covers which capture, at one flow run per
  interval (4 runs for 1,000 images) instead of one per batch.  Cost: the child is a
  second Python process with Prefect loaded (~120 MB RSS).

Batches are formed by load: a batch takes everything that finished while the previous
batches were busy (up to MAX_BATCH_IMAGES).  ``--no-prefect`` drops the recording run
too (rows then carry no flow_run_id).

Persistent session: a stable client id with clean_session=False and QoS 1
subscriptions, so the broker queues a device's chunks while we reconnect (backoff
1..30 s); `stop()` finishes the stores in flight, ACKs them, then disconnects.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import logging
import multiprocessing
import queue
import re
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extras

from camfleet import db
from camfleet.protocol import assembler as core

log = logging.getLogger("camfleet.assembler")

# Finished images per flow run.  100 devices finishing together fit in one run, and a
# run of 200 x ~45 KB stays a ~9 MB working set.
MAX_BATCH_IMAGES = 200
# How long the first image of a batch waits for company when a run slot is free: short
# against the 1 s ACK target, long enough to catch images finishing in the same burst.
BATCH_WINDOW_S = 0.02
# Flow runs in flight: two overlap one run's Prefect bookkeeping with the next one's
# store and SQL; more would just queue on the Prefect server (2 cores).
MAX_CONCURRENT_BATCHES = 2
# The db writer flushes at least this often (rows of status/errors/logs are not on the
# ACK path) or when this many rows are waiting.
DB_FLUSH_INTERVAL_S = 0.2
DB_FLUSH_ROWS = 2000
# Rows kept while the database is down, per kind; beyond it the oldest log rows go
# first (device_publish_log is diagnostics, errors and status are kept longer).
MAX_PENDING_ROWS = 50_000
# Reconnect backoff to the broker.
RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30
# paho in-flight / queued QoS 1 publishes (ACKs/NACKs): lifted from paho's default 20,
# a batch ACKs up to MAX_BATCH_IMAGES devices at once.
MAX_INFLIGHT_PUBLISHES = 1000
# The recording flow run (default ACK path): at most one per interval, covering up to
# RECORD_MAX captures; 2 s keeps Prefect at ~0.5 runs/s whatever the image rate.
RECORD_INTERVAL_S = 2.0
RECORD_MAX = 2000
# A recording run that keeps failing gives up on its captures after this many tries
# (they are stored and ACKed; only the flow_run_id stays empty).
RECORD_ATTEMPTS = 5
# Assembled images waiting for (or inside) a store/row/ACK batch.  When storage or the
# database stalls, images beyond this are refused (2200 "ingest_backlog", no ACK: the
# device keeps its copy and resends) instead of growing the heap without bound.
MAX_BACKLOG_BYTES = 128 * 1024 * 1024
# How long stop() waits for in-flight stores before giving up (devices resend anyway).
SHUTDOWN_TIMEOUT_S = 60


@dataclass
class ServiceConfig:
    database_url: str
    storage_url: str
    timing: core.Timing = core.Timing()
    limits: core.Limits = core.Limits()
    client_id: str = "camfleet-assembler"
    log_control_only: bool = False
    use_prefect: bool = True
    ack_path: str = "direct"  # or "flow": a flow run per batch on the ACK path
    # Where recording flow runs execute: "inline" on this process's event loop (one
    # process, ~20 MB more), or "process", a spawned child with its own Prefect client
    # (off this GIL, ~120 MB more for Prefect's own imports).
    recorder: str = "inline"
    max_batch_images: int = MAX_BATCH_IMAGES
    batch_window_s: float = BATCH_WINDOW_S
    max_concurrent_batches: int = MAX_CONCURRENT_BATCHES
    topics: tuple[str, str, str] = ("ESP32CAM/+/status", "ESP32CAM/+/data", "ESP32CAM/+/ack")


def redact_url(url: str) -> str:
    """A URL for logs: no password, no query string secrets."""
    url = re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url)
    return re.sub(r"(?i)(password|secret|token|key)=[^&]*", r"\1=***", url)


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


class AssemblerService:
    def __init__(self, broker, config: ServiceConfig, store=None):
        from camfleet.storage import open_store

        self.broker = broker
        self.cfg = config
        self.store = store or open_store(config.storage_url)
        self.pool = db.Pool(config.database_url, maxconn=6)
        self.core = core.Assembler(config.limits, config.timing)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.finished: queue.SimpleQueue = queue.SimpleQueue()
        self._rows: dict[str, deque] = {
            k: deque() for k in ("error", "status", "log", "failed", "seen")
        }
        self._rows_lock = threading.Lock()
        self._seen: dict[str, dt.datetime] = {}
        self._stopping = threading.Event()
        self._worker_done = threading.Event()
        self._connected = threading.Event()
        self._threads: list[threading.Thread] = []
        self._inflight_batches = 0
        self._ingest_idle = threading.Event()
        self._ingest_idle.set()
        self._ingest_loop: asyncio.AbstractEventLoop | None = None
        self._to_record: deque = deque()
        self._backlog_bytes = 0
        self._backlog_lock = threading.Lock()
        self._recorder_lock = threading.Lock()
        self._recorder_proc = None
        self._recorder_conn = None
        self.client = None
        self.stats = {"messages": 0, "batches": 0, "acks": 0, "nacks": 0, "db_errors": 0}
        # timings for the summary printed at stop (bounded: the last 100k of each)
        self._batch_seconds: deque = deque(maxlen=100_000)
        self._finalize_to_ack: deque = deque(maxlen=100_000)

    # -- banner --------------------------------------------------------------------
    def banner(self) -> str:
        line = "=" * 60
        if not self.cfg.use_prefect:
            prefect = "off"
        elif self.cfg.ack_path == "flow":
            prefect = "one mqtt-ingest flow run per batch (on the ACK path)"
        else:
            prefect = f"one mqtt-ingest-record flow run per {RECORD_INTERVAL_S:g} s"
        return "\n".join(
            [
                line,
                "camfleet MQTT assembler - ESP32S3-CAM Fleet Ingestion",
                line,
                f"MQTT Broker: {self.broker.host}:{self.broker.port} (TLS: {self.broker.tls})",
                f"Database: {redact_url(self.cfg.database_url)}",
                f"Storage: {redact_url(self.store.describe())}",
                f"Prefect: {prefect}",
                f"Timeouts: capture {self.cfg.timing.capture_timeout:g}s, retransmit "
                f"{self.cfg.timing.retransmit_delay:g}s x{self.cfg.timing.retransmit_max}",
                line,
            ]
        )

    # -- MQTT ----------------------------------------------------------------------
    def _make_client(self):
        client = self.broker.client(client_id=self.cfg.client_id, clean_session=False)
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        client.max_inflight_messages_set(MAX_INFLIGHT_PUBLISHES)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties=None):
        if reason_code.is_failure:
            log.error("MQTT connect refused: %s", reason_code)
            return
        sock = client.socket()
        if sock is not None:
            try:  # ACK/NACK are small: do not let Nagle hold them behind a PUBACK
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        client.subscribe([(t, 1) for t in self.cfg.topics])
        first = not self._connected.is_set()
        self._connected.set()
        if first:
            print("✓ MQTT connected successfully", flush=True)
            print("✓ Subscribed to topics:", flush=True)
            for t in self.cfg.topics:
                print(f"  - {t}", flush=True)
            print("✓ Worker started - processing messages...", flush=True)
        else:
            log.warning("MQTT reconnected (session present: %s)", flags.session_present)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None):
        if not self._stopping.is_set():
            log.warning("MQTT disconnected (%s); reconnecting with backoff", reason_code)

    def _on_message(self, client, userdata, msg):
        # the network thread: enqueue and return, nothing else
        self.inbox.put((msg.topic, msg.payload, time.monotonic()))

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1)

    # -- worker: drives the core -----------------------------------------------------
    def _worker(self) -> None:
        c = self.core
        while True:
            deadline = c.next_deadline()
            timeout = 0.5 if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self.inbox.get(timeout=min(timeout, 0.5))
            except queue.Empty:
                item = None
            if item is None:
                if self._worker_done.is_set():
                    return
            else:
                topic, payload, t = item
                self.stats["messages"] += 1
                try:
                    self._handle_message(topic, payload, t)
                except Exception:
                    # One message must never stop ingest for the whole fleet.
                    self.stats["internal_errors"] = self.stats.get("internal_errors", 0) + 1
                    log.exception("message on %s could not be handled; continuing", topic[:200])
            now = time.monotonic()
            if (d := c.next_deadline()) is not None and d <= now:
                self._apply(c.tick(now))

    def _handle_message(self, topic: str, payload: bytes, t: float) -> None:
        wall = dt.datetime.now(dt.UTC)
        try:
            msg = core.parse_message(topic, payload, self.cfg.limits)
        except core.ProtocolError as exc:
            rec = exc.record
            if rec.device_id:
                self._seen[rec.device_id] = wall
                self._log_in(rec.device_id, topic, {"rejected": rec.code, **rec.details}, wall)
            self._apply([rec])
            return
        self._seen[msg.device_id] = wall
        if isinstance(msg, core.ChunkMessage):
            if not self.cfg.log_control_only:
                entry = {
                    "device_id": msg.device_id,
                    "image_name": msg.image_name,
                    "chunk_id": msg.chunk_id,
                    "bytes": len(msg.data),
                }
                self._log_in(msg.device_id, topic, entry, wall)
        elif isinstance(msg, core.MetadataMessage):
            entry = {"device_id": msg.device_id, "image_name": msg.image_name, **msg.metadata}
            self._log_in(msg.device_id, topic, entry, wall)
        elif isinstance(msg, core.StatusMessage):
            self._log_in(msg.device_id, topic, msg.raw, wall)
        # AckMessage: our own ACK/NACK coming back (or a device's), not logged twice
        self._apply(self.core.receive(msg, t))

    def _apply(self, actions) -> None:
        for a in actions:
            if isinstance(a, core.FinalizeImage):
                self._submit(a)
            elif isinstance(a, core.SendNack):
                payload = a.payload()
                self.publish(a.topic, payload)
                self.stats["nacks"] += 1
                self.on_outbound(a.device_id, a.topic, payload)
            elif isinstance(a, core.RecordError):
                self._queue_row("error", self._error_row(a))
            elif isinstance(a, core.RecordStatus):
                self._queue_row("status", (a.device_id, a.status, a.pending_count))
            elif isinstance(a, core.CaptureFailed):
                self._queue_row("failed", a)

    @staticmethod
    def _error_row(a: core.RecordError) -> dict[str, Any]:
        return dict(
            device_id=a.device_id,
            capture_id=a.image_name,
            error_code=a.code,
            severity=a.severity,
            message=a.message,
            details=a.details,
        )

    def on_error(self, code: int, item, message: str, details: dict | None = None) -> None:
        img = item.image
        self._queue_row(
            "error",
            dict(
                device_id=img.device_id,
                capture_id=item.record_id or img.image_name,
                error_code=code,
                severity=core.SEVERITY[code],
                message=core.DESCRIPTION[code],
                details={"error": message, "sha256": img.sha256, **(details or {})},
            ),
        )
        if code == 2204:
            failed = core.CaptureFailed(
                img.device_id,
                img.image_name,
                img.safe_name,
                code,
                img.metadata,
                img.total_chunks,
            )
            self._queue_row("failed", failed)

    def on_outbound(self, device_id: str, topic: str, payload: bytes) -> None:
        self._queue_row(
            "log",
            (device_id, topic, "out", json.loads(payload), dt.datetime.now(dt.UTC)),
        )

    def _log_in(self, device_id, topic, entry, wall) -> None:
        self._queue_row("log", (device_id, topic, "in", entry, wall))

    def _queue_row(self, kind: str, row) -> None:
        with self._rows_lock:
            rows = self._rows[kind]
            rows.append(row)
            if len(rows) > MAX_PENDING_ROWS:
                rows.popleft()

    # -- db writer -----------------------------------------------------------------
    def _db_writer(self) -> None:
        backoff = DB_FLUSH_INTERVAL_S
        while True:
            stopping = self._stopping.is_set() and self._worker_done.is_set()
            time.sleep(backoff if not stopping else 0)
            try:
                self._flush_rows()
                backoff = DB_FLUSH_INTERVAL_S
            except psycopg2.Error as exc:
                self.stats["db_errors"] += 1
                log.warning("database write failed (%s); retrying", type(exc).__name__)
                backoff = min(backoff * 2, 5.0)
                if stopping and self._db_give_up():
                    return
                continue
            if stopping and self._ingest_idle.is_set():
                self._flush_rows()
                return

    def _db_give_up(self) -> bool:
        self._give_up_count = getattr(self, "_give_up_count", 0) + 1
        return self._give_up_count > 5

    def _flush_rows(self) -> None:
        with self._rows_lock:
            taken = {k: list(v) for k, v in self._rows.items()}
            for v in self._rows.values():
                v.clear()
            seen, self._seen = self._seen, {}
        if not any(taken.values()) and not seen:
            return
        q = db.queries
        try:
            with self.pool.connection() as conn:
                with conn.cursor() as cur:
                    devices = sorted(
                        set(seen)
                        | {r[0] for r in taken["status"]}
                        | {r["device_id"] for r in taken["error"] if r["device_id"]}
                    )
                    if devices:
                        psycopg2.extras.execute_values(
                            cur,
                            q.ingest_touch_devices_values.sql,
                            [(d, seen.get(d) or dt.datetime.now(dt.UTC)) for d in devices],
                        )
                    if taken["log"]:
                        _copy_publish_log(cur, taken["log"])
                for device_id, status, pending in taken["status"]:
                    q.ingest_insert_status(
                        conn,
                        device_id=device_id,
                        status=status,
                        pending_count=pending,
                        payload={"status": status, "pendingImg": pending},
                    )
                for row in taken["error"]:
                    q.ingest_insert_error(conn, **row)
                for f in taken["failed"]:
                    meta = {**f.metadata, "failed_code": f.code}
                    q.ingest_mark_capture_failed(
                        conn,
                        device_id=f.device_id,
                        device_capture_id=f.image_name,
                        captured_at=None,
                        image_bytes=f.metadata.get("image_size"),
                        total_chunks=f.total_chunks,
                        metadata=meta,
                    )
        except psycopg2.Error:
            with self._rows_lock:  # put them back, in order, for the next attempt
                for k, v in taken.items():
                    self._rows[k].extendleft(reversed(v))
                for d, w in seen.items():
                    self._seen.setdefault(d, w)
            raise

    # -- ingest: batches -> flow runs --------------------------------------------------
    def _submit(self, fin: core.FinalizeImage) -> None:
        with self._backlog_lock:
            if self._backlog_bytes + len(fin.data) > MAX_BACKLOG_BYTES:
                refused = True
            else:
                refused = False
                self._backlog_bytes += len(fin.data)
        if refused:
            err = core.error(
                2200,
                fin.device_id,
                fin.image_name,
                "ingest_backlog",
                backlog_bytes=self._backlog_bytes,
            )
            self._queue_row("error", self._error_row(err))
            return
        self._ingest_idle.clear()
        self.finished.put((fin, time.monotonic()))

    def _ingest_thread(self) -> None:
        asyncio.run(self._ingest_main())

    async def _ingest_main(self) -> None:
        from tasks import mqtt as tm

        tm.set_context(
            tm.IngestContext(
                store=self.store,
                pool=self.pool,
                publish=self.publish,
                on_error=self.on_error,
                on_outbound=self.on_outbound,
            )
        )
        slots = asyncio.Semaphore(self.cfg.max_concurrent_batches)
        running: set[asyncio.Task] = set()
        loop = asyncio.get_running_loop()
        recording = self.cfg.use_prefect and self.cfg.ack_path != "flow"
        recorder = asyncio.create_task(self._recorder()) if recording else None
        while True:
            await slots.acquire()
            first = await loop.run_in_executor(None, self._next_finished)
            if first is None:
                slots.release()
                break
            images = [first]
            window_end = time.monotonic() + self.cfg.batch_window_s
            while len(images) < self.cfg.max_batch_images:
                try:
                    images.append(self.finished.get_nowait())
                    continue
                except queue.Empty:
                    pass
                if time.monotonic() >= window_end:
                    break
                await asyncio.sleep(0.005)
            batch = tm.new_batch(images)
            self._inflight_batches += 1
            task = asyncio.create_task(self._run_batch(batch, slots))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        if recorder is not None:
            recorder.cancel()
            await asyncio.gather(recorder, return_exceptions=True)
            while self._to_record:  # the last captures get their run too
                if not await self._record_once():
                    break

    async def _recorder(self) -> None:
        while True:
            await asyncio.sleep(RECORD_INTERVAL_S)
            if self._to_record:
                await self._record_once()

    async def _record_once(self) -> bool:
        take = []
        while self._to_record and len(take) < RECORD_MAX:
            take.append(self._to_record.popleft())
        records = [r for r, _ in take]
        try:
            if self.cfg.recorder == "process":
                ok = await asyncio.to_thread(self._recorder_call, records)
            else:
                from flows.mqtt_ingest import mqtt_ingest_record

                state = await mqtt_ingest_record(records, return_state=True)
                ok = state.is_completed()
        except Exception:
            log.exception("recording flow run crashed")
            ok = False
        if not ok:
            retry = [(r, n + 1) for r, n in take if n + 1 < RECORD_ATTEMPTS]
            self._to_record.extendleft(reversed(retry))
            log.warning("recording flow run failed for %d captures", len(records))
        return ok

    def _recorder_call(self, records: list[dict]) -> bool:
        with self._recorder_lock:
            if self._recorder_proc is None or not self._recorder_proc.is_alive():
                self._start_recorder()
            self._recorder_conn.send(records)
            return bool(self._recorder_conn.recv())

    def _start_recorder(self) -> None:
        """The recording flow runs live in a child process: Prefect's client (HTTP,
        events, logs) then never holds this process's GIL while chunks and ACKs wait."""
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_recorder_main,
            args=(child, self.cfg.storage_url, self.cfg.database_url),
            name="assembler-recorder",
            daemon=True,
        )
        proc.start()
        child.close()
        self._recorder_proc, self._recorder_conn = proc, parent

    def _stop_recorder(self) -> None:
        with self._recorder_lock:
            if self._recorder_proc is not None and self._recorder_proc.is_alive():
                try:
                    self._recorder_conn.send(None)
                except OSError:
                    pass
                self._recorder_proc.join(30)
                if self._recorder_proc.is_alive():
                    self._recorder_proc.kill()
            self._recorder_proc = None

    def _next_finished(self):
        """Block until an image is finished (None: shutting down and nothing left)."""
        while True:
            try:
                return self.finished.get(timeout=0.2)
            except queue.Empty:
                if self._worker_done.is_set() and self.finished.empty():
                    return None
                if self._inflight_batches == 0 and self.finished.empty():
                    self._ingest_idle.set()

    async def _run_batch(self, batch, slots: asyncio.Semaphore) -> None:
        from flows.mqtt_ingest import mqtt_ingest, run_batch_direct
        from tasks import mqtt as tm

        t_start = time.monotonic()
        try:
            if self.cfg.use_prefect and self.cfg.ack_path == "flow":
                await mqtt_ingest(batch.batch_id, tm.manifest(batch), return_state=True)
            else:
                await run_batch_direct(batch.batch_id)
                if self.cfg.use_prefect:
                    for i in batch.items:
                        if i.record_id is not None:
                            record = {
                                "record_id": i.record_id,
                                "device_id": i.image.device_id,
                                "image_name": i.image.image_name,
                                "sha256": i.image.sha256,
                                "storage_path": i.key,
                                "bytes": len(i.image.data),
                            }
                            self._to_record.append((record, 0))
        except Exception:
            log.exception("ingest batch %s crashed", batch.batch_id[:8])
            for item in batch.items:
                if item.record_id is None and item.error is None:
                    self.on_error(2205, item, "ingest batch crashed")
        finally:
            now = time.monotonic()
            self._batch_seconds.append(now - t_start)
            for item in batch.items:
                if item.acked:
                    self._finalize_to_ack.append(now - item.finalized_at)
            self.stats["batches"] += 1
            self.stats["acks"] += sum(1 for i in batch.items if i.acked)
            tm.forget_batch(batch.batch_id)
            with self._backlog_lock:
                self._backlog_bytes -= sum(len(i.image.data) for i in batch.items)
            self._inflight_batches -= 1
            slots.release()
            if self._inflight_batches == 0 and self.finished.empty():
                self._ingest_idle.set()

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        print(self.banner(), flush=True)
        self.client = self._make_client()
        for name, target in (
            ("assembler-worker", self._worker),
            ("assembler-ingest", self._ingest_thread),
            ("assembler-db", self._db_writer),
        ):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self.client.connect_async(self.broker.host, self.broker.port, self.broker.keepalive)
        self.client.loop_start()

    def wait_connected(self, timeout: float = 30) -> bool:
        return self._connected.wait(timeout)

    def stop(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Finish what was received: assemble the inbox, store and ACK finished images,
        write pending rows; then disconnect (the persistent session keeps the rest)."""
        self._stopping.set()
        end = time.monotonic() + timeout
        # let the worker drain what paho already delivered
        while not self.inbox.empty() and time.monotonic() < end:
            time.sleep(0.05)
        self._worker_done.set()
        self._threads[0].join(max(0.1, end - time.monotonic()))
        self._threads[1].join(max(0.1, end - time.monotonic()))  # in-flight stores + ACKs
        self._stop_recorder()
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
        self._threads[2].join(max(0.1, end - time.monotonic()))
        self.pool.close()
        print(f"✓ Worker stopped: {self.summary()}", flush=True)

    def summary(self) -> str:
        def pct(values, p):
            v = sorted(values)
            return v[min(len(v) - 1, int(len(v) * p))] * 1000 if v else 0.0

        b, f = self._batch_seconds, self._finalize_to_ack
        return (
            f"{self.stats['messages']} messages, {self.stats['acks']} ACKs in "
            f"{self.stats['batches']} batches ({self.stats['acks'] / max(1, len(b)):.1f}/batch); "
            f"batch run p50 {pct(b, 0.5):.0f} ms p99 {pct(b, 0.99):.0f} ms; "
            f"assembled->ACK p50 {pct(f, 0.5):.0f} ms p99 {pct(f, 0.99):.0f} ms; "
            f"NACKs {self.stats['nacks']}"
        )

    def run_forever(self) -> None:
        stop = threading.Event()

        def _signal(signum, frame):
            stop.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        self.start()
        while not stop.wait(1.0):
            pass
        self.stop()


def _recorder_main(conn, storage_url: str, database_url: str) -> None:
    """Child process: run one `mqtt-ingest-record` flow per list of records received."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    from camfleet.storage import open_store
    from flows.mqtt_ingest import mqtt_ingest_record
    from tasks import mqtt as tm

    pool = db.Pool(database_url, maxconn=2)
    tm.set_context(
        tm.IngestContext(
            store=open_store(storage_url),
            pool=pool,
            publish=lambda topic, payload: None,
            on_error=lambda *a, **k: None,
        )
    )

    async def main() -> None:
        while True:
            records = await asyncio.to_thread(conn.recv)
            if records is None:
                return
            try:
                state = await mqtt_ingest_record(records, return_state=True)
                ok = state.is_completed()
            except Exception:
                log.exception("recording flow run crashed")
                ok = False
            conn.send(ok)

    try:
        asyncio.run(main())
    finally:
        pool.close()
