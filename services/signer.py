"""The edge-upload signer/verifier: the cloud side of seed 000's batch transaction.

It subscribes to every device's request topic, answers each request with presigned
POSTs confined to `edge/{serial}/{key name}`, then watches the granted keys until each
object appears, checks it (size within the grant, the exact declared size and SHA-256
when the device sent them, and the SHA-256 it computes from the stored bytes), makes it
a `captures` row and only then publishes `{"file": name}`, the device's licence to
delete its copy. Verified captures are handed to a Prefect flow run in batches.

Protocol rules live in `camfleet.protocol.edge_batch`; this module is the shell around
them: MQTT (paho's network thread only enqueues), the object store, PostgreSQL.

Fairness: requests wait in per-device queues served round-robin, each device has a
request rate limit (3007) and a cap on open grants (3008), so one device, or a flood
of invented ones, cannot hold every grant or the worker (`services.signer_limits`).
Grants nobody watches are swept to `expired`. Ready means subscribed (the SUBACK
arrived); a worker that dies anyway makes `run_forever` raise `WorkerDied`, and the
command exits non-zero for its supervisor to restart it. Nothing here waits on Prefect:
the hand-off has its own thread and a bounded backlog.

Crash safety: every grant is a row in `edge_upload_grants` before its URL is published,
leased to this instance (`services.signer_leases`), and a restarted signer resumes
watching its own open grants and any whose lease expired. Replicas (`share_group`)
share requests through the broker's `$share/...` subscription and verification work
through those leases: only a grant's holder records it, so none is verified twice.
A verification lost with the process is re-earned: the device asks again, and for a
checked request whose file was verified before with the declared checksum the answer
lists it as `verified` and the `{"file"}` message follows, without a second upload,
once a verification job has read the object back (never the request thread: a hanging
store must not hold up other devices' answers). Should the object be gone, the grant
fails and the device's next request gets a URL.

A reused name never overwrites a delivered image: a camera whose counter or clock
restarted writes a new image under a name it delivered (and deleted) before. Such a
name, asked for again without the delivered checksum, is granted a key of its own
(`edge_batch.reuse_key`); once verified, it is a new `captures` row, unless its bytes
are the earlier delivery's (a re-send after a missed verification): then the copy is
deleted and the earlier row stands. Either way the device gets `{"file": name}`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import heapq
import http.client
import itertools
import json
import logging
import os
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from camfleet import db
from camfleet.edge.link import no_delay
from camfleet.protocol import edge_batch as eb
from camfleet.storage import ObjectStore, StorageError
from camfleet.storage.base import STREAM_CHUNK_BYTES
from services.signer_leases import LEASE_S, Leases
from services.signer_limits import FairInbox, RateLimiter

log = logging.getLogger("camfleet.signer")

# First look for an uploaded object this long after the grant, then back off by
# CHECK_BACKOFF up to CHECK_MAX_INTERVAL_S: a 50 KB upload on a LAN lands in tens of
# milliseconds, a slow cellular one in tens of seconds, and one GET per pending request
# every 2 s at most keeps an idle fleet cheap for the object store.
CHECK_FIRST_S = 0.04
CHECK_BACKOFF = 1.25
CHECK_MAX_INTERVAL_S = 2.0

# A device uploads a batch's files together, so only the first open file of a request
# is probed; when it appears, the same verification job reads the others at once and
# records them in one transaction. They are also checked on their own this much later,
# in case the device uploads them one by one.
SIBLING_FALLBACK_S = 1.0

# Verification jobs (one per request's due files) in parallel, and the threads a job
# reads a batch's other objects with (a GET to a remote store waits tens of
# milliseconds; five in a row would make a device wait five times as long). Together
# at most 8 GETs at once, which does not flood a small S3-compatible server.
CHECK_WORKERS = 4
READ_WORKERS = 4

# Inbound requests wait in one bounded queue per device (`signer_limits.FairInbox`);
# beyond the bounds paho's thread drops requests (the devices time out and ask again)
# instead of growing memory without bound.

# Grants watched at once: 2,000 devices with a 5-file batch each in flight. One device
# may hold at most MAX_OPEN_GRANTS_PER_DEVICE of them (two full 50-file answers), so
# no device can fill the total; names past either cap are answered `rejected` (3008)
# and the device asks again once its open grants are resolved.
MAX_PENDING_GRANTS = 10_000
MAX_OPEN_GRANTS_PER_DEVICE = 100

# Grants still `granted` this long after their URL expired (plus the grace) are swept
# to `expired`: a grant this signer does not watch (a crash between the row and the
# watch, a cap, another signer instance gone) still ends in a final state.
SWEEP_INTERVAL_S = 60.0
SWEEP_MARGIN_S = 60.0

# Verified captures waiting for a Prefect hand-off while Prefect is down: beyond this
# the oldest are not handed off (they are stored and recorded regardless; counted).
MAX_HANDOFF_BACKLOG = 10_000

# Hand verified captures to Prefect in batches: at most this many per flow run, and no
# capture waits longer than HANDOFF_MAX_WAIT_S (one flow run per file would cost the
# Prefect server ~40 ms of CPU per image, see DESIGN.md).
HANDOFF_BATCH = 200
HANDOFF_MAX_WAIT_S = 5.0

MQTT_QOS = 1

# device_errors rows per device per minute: enough to diagnose a misbehaving device,
# few enough that one replaying garbage cannot fill the table. Devices tracked at once
# is bounded too (the window map is cleared when it grows past that).
MAX_ERRORS_PER_DEVICE_PER_MIN = 20
MAX_ERROR_WINDOWS = 10_000

# How long the worker sleeps waiting for requests when nothing else is due; a
# finished verification job wakes it at once (it may have scheduled an earlier check).
IDLE_POLL_S = 0.5


@dataclass
class _Pending:
    grant: eb.Grant
    group: str | None  # unchecked requests publish per group, after the settle delay
    next_check: float
    interval: float = CHECK_FIRST_S
    siblings: tuple[str, str] | None = None  # (serial, request) shared by a batch's files
    in_flight: bool = False  # a verification job is looking at it right now
    recheck: bool = False  # verified before; only confirming the object is still there


@dataclass(frozen=True)
class _Known:
    """What the database knows of a requested file name (see `edge_names_known`)."""

    status: str | None  # the grant's; None: never granted
    key: str | None
    size: int | None  # as stored, when verified
    sha256: str | None
    delivered: bool  # a capture was recorded under this name


def _key_for(serial: str, name: str, seen: _Known | None) -> str:
    """The object key to grant for `name`: never one that holds a delivered image.

    A name not delivered before keeps edge/{serial}/{key name}. A delivered name asked
    for again without proof of the same bytes (a seed request, another checksum) is a
    camera reusing the name for a new image, or a device re-sending one whose
    verification it missed: its own key either way, and verification tells which.
    A grant not verified keeps its key: it is still open (an upload to the earlier URL
    still counts), expired or failed without delivering, or its delivered object was
    found gone (the upload restores it); no image recorded as stored lives there.
    """
    if seen is None or not seen.delivered:
        return eb.device_key(serial, name)
    if seen.status != "verified" and seen.key:
        return seen.key
    return eb.reuse_key(serial, name)


class _LeaseLost(Exception):
    """Another instance holds the grant now: this one records nothing for it."""


class WorkerDied(RuntimeError):
    """The signer's worker thread died: the process should exit non-zero."""


def _bucket_stores(store: ObjectStore, buckets: list[str] | None) -> dict:
    """{bucket name or None: store}; None is the signer's own bucket.

    Allowed buckets are reached with the same endpoint and credentials as `store`
    (the operator lists only buckets those credentials may write).
    """
    stores: dict[str | None, ObjectStore] = {None: store}
    for name in buckets or []:
        if not hasattr(store, "bucket") or not hasattr(store, "client"):
            raise ValueError("a bucket allow-list needs an S3 store (STORAGE_URL s3://...)")
        if name == store.bucket:
            stores[name] = store
            continue
        other = copy.copy(store)  # shares the boto3 client: same endpoint, same keys
        other.bucket = name
        stores[name] = other
    return stores


@dataclass
class SignerStats:
    requests: int = 0
    refused: int = 0
    granted: int = 0
    verified: int = 0
    failed: int = 0
    published: int = 0
    handed_off: int = 0
    rate_limited: int = 0  # requests answered 3007
    capped: int = 0  # names answered `rejected` 3008 (grant caps)
    swept: int = 0  # stale grants marked expired
    claimed: int = 0  # open grants taken over (at start, or from a dead instance)
    lease_lost: int = 0  # watched grants another instance holds now (not recorded here)
    errors: list[str] = field(default_factory=list)


def stored_digest(
    store: ObjectStore, key: str, max_bytes: int | None = None
) -> tuple[int, str | None] | None:
    """(size, SHA-256) computed from the stored bytes, streaming; None when absent.

    An object larger than `max_bytes` is not read: (size, None), enough to refuse it.
    This is the generic path (any store, boto3); S3 stores use `ObjectReader`.
    """
    client = getattr(store, "client", None)
    if client is not None and hasattr(store, "bucket"):  # S3Store: one GET, streamed
        from botocore.exceptions import ClientError

        try:
            response = client.get_object(Bucket=store.bucket, Key=store._key(key))
        except ClientError as exc:
            if exc.response["Error"]["Code"] in {"NoSuchKey", "404", "NotFound"}:
                return None
            raise StorageError(f"S3 get {key!r} failed: {exc}") from exc
        body = response["Body"]
        if max_bytes is not None and response.get("ContentLength", 0) > max_bytes:
            body.close()
            return response["ContentLength"], None
        digest, size = hashlib.sha256(), 0
        for chunk in body.iter_chunks(STREAM_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
        return size, digest.hexdigest()
    info = store.head(key)
    if info is None:
        return None
    if max_bytes is not None and info.size > max_bytes:
        return info.size, None
    sha = store.checksum(key)  # LocalStore streams from disk
    return (info.size, sha) if sha else None


# An error answer from the store is a short XML document; a longer one is not read
# (the connection is dropped instead of drained).
MAX_ERROR_BODY_BYTES = 64 * 1024
# Read-back URLs are used at once; a minute covers clock skew with the store.
READ_URL_TTL_S = 60
READ_TIMEOUT_S = 30.0


class ObjectReader:
    """(size, SHA-256) of stored S3 objects: presigned GETs over kept-alive connections.

    Why not boto3's get_object: per 50 KB object it cost the signer ~4 ms of CPU
    (request signing, event hooks, response parsing) and a new-connection check; a
    presigned GET computed in-process (`FastS3Presigner`, the device API's signer,
    byte-identical to botocore's URL) and one HTTP/1.1 connection per verification
    thread cost a fraction of that. Only objects the signer granted are read.
    """

    def __init__(self, store) -> None:
        from services.api.presign import FastS3Presigner

        self._presigner = FastS3Presigner(store)  # ValueError: temporary credentials
        self._netloc = self._presigner.netloc
        parts = urlsplit(f"{self._presigner.scheme}://{self._netloc}")
        self._host = parts.hostname or ""
        self._tls = self._presigner.scheme == "https"
        self._port = parts.port or (443 if self._tls else 80)
        self._local = threading.local()
        self._connections: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    @classmethod
    def for_store(cls, store: ObjectStore) -> ObjectReader | None:
        """A reader for an S3 store with static credentials; None means use boto3."""
        from camfleet.storage.s3 import S3Store

        if not isinstance(store, S3Store):
            return None
        try:
            return cls(store)
        except ValueError:
            return None

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._tls:
                context = ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE"))
                conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=READ_TIMEOUT_S, context=context
                )
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=READ_TIMEOUT_S)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def digest(self, key: str, max_bytes: int | None = None) -> tuple[int, str | None] | None:
        """Like `stored_digest`: None when absent, (size, None) when over `max_bytes`."""
        url = self._presigner.url("GET", key, READ_URL_TTL_S)
        target = url.split(self._netloc, 1)[1]
        conn = self._connection()
        for attempt in (0, 1):
            reused = conn.sock is not None
            try:
                conn.request("GET", target, headers={"Host": self._netloc})
                return self._consume(conn, conn.getresponse(), max_bytes)
            except (OSError, http.client.HTTPException) as exc:
                conn.close()  # the next request opens a fresh connection
                stale = isinstance(exc, (http.client.RemoteDisconnected, ConnectionError))
                if reused and attempt == 0 and stale:
                    continue  # the store closed an idle keep-alive connection
                raise StorageError(f"S3 GET failed: {type(exc).__name__}") from None
        raise StorageError("S3 GET failed")  # not reached

    @staticmethod
    def _consume(conn, response, max_bytes: int | None) -> tuple[int, str | None] | None:
        length = response.getheader("content-length")
        length = int(length) if length is not None else None
        if response.status != 200:
            if length is not None and length <= MAX_ERROR_BODY_BYTES:
                response.read()  # keeps the connection usable
            else:
                conn.close()
            if response.status == 404:
                return None
            raise StorageError(f"S3 GET answered {response.status}")
        if max_bytes is not None and length is not None and length > max_bytes:
            conn.close()  # not worth reading: the grant forbids it
            return length, None
        digest, size = hashlib.sha256(), 0
        while chunk := response.read(STREAM_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                conn.close()
                return size, None
        return size, digest.hexdigest()

    def close(self) -> None:
        with self._lock:
            while self._connections:
                self._connections.pop().close()


class Signer:
    """Run with `start()`/`stop()` (tests, `camfleet up`) or `run_forever()` (CLI)."""

    def __init__(
        self,
        store: ObjectStore,
        dsn: str,
        broker,
        *,
        topics: eb.Topics | None = None,
        client_id: str = "camfleet-signer",
        expires_in: int = eb.URL_EXPIRES_S,
        max_file_bytes: int = eb.MAX_FILE_BYTES,
        settle_s: float = eb.LEGACY_SETTLE_S,
        legacy_answer_delay_s: float = eb.LEGACY_ANSWER_DELAY_S,
        grace_s: float = eb.GRANT_GRACE_S,
        handoff: Callable[[list[dict]], str | None] | None = None,
        clock: Callable[[], float] = time.time,
        buckets: list[str] | None = None,
        max_open_per_device: int = MAX_OPEN_GRANTS_PER_DEVICE,
        max_pending: int = MAX_PENDING_GRANTS,
        rate_limiter: RateLimiter | None = None,
        sweep_margin_s: float = SWEEP_MARGIN_S,
        share_group: str | None = None,
        lease_s: float = LEASE_S,
    ) -> None:
        self.store = store
        # Replicas: requests arrive through the broker's shared subscription
        # `$share/{group}/...` (each request to one instance), and each open grant is
        # leased to one instance (services/signer_leases.py).
        self.share_group = share_group
        self._leases = Leases(client_id, lease_s)
        self._next_lease_tend = 0.0  # time.monotonic()
        # Buckets a request's bucket-name may choose (None: bucket-name is ignored, as
        # the seed's cloud did, and every object goes to `store`'s bucket).
        self._stores = _bucket_stores(store, buckets)
        self._readers = {
            name: ObjectReader.for_store(bucket_store)
            for name, bucket_store in self._stores.items()
        }
        self.max_open_per_device = max_open_per_device
        self.max_pending = max_pending
        self.rate_limiter = rate_limiter or RateLimiter()
        self.sweep_margin_s = sweep_margin_s
        self._next_sweep = 0.0
        # The request worker, each verification job and the hand-off: one connection each.
        self.pool = db.Pool(dsn, maxconn=CHECK_WORKERS + 2)
        self._reads = None  # the worker's read threads, while it runs
        self.topics = topics or eb.Topics()
        self.expires_in = expires_in
        self.max_file_bytes = max_file_bytes
        self.grace_s = grace_s
        self.clock = clock
        self.stats = SignerStats()
        self._broker = broker
        self._client_id = client_id
        # (topic, payload) requests, one queue per device served round-robin.
        self._inbox = FairInbox()
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._open_by_device: dict[str, int] = {}  # len of _pending per serial
        self._publishing = eb.VerificationQueue(settle_s)
        self._handoff = _Handoff(handoff, self.pool) if handoff else None
        self.legacy_answer_delay_s = legacy_answer_delay_s
        self._answers_due: list[tuple[float, int, str, dict]] = []  # delayed seed answers
        self._answer_seq = itertools.count()
        self._lock = threading.Lock()  # verification threads resolve grants concurrently
        self._error_windows: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._connected = threading.Event()  # set on the broker's SUBACK, not before
        self._subscribe_mid: int | None = None
        self._thread: threading.Thread | None = None
        self._crashed: str | None = None  # why the worker died (the process must exit)
        self._client = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, connect_timeout: float = 10.0) -> Signer:
        self._sweep()
        self._resume_open_grants()
        self._next_lease_tend = time.monotonic() + self._leases.tend_every_s
        # A shared subscription with a persistent session would keep receiving its
        # share of requests while its instance is dead (Mosquitto queues them for the
        # session): replicas use clean sessions, so the broker routes around a dead one.
        client = self._broker.client(self._client_id, clean_session=self.share_group is not None)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = lambda *a, **k: self._connected.clear()
        client.on_message = self._on_message
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.connect_async(self._broker.host, self._broker.port, self._broker.keepalive)
        client.loop_start()
        self._client = client
        if not self._connected.wait(connect_timeout):
            log.warning("signer: broker %s not reachable yet; retrying", self._broker.describe())
        self._thread = threading.Thread(target=self._work_or_die, name="edge-signer", daemon=True)
        self._thread.start()
        if self._handoff:
            self._handoff.start()
        log.info("signer: answering %s", self._subscription())
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)
        if self._handoff:
            self._handoff.stop()
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
        for reader in self._readers.values():
            if reader is not None:
                reader.close()
        self._release_leases()
        close = getattr(self.rate_limiter, "close", None)
        if close is not None:
            close()
        self.pool.close()

    def run_forever(self) -> None:
        """Serve until SIGTERM/SIGINT, then stop gracefully (hand-off flushed)."""
        import signal

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self._stop.set())
        self.start()
        try:
            while not self._stop.wait(1.0):
                if not self.live():
                    self._crashed = self._crashed or "a signer thread died"
                    break
        finally:
            self.stop()
        if self._crashed:
            # A zombie that answers nobody helps nobody: exit non-zero, be restarted.
            raise WorkerDied(self._crashed)

    def wait_connected(self, timeout: float = 10.0) -> bool:
        """True once subscribed: the broker's SUBACK arrived (requests now reach us)."""
        return self._connected.wait(timeout)

    def live(self) -> bool:
        """The worker and the MQTT network thread are running (or not started yet)."""
        if self._crashed:
            return False
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            return False
        net = getattr(self._client, "_thread", None)
        return not (net is not None and not net.is_alive() and not self._stop.is_set())

    def ready(self) -> bool:
        """Live and subscribed: a request published now will be answered."""
        return self.live() and self._connected.is_set() and not self._stop.is_set()

    def health(self) -> dict:
        with self._lock:
            pending = len(self._pending)
        return {
            "subscribed": self._connected.is_set(),
            "share_group": self.share_group,
            "pending_grants": pending,
            "queued_requests": len(self._inbox),
            "dropped_requests": self._inbox.dropped,
            "rate_limited": self.stats.rate_limited,
            "capped": self.stats.capped,
            "claimed_grants": self.stats.claimed,
            "lease_lost": self.stats.lease_lost,
            "handoff_backlog": self._handoff.backlog() if self._handoff else 0,
        }

    def __enter__(self) -> Signer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- MQTT callbacks (paho's network thread: enqueue only) ------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties=None) -> None:
        if reason_code.is_failure:
            log.warning("signer: broker refused the connection: %s", reason_code)
            return
        no_delay(client)
        _, self._subscribe_mid = client.subscribe(self._subscription(), qos=MQTT_QOS)

    def _subscription(self) -> str:
        """Every device's request topic; through the share group for replicas."""
        topic = self.topics.request_filter()
        return f"$share/{self.share_group}/{topic}" if self.share_group else topic

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties=None) -> None:
        # Ready only now: before the SUBACK, a request published to the broker may not
        # be routed to us.
        if any(getattr(rc, "is_failure", False) for rc in reason_codes or []):
            log.error("signer: broker refused the subscription to %s", self._subscription())
            return
        self._connected.set()

    def _on_message(self, client, userdata, message) -> None:
        payload = bytes(message.payload[: eb.MAX_REQUEST_BYTES + 1])  # parser refuses
        if not self._inbox.put(message.topic, (message.topic, payload)):
            if self._inbox.dropped in (1, 10, 100) or self._inbox.dropped % 1000 == 0:
                log.warning(
                    "signer: request queue full, %d requests dropped (latest on %s)",
                    self._inbox.dropped,
                    eb._printable(message.topic, 120),
                )

    # -- the worker -------------------------------------------------------------------------

    def _work_or_die(self) -> None:
        try:
            self._work()
        except BaseException as exc:
            # Every request and job already has its own handler; reaching here is a bug.
            # Say so once and stop: run_forever exits non-zero and a supervisor restarts.
            self._crashed = f"worker died: {type(exc).__name__}"
            log.critical("signer: %s", self._crashed, exc_info=True)
            self._stop.set()

    def _work(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        with (
            ThreadPoolExecutor(READ_WORKERS, thread_name_prefix="edge-read") as reads,
            ThreadPoolExecutor(CHECK_WORKERS, thread_name_prefix="edge-verify") as checks,
        ):  # (leaving: the jobs end first, then the reads they use)
            self._reads = reads
            while not self._stop.is_set():
                now = self.clock()
                with self._lock:
                    due = [
                        p for p in self._pending.values() if not p.in_flight and p.next_check <= now
                    ]
                    for p in due:
                        p.in_flight = True
                    publish = self._publishing.due(now)
                for job in _jobs(due):
                    checks.submit(self._check_safely, job)
                for pub in publish:
                    self._publish_verification(pub)
                while self._answers_due and self._answers_due[0][0] <= now:
                    _, _, serial, answer = heapq.heappop(self._answers_due)
                    self._publish_answer(serial, answer)
                if now >= self._next_sweep:
                    self._sweep()
                if time.monotonic() >= self._next_lease_tend:
                    self._tend_leases()
                item = self._inbox.get(timeout=self._idle_timeout())
                if item is not None:
                    self._handle_request_safely(*item)
                # Drain what else arrived (round-robin by device), without starving
                # the checks.
                for _ in range(50):
                    item = self._inbox.get(timeout=0)
                    if item is None:
                        break
                    self._handle_request_safely(*item)

    def _wake(self) -> None:
        """Make the worker look at the schedule now (a verification job finished)."""
        self._inbox.wake()

    def _sweep(self) -> None:
        """Grants left `granted` well past their URL's expiry end as `expired`."""
        self._next_sweep = self.clock() + SWEEP_INTERVAL_S
        try:
            with self.pool.connection() as conn:
                swept = db.queries.edge_grants_sweep(
                    conn, older_than_s=self.grace_s + self.sweep_margin_s
                )
        except Exception as exc:
            log.warning("signer: sweeping stale grants failed: %s", type(exc).__name__)
            return
        if swept:
            self.stats.swept += swept
            log.info("signer: %d stale grants marked expired", swept)

    def _idle_timeout(self) -> float:
        now = self.clock()
        with self._lock:
            # In-flight grants are rescheduled by their job, which then wakes the worker.
            times = [p.next_check for p in self._pending.values() if not p.in_flight]
            ready = self._publishing.next_due()
        if ready is not None:
            times.append(ready)
        if self._answers_due:
            times.append(self._answers_due[0][0])
        if not times:
            return IDLE_POLL_S
        return min(IDLE_POLL_S, max(0.0, min(times) - now))

    # -- requests ---------------------------------------------------------------------------

    def _handle_request_safely(self, topic: str, payload: bytes) -> None:
        for attempt in (0, 1):
            try:
                self._handle_request(topic, payload)
                return
            except db.CONNECTION_ERRORS as exc:
                # A kept connection the server dropped (the pool has now let go of
                # them all): once more on a fresh one rather than make the device wait
                # for its answer timeout. Nothing was published or kept before the
                # transaction failed.
                if attempt == 0:
                    continue
                failure = exc
            except Exception as exc:  # the database or store failed: the device asks again
                failure = exc
            log.warning("signer: request on %s not answered: %s", topic, type(failure).__name__)
            self.stats.errors.append(type(failure).__name__)
            return

    def _handle_request(self, topic: str, payload: bytes) -> None:
        self.stats.requests += 1
        try:
            serial = self.topics.serial_from_request_topic(topic)
        except eb.RequestRefused as exc:
            # No valid device to answer: the topic level itself is malformed.
            log.warning("signer: ignoring request on a malformed topic: %s", exc.reason)
            self.stats.refused += 1
            return
        try:
            request = eb.parse_url_request(serial, payload, max_file_bytes=self.max_file_bytes)
        except eb.RequestRefused as exc:
            self.stats.refused += 1
            if self.rate_limiter.allow(serial):  # a flood of garbage gets no answers
                self._record_error(serial, None, eb.E_REQUEST, "warn", exc.reason, {})
                self._publish_answer(serial, eb.url_answer(serial, None, [], error=exc.reason))
            return
        if not self.rate_limiter.allow(serial):
            self._refuse(serial, request, eb.E_RATE, "too many requests; ask again later")
            self.stats.rate_limited += 1
            return
        allowed, bucket = self._bucket_for(request.bucket_name)
        if not allowed:
            reason = f"bucket-name {eb._printable(request.bucket_name)!r} is not allowed"
            self._refuse(serial, request, eb.E_BUCKET, reason)
            self.stats.refused += 1
            return
        request = self._within_caps(serial, request)
        # More names than one answer holds: one answer (and, for a names-only request,
        # one verification group) per part, so a seed device that reads only the first
        # answer gets that part verified and asks again for the rest.
        files = request.files
        parts = [
            files[i : i + eb.MAX_REQUEST_FILES] for i in range(0, len(files), eb.MAX_REQUEST_FILES)
        ] or [()]
        for number, part in enumerate(parts):
            rejected = request.rejected if number == 0 else ()
            part_request = dataclasses.replace(request, files=part, rejected=rejected)
            self._answer_part(serial, part_request, bucket, number if len(parts) > 1 else None)

    def _bucket_for(self, name: str | None) -> tuple[bool, str | None]:
        """(allowed, bucket to use: None is the signer's own) for a bucket-name.

        Without an allow-list bucket-name is ignored, as the seed's cloud did; with
        one, a listed bucket is used, the signer's own bucket or no name means the
        signer's own, and any other name is refused (3009).
        """
        if len(self._stores) == 1 or not name or name == getattr(self.store, "bucket", None):
            return True, None
        if name in self._stores:
            return True, name
        return False, None

    def _refuse(self, serial: str, request: eb.UrlRequest, code: int, reason: str) -> None:
        """Answer the whole request with an error (no grants), for this device only."""
        self._record_error(serial, None, code, "warn", reason, {})
        answer = eb.url_answer(serial, request.request_id, [], error=reason)
        answer["error-code"] = code
        self._publish_answer(serial, answer)

    def _within_caps(self, serial: str, request: eb.UrlRequest) -> eb.UrlRequest:
        """The request with the names past the device's or the signer's grant cap
        moved to `rejected` (3008): one device cannot hold every grant the signer
        watches, and a full signer refuses instead of granting what it cannot watch."""
        with self._lock:
            watched = {f.name for f in request.files if (serial, f.name) in self._pending}
            device_room = self.max_open_per_device - self._open_by_device.get(serial, 0)
            total_room = self.max_pending - len(self._pending)
        keep: list[eb.FileSpec] = []
        over: list[eb.Rejection] = []
        for spec in request.files:
            if spec.name in watched:  # asked again: replaces its own grant
                keep.append(spec)
            elif device_room > 0 and total_room > 0:
                device_room -= 1
                total_room -= 1
                keep.append(spec)
            else:
                over.append(eb.Rejection(spec.name, "too many open uploads; ask again later"))
        if not over:
            return request
        self.stats.capped += len(over)
        self._record_error(
            serial, None, eb.E_CAPACITY, "warn", f"{len(over)} names over the grant cap", {}
        )
        return dataclasses.replace(
            request, files=tuple(keep), rejected=request.rejected + tuple(over)
        )

    def _answer_part(
        self, serial: str, request: eb.UrlRequest, bucket: str | None, part: int | None
    ) -> None:
        now = self.clock()
        with self.pool.connection() as conn:  # one transaction for the whole part
            group, grants, already = self._grant(conn, serial, request, now, bucket, part)
        with self._lock:
            if group is not None and grants:
                self._publishing.open_request(serial, group, [g.name for g, _, _ in grants], now)
            for grant, _, _ in grants:
                first = grant is grants[0][0]
                due = now + (CHECK_FIRST_S if first else SIBLING_FALLBACK_S)
                self._watch(_Pending(grant, group, due, siblings=(serial, grant.request_id or "")))
            for grant in already:  # read back by a job, due now, before its {"file"}
                self._watch(
                    _Pending(
                        grant, None, now, siblings=(serial, grant.request_id or ""), recheck=True
                    )
                )
            self.stats.granted += len(grants)

        answer = eb.url_answer(
            serial,
            request.request_id,
            [(g.name, g.key, url, fields) for g, fields, url in grants],
            verified=[g.name for g in already],
            rejected=request.rejected,
            expires_in=self.expires_in,
        )
        if part is not None:
            answer["part"] = part + 1
        if request.checked or not self.legacy_answer_delay_s:
            self._publish_answer(serial, answer)
        else:
            due_at = self.clock() + self.legacy_answer_delay_s
            entry = (due_at, next(self._answer_seq), serial, answer)
            heapq.heappush(self._answers_due, entry)

    def _watch(self, pending: _Pending) -> None:
        """Watch a grant (caller holds the lock); replaces the same name's earlier one."""
        key = (pending.grant.serial, pending.grant.name)
        if key not in self._pending:
            serial = pending.grant.serial
            self._open_by_device[serial] = self._open_by_device.get(serial, 0) + 1
        self._pending[key] = pending

    def _unwatch(self, pending: _Pending) -> None:
        """Stop watching this grant, if it is still the one watched (caller holds the lock)."""
        key = (pending.grant.serial, pending.grant.name)
        if self._pending.get(key) is pending:
            del self._pending[key]
            left = self._open_by_device.get(key[0], 1) - 1
            if left > 0:
                self._open_by_device[key[0]] = left
            else:
                self._open_by_device.pop(key[0], None)

    def _grant(
        self,
        conn,
        serial: str,
        request: eb.UrlRequest,
        now: float,
        bucket: str | None = None,
        part: int | None = None,
    ):
        """Presigned POSTs and grant rows for a request, in the caller's transaction.

        Returns (the verification group of an unchecked request or None, grants as
        (grant, POST fields, POST url), grants for files verified before that only need
        their object confirmed).
        """
        expires_at = now + self.expires_in
        group = None if request.checked else (request.request_id or uuid.uuid4().hex)
        if group is not None and part is not None:
            group = f"{group}.{part + 1}"
        store = self._stores[bucket]
        grants: list[tuple[eb.Grant, dict[str, str], str]] = []
        already: list[eb.Grant] = []
        known = self._names_known(conn, request)
        for spec in request.files:
            seen = known.get(spec.name)
            verified_before = seen is not None and seen.status == "verified"
            same_bytes = verified_before and (seen.size, seen.sha256) == (spec.size, spec.sha256)
            if request.checked and same_bytes:
                key = seen.key  # where the delivered bytes are
            else:
                key = _key_for(serial, spec.name, seen)
            max_bytes = spec.size or self.max_file_bytes
            grant = eb.Grant(
                serial=serial,
                name=spec.name,
                key=key,
                max_bytes=max_bytes,
                expires_at=expires_at,
                request_id=request.request_id or group,
                declared_size=spec.size,
                declared_sha256=spec.sha256,
                bucket=bucket,
            )
            if request.checked and same_bytes:
                # Verified before (the device crashed or missed the message): no upload;
                # a job confirms the object still has these bytes, then verifies it.
                already.append(grant)
                continue
            post = store.presigned_post(key, max_bytes=max_bytes, expires_in=self.expires_in)
            grants.append((grant, post.fields, post.url))

        db.queries.edge_ensure_device(conn, device_id=serial)
        for grant, _, _ in grants:
            db.queries.edge_grant_upsert(
                conn,
                device_id=serial,
                file_name=grant.name,
                object_key=grant.key,
                request_id=grant.request_id,
                checked=request.checked,
                declared_size=grant.declared_size,
                declared_sha256=grant.declared_sha256,
                max_bytes=grant.max_bytes,
                expires_at=grant.expires_at,
                bucket=grant.bucket,
            )
        # Ours to verify (a re-grant takes the name over from whoever held it).
        self._leases.take(conn, serial, [g.name for g, _, _ in grants])
        for rejection in request.rejected:
            if not self._error_allowed(serial):
                break
            self._insert_error(
                conn,
                serial,
                None,
                eb.E_NAME,
                "warn",
                f"file name refused: {rejection.reason}",
                {"filename": eb._printable(rejection.filename, 255)},
            )
        return group, grants, already

    @staticmethod
    def _names_known(conn, request: eb.UrlRequest) -> dict[str, _Known]:
        rows = db.queries.edge_names_known(
            conn,
            device_id=request.serial,
            file_names=[f.name for f in request.files],
            capture_names=[eb.key_name(f.name) for f in request.files],
        )
        return {row[0]: _Known(*row[1:]) for row in rows}

    def _read(
        self, key: str, max_bytes: int | None = None, bucket: str | None = None
    ) -> tuple[int, str | None] | None:
        """(size, SHA-256) of the stored object, None when absent; raises on store errors."""
        reader = self._readers.get(bucket)
        if reader is not None:
            return reader.digest(key, max_bytes)
        return stored_digest(self._stores.get(bucket, self.store), key, max_bytes)

    # -- verification -----------------------------------------------------------------------

    def _check_safely(self, job: list[_Pending]) -> None:
        try:
            self._check(job)
        except Exception as exc:
            now = self.clock()
            for pending in job:  # resolved ones are no longer watched: harmless
                self._backoff(pending, now)
            log.warning("signer: verifying %s failed: %s", job[0].grant.key, type(exc).__name__)
        finally:
            for pending in job:
                pending.in_flight = False
            self._wake()

    def _check(self, job: list[_Pending]) -> None:
        """Verify a request's due grants; the first object found pulls in its siblings.

        A device uploads a batch together, so once one of its objects is there the
        others are read at once in the same job (in parallel) instead of being probed
        one by one, and all that pass are recorded in one transaction.
        """
        outcomes = self._read_all(job)
        if any(isinstance(o, tuple) for o in outcomes):
            siblings = self._claim_siblings(job[0])
            job.extend(siblings)  # the caller releases them with the rest of the job
            outcomes += self._read_all(siblings)
        verified: list[tuple[_Pending, int, str]] = []
        for pending, outcome in zip(job, outcomes, strict=True):
            grant = pending.grant
            now = self.clock()
            if isinstance(outcome, Exception):  # store down: look again later
                self._backoff(pending, now)
                log.warning(
                    "signer: store error checking %s: %s", grant.key, type(outcome).__name__
                )
                continue
            size, sha = outcome if outcome else (None, None)
            verdict, reason = eb.judge_upload(grant, size, sha)
            if verdict is eb.Verdict.MISSING:
                if pending.recheck:  # nobody is uploading it: let the next request ask
                    reason = "object gone since it was verified"
                    self._resolve_failed(pending, "failed", eb.E_NEVER_UPLOADED, reason, None, None)
                elif now > grant.expires_at + self.grace_s:
                    self._resolve_failed(pending, "expired", eb.E_NEVER_UPLOADED, reason, size, sha)
                else:
                    self._backoff(pending, now)
                continue
            if verdict is not eb.Verdict.VERIFIED:
                code = eb.E_SIZE if verdict is eb.Verdict.SIZE else eb.E_CHECKSUM
                if verdict is eb.Verdict.SIZE and size and size > grant.max_bytes:
                    # The store did not enforce the POST policy: do not keep what it forbade.
                    self._stores.get(grant.bucket, self.store).delete(grant.key)
                self._resolve_failed(pending, "failed", code, reason, size, sha)
                continue
            verified.append((pending, size, sha))
        if verified:
            self._resolve_verified(verified)

    def _read_all(self, pendings: list[_Pending]) -> list:
        """Each grant's stored (size, SHA-256), None when absent, or the exception."""
        if len(pendings) > 1 and self._reads is not None:
            return list(self._reads.map(self._read_outcome, pendings))
        return [self._read_outcome(p) for p in pendings]

    def _read_outcome(self, pending: _Pending):
        try:
            grant = pending.grant
            return self._read(grant.key, grant.max_bytes, grant.bucket)
        except Exception as exc:
            return exc

    def _claim_siblings(self, pending: _Pending) -> list[_Pending]:
        """The other open grants of this file's request, now in this job's hands."""
        if pending.siblings is None:
            return []
        with self._lock:
            found = [
                other
                for other in self._pending.values()
                if other.siblings == pending.siblings
                and other is not pending
                and not other.in_flight
            ]
            for other in found:
                other.in_flight = True
        return found

    def _resolve_verified(self, found: list[tuple[_Pending, int, str]]) -> None:
        """Capture rows for verified uploads in one transaction, then their {"file"}s.

        Only grants this instance still holds are recorded; the others (claimed or
        re-granted by another instance meanwhile) are dropped: their holder records them.
        """
        now = self.clock()
        try:
            resent = self._resent_images(found)
            with self.pool.connection() as conn:
                verified, lost = self._holding(conn, found)
                captures = [
                    self._record_capture(conn, p.grant, size, sha, resent.get(id(p)))
                    for p, size, sha in verified
                ]
        except Exception as exc:
            if len(found) > 1:  # one bad row must not hold back the others
                for item in found:
                    self._resolve_verified([item])
                return
            pending = found[0][0]  # database down: keep the grant open, verify later
            self._backoff(pending, now)
            log.warning("signer: could not record %s: %s", pending.grant.key, type(exc).__name__)
            return
        self._drop_lost(lost)
        publish: list[eb.Publish] = []
        with self._lock:
            for pending, _, _ in verified:
                grant = pending.grant
                self._unwatch(pending)
                self.stats.verified += 1
                publish += self._publishing.resolved(
                    grant.serial, pending.group, grant.name, True, now
                )
        for pending, _, _ in verified:
            earlier = resent.get(id(pending))
            if earlier is not None and earlier[1] != pending.grant.key:
                self._drop_copy(pending.grant)
        for pub in publish:
            self._publish_verification(pub)
        if self._handoff:
            self._handoff.add([c for c in captures if c])

    def _holding(self, conn, items: list[tuple]) -> tuple[list[tuple], list[_Pending]]:
        """(items whose grant we hold, now locked by `conn`'s transaction; lost pendings).

        A recheck is a grant verified before, confirmed for the device that asked: no
        open grant, nothing leased; the instance that answered the request does it.
        """
        names: dict[str, list[str]] = {}
        for item in items:
            pending = item[0]
            if not pending.recheck:
                names.setdefault(pending.grant.serial, []).append(pending.grant.name)
        held = {
            (serial, name)
            for serial, wanted in names.items()
            for name in self._leases.held(conn, serial, wanted)
        }
        kept, lost = [], []
        for item in items:
            grant = item[0].grant
            if item[0].recheck or (grant.serial, grant.name) in held:
                kept.append(item)
            else:
                lost.append(item[0])
        return kept, lost

    def _drop_lost(self, lost: list[_Pending]) -> None:
        """Stop watching grants another instance holds now (its own watch records them)."""
        if not lost:
            return
        now = self.clock()
        with self._lock:
            for pending in lost:
                self._unwatch(pending)
                # An unchecked request's group no longer waits for this name here.
                self._publishing.resolved(
                    pending.grant.serial, pending.group, pending.grant.name, False, now
                )
            self.stats.lease_lost += len(lost)
        log.info("signer: %d grants are held by another instance now", len(lost))

    def _resent_images(self, verified: list[tuple[_Pending, int, str]]) -> dict:
        """Uploads under a reused name that are an earlier delivery's exact bytes.

        {id(pending): (record_id, key) of that delivery}. A device that missed a
        verification sends the image again under the same name and gets a key of its
        own; the bytes tell it apart from a new image. The earlier object is read back
        first: only while it still holds those bytes is the new copy redundant.
        """
        reused = [(p, sha) for p, _, sha in verified if p.grant.reuses_name]
        if not reused:
            return {}
        with self.pool.connection() as conn:
            found = [
                (pending, sha, _same_image(conn, pending.grant, sha)) for pending, sha in reused
            ]
        resent = {}
        for pending, sha, row in found:
            if row is None:
                continue
            record_id, key = row
            if key == pending.grant.key:  # this very object (re-confirmed after a re-request)
                resent[id(pending)] = (record_id, key)
                continue
            stored = self._read(key, bucket=pending.grant.bucket)
            if stored is not None and stored[1] == sha:
                resent[id(pending)] = (record_id, key)
        return resent

    def _drop_copy(self, grant: eb.Grant) -> None:
        """Delete a re-sent image's second object; its bytes are stored under the first."""
        try:
            self._stores.get(grant.bucket, self.store).delete(grant.key)
        except Exception as exc:  # a leftover copy wastes space, loses nothing
            log.warning(
                "signer: could not delete the re-sent copy %s: %s", grant.key, type(exc).__name__
            )

    def _backoff(self, pending: _Pending, now: float) -> None:
        pending.interval = min(pending.interval * CHECK_BACKOFF, CHECK_MAX_INTERVAL_S)
        pending.next_check = now + pending.interval

    def _record_capture(
        self, conn, grant: eb.Grant, size: int, sha: str, earlier: tuple[str, str] | None
    ) -> dict | None:
        """Capture row + grant resolution in the caller's transaction; the new capture.

        `earlier` is the (record_id, key) of a delivery these bytes already are: then
        the grant points at it and no row is written.
        """
        if earlier is not None:
            self._resolve_grant(conn, grant, size, sha, *earlier)
            return None
        metadata = {"uploaded_via": "edge-presigned-post"}
        if grant.renamed:  # the device's own name (reused or not a safe key as is)
            metadata["device_file_name"] = grant.name
        if grant.bucket:  # storage_path is in this bucket, not the signer's own
            metadata["bucket"] = grant.bucket
        row = db.queries.edge_capture_upsert(
            conn,
            device_id=grant.serial,
            file_name=grant.capture_name,
            image_bytes=size,
            content_type=_content_type(grant.name),
            storage_path=grant.key,
            sha256=sha,
            metadata=metadata,
        )
        record_id, inserted = row
        self._resolve_grant(conn, grant, size, sha, record_id, None)
        if not inserted:
            return None
        return {
            "record_id": record_id,
            "device_id": grant.serial,
            "file": grant.capture_name,
            "key": grant.key,
            "size": size,
            "sha256": sha,
        }

    @staticmethod
    def _resolve_grant(conn, grant: eb.Grant, size, sha, capture_id, key: str | None) -> None:
        db.queries.edge_grant_resolve(
            conn,
            device_id=grant.serial,
            file_name=grant.name,
            status="verified",
            failed_reason=None,
            stored_size=size,
            stored_sha256=sha,
            capture_id=capture_id,
            object_key=key,
        )

    def _resolve_failed(self, pending, status, code, reason, size, sha) -> None:
        grant = pending.grant
        try:
            with self.pool.connection() as conn:
                _, lost = self._holding(conn, [(pending,)])
                if lost:
                    raise _LeaseLost
                db.queries.edge_grant_resolve(
                    conn,
                    device_id=grant.serial,
                    file_name=grant.name,
                    status=status,
                    failed_reason=reason,
                    stored_size=size,
                    stored_sha256=sha,
                    capture_id=None,
                    object_key=None,
                )
                if self._error_allowed(grant.serial):
                    self._insert_error(
                        conn, grant.serial, grant.name, code, "error", reason, {"key": grant.key}
                    )
        except _LeaseLost:
            self._drop_lost([pending])
            return
        except Exception as exc:
            self._backoff(pending, self.clock())
            log.warning("signer: could not record failure of %s: %s", grant.key, type(exc).__name__)
            return
        with self._lock:
            self._unwatch(pending)
            self.stats.failed += 1
            publish = self._publishing.resolved(
                grant.serial, pending.group, grant.name, False, self.clock()
            )
        log.info("signer: %s not verified: %s", grant.key, reason)
        for pub in publish:
            self._publish_verification(pub)

    # -- persistence ------------------------------------------------------------------------

    def _resume_open_grants(self) -> None:
        """At start: our own open grants from before a restart, and those nobody holds."""
        with self.pool.connection() as conn:
            rows = self._leases.claim(conn, self._room(), own=True)
        self._watch_claimed(rows, "resumed")

    def _tend_leases(self) -> None:
        """Renew our leases; take over open grants whose holder stopped renewing."""
        self._next_lease_tend = time.monotonic() + self._leases.tend_every_s
        try:
            with self.pool.connection() as conn:
                self._leases.renew(conn)
                rows = self._leases.claim(conn, self._room())
        except Exception as exc:  # the database is down: try again next time
            log.warning("signer: renewing grant leases failed: %s", type(exc).__name__)
            return
        self._watch_claimed(rows, "took over")

    def _release_leases(self) -> None:
        try:
            with self.pool.connection() as conn:
                self._leases.release(conn)
        except Exception as exc:  # they expire instead
            log.warning("signer: releasing grant leases failed: %s", type(exc).__name__)

    def _room(self) -> int:
        with self._lock:
            return self.max_pending - len(self._pending)

    def _watch_claimed(self, rows: list[tuple], how: str) -> None:
        """Watch claimed grants as if granted here (rows as `edge_grants_open`'s)."""
        groups: dict[tuple[str, str], list[str]] = {}
        now = self.clock()
        watched = 0
        for (
            serial,
            name,
            key,
            request_id,
            checked,
            size,
            sha,
            max_bytes,
            expires_at,
            bucket,
        ) in rows:
            group = None if checked else (request_id or "resumed")
            if bucket is not None and bucket not in self._stores:
                bucket = None  # no longer allowed: looked for in the signer's own bucket
            grant = eb.Grant(
                serial, name, key, max_bytes, expires_at, request_id, size, sha, bucket
            )
            siblings = (serial, request_id or "")
            with self._lock:
                if (serial, name) in self._pending:  # ours already (our lease had lapsed)
                    continue
                self._watch(_Pending(grant, group, now, siblings=siblings))
            watched += 1
            if group is not None:
                groups.setdefault((serial, group), []).append(name)
        with self._lock:
            for (serial, group), names in groups.items():
                self._publishing.open_request(serial, group, names, now)
            self.stats.claimed += watched
        if watched:
            log.info("signer: %s %d open grants", how, watched)

    def _error_allowed(self, serial: str) -> bool:
        minute = int(self.clock() // 60)
        with self._lock:
            if len(self._error_windows) > MAX_ERROR_WINDOWS:
                self._error_windows.clear()
            start, count = self._error_windows.get(serial, (minute, 0))
            if start != minute:
                start, count = minute, 0
            self._error_windows[serial] = (start, count + 1)
        return count < MAX_ERRORS_PER_DEVICE_PER_MIN

    def _record_error(self, serial, capture_id, code, severity, message, details) -> None:
        if not self._error_allowed(serial):
            return
        try:
            with self.pool.connection() as conn:
                self._insert_error(conn, serial, capture_id, code, severity, message, details)
        except Exception as exc:
            log.warning("signer: could not record error %d: %s", code, type(exc).__name__)

    @staticmethod
    def _insert_error(conn, serial, capture_id, code, severity, message, details) -> None:
        db.queries.edge_error_insert(
            conn,
            device_id=serial,
            capture_id=capture_id,
            error_code=code,
            severity=severity,
            message=message,
            details=details,
        )

    # -- publishing -------------------------------------------------------------------------

    def _publish_answer(self, serial: str, answer: dict) -> None:
        _, urls_topic, _ = self.topics.for_device(serial)
        self._client.publish(urls_topic, json.dumps(answer), qos=MQTT_QOS)

    def _publish_verification(self, pub: eb.Publish) -> None:
        _, _, verified_topic = self.topics.for_device(pub.serial)
        self._client.publish(verified_topic, eb.verification_message(pub.name), qos=MQTT_QOS)
        self.stats.published += 1


def _jobs(due: list[_Pending]) -> list[list[_Pending]]:
    """Due grants grouped by request: one verification job (and transaction) each."""
    jobs: dict[object, list[_Pending]] = {}
    for pending in due:
        jobs.setdefault(pending.siblings or id(pending), []).append(pending)
    return list(jobs.values())


def _same_image(conn, grant: eb.Grant, sha: str) -> tuple[str, str] | None:
    """(record_id, key) of an earlier capture of these bytes under the grant's name."""
    return db.queries.edge_capture_same_image(
        conn, device_id=grant.serial, sha256=sha, file_name=grant.name
    )


def _content_type(name: str) -> str:
    lower = name.lower()
    if lower.endswith((".jpg", ".jpeg")):
        return "image/jpeg"
    if lower.endswith(".png"):
        return "image/png"
    if lower.endswith((".mp4", ".h264")):
        return "video/mp4"
    return "application/octet-stream"


class _Handoff:
    """Collects new captures and hands them to a Prefect flow run in batches."""

    def __init__(self, run: Callable[[list[dict]], str | None], pool: db.Pool) -> None:
        self._run = run
        self._pool = pool
        self._items: list[dict] = []
        self._first_at: float | None = None
        self._lock = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="edge-handoff", daemon=True)
        self.flow_runs: list[str] = []
        self.dropped = 0
        self._retry_at = 0.0  # after a failed hand-off, not before this

    def start(self) -> None:
        self._thread.start()

    def add(self, captures: list[dict]) -> None:
        if not captures:
            return
        with self._lock:
            if not self._items:
                self._first_at = time.monotonic()
            self._items.extend(captures)
            over = len(self._items) - MAX_HANDOFF_BACKLOG
            if over > 0:  # Prefect down for long: stored captures, just not handed off
                del self._items[:over]
                self.dropped += over
                log.warning("signer: hand-off backlog full; %d captures not handed off", over)
            self._lock.notify()

    def backlog(self) -> int:
        with self._lock:
            return len(self._items)

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join(30)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._ready():
                    wait = None
                    if self._first_at is not None:
                        wait = max(0.0, self._first_at + HANDOFF_MAX_WAIT_S - time.monotonic())
                    self._lock.wait(wait)
                batch, self._items = self._items[:HANDOFF_BATCH], self._items[HANDOFF_BATCH:]
                self._first_at = time.monotonic() if self._items else None
                stopping = self._stop
            handed = self._hand(batch) if batch else True
            if stopping and (not self._items or not handed):  # Prefect down at stop: no loop
                return

    def _ready(self) -> bool:
        if not self._items or time.monotonic() < self._retry_at:
            return False
        waited = time.monotonic() - (self._first_at or time.monotonic())
        return len(self._items) >= HANDOFF_BATCH or waited >= HANDOFF_MAX_WAIT_S

    def _hand(self, batch: list[dict]) -> bool:
        try:
            flow_run_id = self._run(batch)
        except Exception as exc:  # Prefect unreachable: the captures are stored regardless
            log.warning("signer: post-processing hand-off failed: %s", type(exc).__name__)
            with self._lock:  # tried again later, within the bounded backlog (counted)
                self._items[:0] = batch
                over = len(self._items) - MAX_HANDOFF_BACKLOG
                if over > 0:
                    del self._items[:over]
                    self.dropped += over
                self._first_at = time.monotonic()
                self._retry_at = self._first_at + HANDOFF_MAX_WAIT_S
            return False
        if flow_run_id:
            self.flow_runs.append(flow_run_id)
            with self._pool.connection() as conn:
                db.queries.edge_captures_set_flow_run(
                    conn, flow_run_id=flow_run_id, record_ids=[c["record_id"] for c in batch]
                )
        return True
