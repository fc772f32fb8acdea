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

Fault isolation (issue 12; docs/mqtt-ingest.md "Hostile devices")
-----------------------------------------------------------------
* Every message is handled inside its own try: whatever goes wrong becomes a coded
  error for that device and one log line.  A worker thread that dies anyway is a crash:
  the process exits EXIT_CRASHED (70) so its supervisor restarts it (never half-dead).
* Rows are written by rows.RowWriter: a row the database refuses is isolated by
  bisection and quarantined (2205), the rest of the batch is written.
* Device ids not yet registered are admitted by admission.DeviceAdmission
  (``--unknown-devices register|refuse``, bounded rate); the inbox is bounded in bytes
  (INBOX_MAX_BYTES): what arrives beyond it is dropped and counted.
* Flow-run recording (recorder.Recorder) runs on its own thread, only with a configured
  Prefect API, with a bounded backlog: the ACK path never waits on Prefect.
* Ready means subscribed: the broker's SUBACK, not the CONNACK (``--health-port``).

Replicas (``--partitions P``, issue 15): devices are partitioned and the partitions
leased in PostgreSQL (partitions.py, docs/mqtt-ingest.md "Several assemblers"); without
it this process is the fleet's only assembler and nothing below changes (a replica's
MQTT session is clean: after a restart its partitions may be another's).

Persistent session: a stable client id with clean_session=False and QoS 1
subscriptions, so the broker queues a device's chunks while we reconnect (backoff
1..30 s); `stop()` finishes the stores in flight, ACKs them, then disconnects.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
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

from camfleet import db, metrics
from camfleet.protocol import assembler as core
from services.assembler.admission import (
    KNOWN_REFRESH_S,
    NEW_DEVICE_BURST,
    NEW_DEVICE_PER_MIN,
    DeviceAdmission,
    RowQuota,
)
from services.assembler.partitions import (
    LEASE_TTL_S,
    REPLICA_GONE_TOPIC,
    DeviceSubscriptions,
    PartitionLeases,
    busy_partitions,
    forget_devices,
)
from services.assembler.recorder import (
    RECORD_BACKLOG,
    RECORD_INTERVAL_S,
    Recorder,
    prefect_api_configured,
)
from services.assembler.rows import DB_FLUSH_INTERVAL_S, RowWriter

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
# Reconnect backoff to the broker.
RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30
# paho in-flight / queued QoS 1 publishes (ACKs/NACKs): lifted from paho's default 20,
# a batch ACKs up to MAX_BATCH_IMAGES devices at once.
MAX_INFLIGHT_PUBLISHES = 1000
# Assembled images waiting for (or inside) a store/row/ACK batch.  When storage or the
# database stalls, images beyond this are refused (2200 "ingest_backlog", no ACK: the
# device keeps its copy and resends) instead of growing the heap without bound.
MAX_BACKLOG_BYTES = 128 * 1024 * 1024
# How long stop() waits for in-flight stores before giving up (devices resend anyway).
SHUTDOWN_TIMEOUT_S = 60
# Bytes of received MQTT payloads waiting for the worker.  paho delivers whatever the
# broker sends; beyond this the message is dropped (counted in stats["inbox_dropped"]):
# a device resends an unACKed image, a lost chunk is NACKed.  64 MiB is ~5 s of a
# 100-device fleet at full speed.
INBOX_MAX_BYTES = 64 * 1024 * 1024
# Bookkeeping per inbox entry beyond its payload (tuple, topic str, float, bytes header).
INBOX_ENTRY_OVERHEAD = 200
# A worker thread died: the process exits with this code (EX_SOFTWARE) so that its
# supervisor restarts it.
EXIT_CRASHED = 70


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
    # device ids not yet in `devices`: "register" (at a bounded rate) or "refuse"
    unknown_devices: str = "register"
    new_device_burst: int = NEW_DEVICE_BURST
    new_device_per_min: float = NEW_DEVICE_PER_MIN
    inbox_max_bytes: int = INBOX_MAX_BYTES
    record_backlog: int = RECORD_BACKLOG
    health_port: int | None = None  # GET /healthz on 127.0.0.1:<port>; 0 = any free port
    health_host: str = "127.0.0.1"
    # Replicas (services/assembler/partitions.py): 0 = the only assembler of its fleet,
    # no leases; P > 0 = serve the device partitions this replica leases out of P.
    partitions: int = 0
    replica_id: str | None = None  # with partitions: stable id (else host-pid, clean session)
    lease_ttl_s: float = LEASE_TTL_S  # with partitions: how long a lease outlives a round


def redact_url(url: str) -> str:
    """A URL for logs: no password, no query string secrets."""
    url = re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url)
    return re.sub(r"(?i)(password|secret|token|key)=[^&]*", r"\1=***", url)


class AssemblerService:
    def __init__(self, broker, config: ServiceConfig, store=None):
        """The settings, the collaborators and the state the service's threads share.

        Over 60 lines only because it is a list: one line a collaborator or a piece of
        state, kept in one place so that every thread's attributes are found here."""
        from camfleet.storage import open_store

        self.broker = broker
        self.cfg = config
        self.store = store or open_store(config.storage_url)
        self.pool = db.Pool(config.database_url, maxconn=6)
        self.core = core.Assembler(config.limits, config.timing)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._inbox_bytes = 0
        self._inbox_lock = threading.Lock()
        self.finished: queue.SimpleQueue = queue.SimpleQueue()
        self.stats = {
            "messages": 0,
            "batches": 0,
            "acks": 0,
            "nacks": 0,
            "db_errors": 0,
            "internal_errors": 0,
            "inbox_dropped": 0,
            "device_failures": 0,
        }
        self.rows = RowWriter(self.pool, self.stats, self._ack_device_failure)
        self.quota = RowQuota()
        self.admission = DeviceAdmission(
            config.unknown_devices, config.new_device_burst, config.new_device_per_min
        )
        # Prefect: recording runs only with a configured API (never a temporary server)
        self.prefect_api = prefect_api_configured() if config.use_prefect else None
        self.ack_path = config.ack_path if self.prefect_api else "direct"
        self.recorder = None
        if self.prefect_api and self.ack_path == "direct":
            self.recorder = Recorder(
                config.recorder,
                config.storage_url,
                config.database_url,
                self.stats,
                backlog=config.record_backlog,
            )
        self._stopping = threading.Event()
        self._worker_done = threading.Event()
        self._connected = threading.Event()  # set on the SUBACK: ready means subscribed
        self._subscribe_mid: int | None = None
        self._threads: list[threading.Thread] = []
        self._inflight_batches = 0
        self._ingest_idle = threading.Event()
        self._ingest_idle.set()
        self._backlog_bytes = 0
        self._backlog_lock = threading.Lock()
        self.crashed: str | None = None
        self._exit = os._exit  # tests replace it to observe a crash
        self.health = None
        self.client = None
        self.leases = None
        self.subs = None
        self.replica_id = config.replica_id
        self.client_id = config.client_id
        if config.partitions > 0:
            self.replica_id = config.replica_id or f"{socket.gethostname()}-{os.getpid()}"
            self.client_id = f"{config.client_id}-{self.replica_id}"
            self.leases = PartitionLeases(
                config.database_url,
                self.replica_id,
                config.partitions,
                on_lost=self._partitions_lost,
                busy=lambda: busy_partitions(self.core, config.partitions),
                after_round=self._sync_subscriptions,
                ttl_s=config.lease_ttl_s,
            )
            self.subs = DeviceSubscriptions(config.topics[1], config.partitions)
            self._head_seen: dict[str, float] = {}  # device -> last metadata (monotonic)
            self._synced: tuple = ()
            self.stats["partition_dropped"] = 0
        # timings for the summary printed at stop (bounded: the last 100k of each)
        self._batch_seconds: deque = deque(maxlen=100_000)
        self._finalize_to_ack: deque = deque(maxlen=100_000)

    # -- banner --------------------------------------------------------------------
    def banner(self) -> str:
        line = "=" * 60
        if not self.cfg.use_prefect:
            prefect = "off"
        elif not self.prefect_api:
            prefect = (
                "no Prefect API configured (PREFECT_API_URL): captures are stored and "
                "ACKed, no flow runs are recorded"
            )
        elif self.ack_path == "flow":
            prefect = "one mqtt-ingest flow run per batch (on the ACK path)"
        else:
            prefect = f"one mqtt-ingest-record flow run per {RECORD_INTERVAL_S:g} s"
        lines = [
            line,
            "camfleet MQTT assembler - ESP32S3-CAM Fleet Ingestion",
            line,
            f"MQTT Broker: {self.broker.host}:{self.broker.port} (TLS: {self.broker.tls})",
            f"Database: {redact_url(self.cfg.database_url)}",
            f"Storage: {redact_url(self.store.describe())}",
            f"Prefect: {prefect}",
            f"Timeouts: capture {self.cfg.timing.capture_timeout:g}s, retransmit "
            f"{self.cfg.timing.retransmit_delay:g}s x{self.cfg.timing.retransmit_max}",
            f"Unknown devices: {self.cfg.unknown_devices}"
            + (
                f" (burst {self.cfg.new_device_burst}, then {self.cfg.new_device_per_min:g}/min)"
                if self.cfg.unknown_devices == "register"
                else ""
            ),
        ]
        if self.leases is not None:
            lines.append(
                f"Replica: {self.replica_id} (client id {self.client_id}), device partitions "
                f"leased out of {self.cfg.partitions}"
            )
        if self.health is not None:
            lines.append(f"Health: http://{self.cfg.health_host}:{self.health.port}/healthz")
        return "\n".join([*lines, line])

    # -- MQTT ----------------------------------------------------------------------
    def _make_client(self):
        # A replica's session is clean: after a reconnect or restart its partitions may
        # be another's, so it subscribes afresh to what it holds then.
        persistent = self.leases is None
        client = self.broker.client(client_id=self.client_id, clean_session=not persistent)
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        client.max_inflight_messages_set(MAX_INFLIGHT_PUBLISHES)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        if self.leases is not None:
            # published by the broker when our connection drops without a DISCONNECT
            # (SIGKILL, crash, lost network): the other replicas reap our leases at once
            client.will_set(REPLICA_GONE_TOPIC, self.replica_id.encode(), qos=1)
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
        if self.subs is None:
            _, self._subscribe_mid = client.subscribe([(t, 1) for t in self.cfg.topics])
        else:  # status of every device; data of the devices of the partitions held
            if self._connected.is_set():  # a reconnect: our will went out meanwhile
                self.leases.suspend()
            _, self._subscribe_mid = client.subscribe(
                [(self.cfg.topics[0], 1), (REPLICA_GONE_TOPIC, 1)]
            )
            self.subs.reset()
            self._synced = ()
            self._sync_subscriptions(self.leases.owned())
        if self._connected.is_set():
            log.warning("MQTT reconnected (session present: %s)", flags.session_present)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties=None):
        # ready only once the broker has acknowledged the subscriptions: a message sent
        # right after "Subscribed" must not be lost
        if mid != self._subscribe_mid:
            if self.subs is not None:
                self.subs.acked(mid)
            return
        failed = [rc for rc in reason_codes if getattr(rc, "is_failure", False)]
        if failed:
            log.error("MQTT subscription refused: %s", failed)
            return
        first = not self._connected.is_set()
        self._connected.set()
        if first:
            print("✓ MQTT connected successfully", flush=True)
            print("✓ Subscribed to topics:", flush=True)
            if self.subs is None:
                for t in self.cfg.topics:
                    print(f"  - {t}", flush=True)
            else:
                print(f"  - {self.cfg.topics[0]}", flush=True)
                print(f"  - {self.cfg.topics[1]} of the leased partitions' devices", flush=True)
            print("✓ Worker started - processing messages...", flush=True)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None):
        if not self._stopping.is_set():
            log.warning("MQTT disconnected (%s); reconnecting with backoff", reason_code)

    def _on_message(self, client, userdata, msg):
        # the network thread: enqueue and return (bounded in bytes).  Ids not admitted
        # are dropped here, before the queue: a flood of invented ids then costs one set
        # lookup each instead of a queue round trip (measured in tests/test_mqtt_flood.py)
        dev = _topic_device(msg.topic)
        if dev is None:
            if self.leases is not None and msg.topic == REPLICA_GONE_TOPIC:
                self.leases.reap(msg.payload.decode("utf-8", "replace"))
            return
        if not self.admission.admit(dev):
            return
        if self.leases is not None:
            if not self.leases.owns(dev):
                # another replica's device (its status): dropped undecoded.  A device new
                # to the fleet gets its `devices` row all the same: its owner learns it at
                # the next known-device refresh even when it missed this status (it was
                # reconnecting, or the partition was changing hands)
                if self.admission.first_sight(dev):
                    self.rows.seen(dev, dt.datetime.now(dt.UTC))
                return
            if dev not in self.subs:  # a device new to us: its data from now on
                self.subs.add(client, dev)
        size = len(msg.payload) + len(msg.topic) + INBOX_ENTRY_OVERHEAD
        with self._inbox_lock:
            if self._inbox_bytes + size > self.cfg.inbox_max_bytes:
                self.stats["inbox_dropped"] += 1
                if self.stats["inbox_dropped"] % 1000 == 1:
                    log.warning(
                        "inbox full (%d bytes): %d messages dropped so far",
                        self._inbox_bytes,
                        self.stats["inbox_dropped"],
                    )
                return
            self._inbox_bytes += size
        self.inbox.put((msg.topic, msg.payload, time.monotonic(), size))

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
            elif item[0] is None:  # partitions lost (lease thread): forget their state
                n = forget_devices(c, item[1], self.cfg.partitions)
                if n:
                    log.info("forgot %d images in assembly of partitions now served elsewhere", n)
            else:
                topic, payload, t, size = item
                with self._inbox_lock:
                    self._inbox_bytes -= size
                self.stats["messages"] += 1
                try:
                    self._handle_message(topic, payload, t)
                except Exception:
                    # One message must never stop ingest for the whole fleet.
                    self.stats["internal_errors"] += 1
                    log.exception(
                        "device %s: message on %s could not be handled; continuing",
                        _topic_device(topic),
                        topic[:200],
                    )
            now = time.monotonic()
            if (d := c.next_deadline()) is not None and d <= now:
                try:
                    self._apply(c.tick(now))
                except Exception:
                    self.stats["internal_errors"] += 1
                    log.exception("assembler tick failed; continuing")

    def _handle_message(self, topic: str, payload: bytes, t: float) -> None:
        # (_on_message already dropped malformed topics and ids not admitted: no row, so
        # that an invented-id flood cannot grow the tables; counted in admission.dropped)
        wall = dt.datetime.now(dt.UTC)
        try:
            msg = core.parse_message(topic, payload, self.cfg.limits)
        except core.ProtocolError as exc:
            rec = exc.record
            if rec.device_id:
                self.rows.seen(rec.device_id, wall)
                self._log_in(rec.device_id, topic, {"rejected": rec.code, **rec.details}, wall)
            self._apply([rec])
            return
        if self.leases is not None:
            if isinstance(msg, core.MetadataMessage):
                self._head_seen[msg.device_id] = t
            elif (
                isinstance(msg, core.ChunkMessage)
                and self._head_seen.get(msg.device_id, -1.0) < self.leases.gained_at(msg.device_id)
                and not self.core.in_assembly(msg.device_id, msg.image_name)
            ):
                # no metadata from this device since its partition became ours: the rest
                # of an image another replica (or nobody) had started; the device
                # resends it whole, metadata first, when no ACK comes
                self.stats["partition_dropped"] += 1
                return
        self.rows.seen(msg.device_id, wall)
        if isinstance(msg, core.ChunkMessage):
            if not self.cfg.log_control_only:
                entry = {
                    "device_id": msg.device_id,
                    "image_name": msg.image_name,
                    "chunk_id": msg.chunk_id,
                    "bytes": len(msg.data),
                }
                self._log_in(msg.device_id, topic, entry, wall)
        elif isinstance(msg, core.MetadataMessage | core.DeviceFailure):
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
                metrics.count_assembler_error(a.code)  # counted even when not stored
                if self._within_quota("error", a.device_id):
                    self.rows.queue("error", self._error_row(a))
            elif isinstance(a, core.RecordStatus):
                if self._within_quota("status", a.device_id):
                    self.rows.queue("status", (a.device_id, a.status, a.pending_count))
            elif isinstance(a, core.CaptureFailed):
                self.rows.queue("failed", a)
            elif isinstance(a, core.RecordDeviceFailure):
                self.stats["device_failures"] += 1
                self.rows.queue("device_failure", a)

    def _sync_subscriptions(self, owned: frozenset[int]) -> None:
        """After each lease round: data subscriptions follow the partitions held and
        the devices known (only when either changed: a fleet's ids are many)."""
        if self.client is None or not self.client.is_connected():
            return  # on_connect syncs
        known = self.admission.known()
        key = (owned, len(known))
        if key == self._synced:
            return
        added, dropped = self.subs.sync(self.client, owned, known)
        self._synced = key
        if added or dropped:
            log.info("device subscriptions: +%d -%d", added, dropped)

    def _partitions_lost(self, partitions: frozenset[int]) -> None:
        self.inbox.put((None, partitions, time.monotonic(), 0))

    def _ack_device_failure(self, f: core.RecordDeviceFailure, config) -> None:
        """A device-reported failure is recorded: ACK_OK, so the firmware moves on (it
        knows no other answer that lets it delete the failed capture)."""
        from tasks.mqtt import next_wake_time

        payload = core.encode_ack(f.image_name, next_wake_time(config))
        topic = core.ack_topic(f.device_id)
        self.publish(topic, payload)
        self.stats["acks"] += 1
        self.on_outbound(f.device_id, topic, payload)

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
        metrics.count_assembler_error(code)
        img = item.image
        self.rows.queue(
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
            self.rows.queue("failed", failed)

    def on_outbound(self, device_id: str, topic: str, payload: bytes) -> None:
        self.rows.queue(
            "log",
            (device_id, topic, "out", json.loads(payload), dt.datetime.now(dt.UTC)),
        )

    def _log_in(self, device_id, topic, entry, wall) -> None:
        if self._within_quota("log", device_id):
            self.rows.queue("log", (device_id, topic, "in", entry, wall))

    def _within_quota(self, kind: str, device_id: str | None) -> bool:
        """Rows a device's own messages create are rate-limited per device and kind
        (admission.ROW_QUOTAS); errors the service itself raises are not."""
        if self.quota.allow(kind, device_id):
            return True
        self.stats["rows_over_quota"] = self.quota.over
        return False

    # -- db writer -----------------------------------------------------------------
    def _db_writer(self) -> None:
        backoff = DB_FLUSH_INTERVAL_S
        give_up = 0
        next_refresh = time.monotonic() + KNOWN_REFRESH_S
        while True:
            stopping = self._stopping.is_set() and self._worker_done.is_set()
            time.sleep(backoff if not stopping else 0)
            if time.monotonic() >= next_refresh:  # devices registered meanwhile
                next_refresh = time.monotonic() + KNOWN_REFRESH_S
                self._load_known_devices()
            try:
                self.rows.flush()
                backoff = DB_FLUSH_INTERVAL_S
            except psycopg2.Error as exc:  # unreachable: RowWriter put the rows back
                self.stats["db_errors"] += 1
                log.warning("database write failed (%s); retrying", type(exc).__name__)
                backoff = min(backoff * 2, 5.0)
                give_up += 1
                if stopping and give_up > 5:
                    return
                continue
            if stopping and self._ingest_idle.is_set():
                self.rows.flush()
                return

    # -- known devices ------------------------------------------------------------------
    def _load_known_devices(self) -> None:
        try:
            with self.pool.connection() as conn, conn.cursor() as cur:
                cur.execute("select device_id from devices")
                self.admission.load(r[0] for r in cur.fetchall())
        except psycopg2.Error as exc:
            log.warning("could not read registered devices (%s)", type(exc).__name__)

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
            self.rows.queue("error", self._error_row(err))
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
            try:
                batch = tm.new_batch(images)
            except Exception:  # never let one image stop ingest for the fleet
                log.exception("ingest batch could not be formed; images refused (2205)")
                self._refuse_images(images)
                slots.release()
                continue
            self._inflight_batches += 1
            task = asyncio.create_task(self._run_batch(batch, slots))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running, return_exceptions=True)

    def _refuse_images(self, images) -> None:
        for fin, _ in images:
            err = core.error(2205, fin.device_id, fin.image_name, "ingest_failed")
            self.rows.queue("error", self._error_row(err))
            with self._backlog_lock:
                self._backlog_bytes -= len(fin.data)

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
            if self.prefect_api and self.ack_path == "flow":
                await mqtt_ingest(batch.batch_id, tm.manifest(batch), return_state=True)
            else:
                await run_batch_direct(batch.batch_id)
                if self.recorder is not None:
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
                            self.recorder.add(record)
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
    def _guarded(self, name: str, target):
        """A worker thread's body: if it raises, or returns while the service is not
        stopping, the process is crashed (EXIT_CRASHED) rather than left half-dead."""

        def run():
            try:
                target()
            except BaseException:
                log.critical("thread %s died", name, exc_info=True)
                self._crash(f"thread {name} died")
                return
            if not self._stopping.is_set():
                self._crash(f"thread {name} returned")

        return run

    def _crash(self, why: str) -> None:
        self.crashed = why
        log.critical(
            "%s: exiting with status %d so that the supervisor restarts us", why, EXIT_CRASHED
        )
        print(f"✗ {why}: exiting ({EXIT_CRASHED})", flush=True)
        self._exit(EXIT_CRASHED)

    def health_status(self) -> dict:
        alive = all(t.is_alive() for t in self._threads)
        if self.leases is not None:
            alive = alive and self.leases.alive()
        ready = self._connected.is_set() and alive and self.crashed is None
        if self.leases is not None:  # a replica whose leases lapsed serves nobody
            ready = ready and self.leases.valid()
        return {
            "ready": bool(ready and not self._stopping.is_set()),
            "subscribed": self._connected.is_set(),
            "threads_alive": alive,
            "crashed": self.crashed,
            "inbox_bytes": self._inbox_bytes,
            "backlog_bytes": self._backlog_bytes,
            "rows_pending": self.rows.pending(),
            "record_pending": self.recorder.pending() if self.recorder else 0,
            "unknown_dropped": self.admission.dropped,
            "stats": dict(self.stats),
            **(
                {"partitions": {**self.leases.status(), **self.subs.status()}}
                if self.leases is not None
                else {}
            ),
        }

    def start(self) -> None:
        if self.cfg.health_port is not None:
            from services.assembler.health import HealthServer

            self.health = HealthServer(
                self.cfg.health_host, self.cfg.health_port, self.health_status
            )
            self.health.start()
        print(self.banner(), flush=True)
        self._load_known_devices()
        if self.leases is not None:
            self.leases.start()
        self.client = self._make_client()
        for name, target in (
            ("assembler-worker", self._worker),
            ("assembler-ingest", self._ingest_thread),
            ("assembler-db", self._db_writer),
        ):
            t = threading.Thread(target=self._guarded(name, target), name=name, daemon=True)
            t.start()
            self._threads.append(t)
        if self.recorder is not None:
            self.recorder.start()
        self.client.connect_async(self.broker.host, self.broker.port, self.broker.keepalive)
        self.client.loop_start()

    def wait_connected(self, timeout: float = 30) -> bool:
        """True once subscribed (the broker's SUBACK came back)."""
        return self._connected.wait(timeout)

    def stop(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Finish what was received: assemble the inbox, store and ACK finished images,
        write pending rows; then disconnect (the persistent session keeps the rest)."""
        self._stopping.set()
        end = time.monotonic() + timeout
        # let the worker drain what paho already delivered
        while not self.inbox.empty() and time.monotonic() < end and self._threads[0].is_alive():
            time.sleep(0.05)
        self._worker_done.set()
        self._threads[0].join(max(0.1, end - time.monotonic()))
        self._threads[1].join(max(0.1, end - time.monotonic()))  # in-flight stores + ACKs
        if self.recorder is not None:
            self.recorder.stop(max(0.1, min(10.0, end - time.monotonic())))
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
        if self.leases is not None:  # the others take our partitions within one round
            self.leases.stop()
        self._threads[2].join(max(0.1, end - time.monotonic()))
        if self.health is not None:
            self.health.stop()
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
            f"NACKs {self.stats['nacks']}; dropped: {self.admission.dropped} from ids not "
            f"admitted, {self.stats['inbox_dropped']} inbox full, "
            f"{self.stats.get('rows_over_quota', 0)} rows over quota, "
            f"{self.stats['rows_quarantined']} rows quarantined"
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
        if self.crashed:
            raise SystemExit(EXIT_CRASHED)


def _topic_device(topic: str) -> str | None:
    """The device id a topic names, if well formed (ESP32CAM/<id>/<kind>)."""
    st = core.split_topic(topic)
    if st is None or not core.DEVICE_ID_RE.match(st[0]):
        return None
    return st[0]
