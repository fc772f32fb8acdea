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
of invented ones, cannot hold every grant or the worker (`limits`).
Grants nobody watches are swept to `expired`. Ready means subscribed (the SUBACK
arrived); a worker that dies anyway makes `run_forever` raise `WorkerDied`, and the
command exits non-zero for its supervisor to restart it. Nothing here waits on Prefect:
the hand-off has its own thread and a bounded backlog.

Crash safety: every grant is a row in `edge_upload_grants` before its URL is published,
leased to this instance (`leases`), and a restarted signer resumes
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

The package, one module a concern. Each part is an object built with exactly the
collaborators it uses, so it can be read and tested alone (tests/test_signer_parts.py);
`Signer` builds them, keeps the lifecycle and the worker loop, and delegates:

    watch.py         the shared state: the open grants watched here (`WatchTable`, with
                     its lock and the verification groups) and the `SignerStats`
    grants.py        `GrantRequests`: requests in, presigned POSTs and grant rows out
    verification.py  `Verification`: read-back, judgement, capture rows, `{"file"}`s
    leases.py        `Leases` (SQL) and `LeaseTending`: which instance verifies which
                     grant (replicas, restarts)
    limits.py        per-device inbox queues and request rate limits
    errors.py        `DeviceErrors`: throttled `device_errors` rows
    mqtt.py          `MqttShell`: the paho client, subscription, callbacks, publishing
    handoff.py       batches of new captures to a Prefect flow run
    health.py        `/live` and `/ready` for a supervisor

The parts share state only through what they are given: the one `WatchTable`, the one
`SignerStats`, the one `DeviceErrors`; they talk to MQTT only through the
`publish_answer`/`publish_verification` callables of the shell.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from camfleet import db
from camfleet.protocol import edge_batch as eb
from camfleet.storage import ObjectStore
from camfleet.storage.fast_s3 import ObjectReader
from services.signer.errors import MAX_ERRORS_PER_DEVICE_PER_MIN, DeviceErrors
from services.signer.grants import (
    MAX_OPEN_GRANTS_PER_DEVICE,
    MAX_PENDING_GRANTS,
    GrantRequests,
    bucket_stores,
)
from services.signer.handoff import Handoff
from services.signer.leases import LEASE_S, Leases, LeaseTending
from services.signer.limits import FairInbox, RateLimiter
from services.signer.mqtt import MqttShell
from services.signer.verification import CHECK_WORKERS, READ_WORKERS, Verification, jobs
from services.signer.watch import CHECK_FIRST_S, SignerStats, WatchTable

__all__ = [
    "CHECK_FIRST_S",
    "CHECK_WORKERS",
    "MAX_ERRORS_PER_DEVICE_PER_MIN",
    "MAX_OPEN_GRANTS_PER_DEVICE",
    "MAX_PENDING_GRANTS",
    "Signer",
    "SignerStats",
    "WorkerDied",
]

log = logging.getLogger("camfleet.signer")

# Grants still `granted` this long after their URL expired (plus the grace) are swept
# to `expired`: a grant this signer does not watch (a crash between the row and the
# watch, a cap, another signer instance gone) still ends in a final state.
SWEEP_INTERVAL_S = 60.0
SWEEP_MARGIN_S = 60.0

# How long the worker sleeps waiting for requests when nothing else is due; a
# finished verification job wakes it at once (it may have scheduled an earlier check).
IDLE_POLL_S = 0.5


class WorkerDied(RuntimeError):
    """The signer's worker thread died: the process should exit non-zero."""


class Signer:
    """Run with `start()`/`stop()` (tests, `camfleet up`) or `run_forever()` (CLI).

    Its parts: `mqtt` (MqttShell), `grants` (GrantRequests), `verification`
    (Verification), `tending` (LeaseTending), `errors` (DeviceErrors), sharing `watch`
    (WatchTable) and `stats` (SignerStats).
    """

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
        self.store, self.share_group, self.clock = store, share_group, clock
        self.grace_s, self.sweep_margin_s = grace_s, sweep_margin_s
        self.topics = topics or eb.Topics()
        self.rate_limiter = rate_limiter or RateLimiter()
        # Buckets a request's bucket-name may choose (None: bucket-name is ignored, as
        # the seed's cloud did, and every object goes to `store`'s bucket).
        stores = bucket_stores(store, buckets)
        self._readers = {name: ObjectReader.for_store(s) for name, s in stores.items()}
        # The request worker, each verification job and the hand-off: one connection each.
        self.pool = db.Pool(dsn, maxconn=CHECK_WORKERS + 2)
        self.stats, self.watch = SignerStats(), WatchTable(settle_s)
        self._inbox = FairInbox()  # (topic, payload) requests, one queue per device
        self._handoff = Handoff(handoff, self.pool) if handoff else None
        self.mqtt = MqttShell(broker, client_id, self.topics, share_group, self._inbox, self.stats)
        self.errors = DeviceErrors(self.pool, clock)
        # Each open grant is leased to one instance (leases.py): replicas, restarts.
        leases = Leases(client_id, lease_s)
        self.grants = GrantRequests(
            self.pool, stores, self.watch, leases, self.errors, self.mqtt.publish_answer,
            self.stats, topics=self.topics, clock=clock, rate_limiter=self.rate_limiter,
            expires_in=expires_in, max_file_bytes=max_file_bytes,
            max_open_per_device=max_open_per_device, max_pending=max_pending,
            legacy_answer_delay_s=legacy_answer_delay_s,
        )  # fmt: skip
        self.verification = Verification(
            self.pool, stores, self._readers, self.watch, leases, self.errors,
            self.mqtt.publish_verification, self.stats,
            clock=clock, grace_s=grace_s, handoff=self._handoff, wake=self._inbox.wake,
        )  # fmt: skip
        self.tending = LeaseTending(
            self.pool, leases, self.watch, self.stats,
            clock=clock, buckets=stores, max_pending=max_pending,
        )  # fmt: skip
        self._next_sweep = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._crashed: str | None = None  # why the worker died (the process must exit)

    @property
    def expires_in(self) -> int:
        """How long a granted URL is valid (seconds); settable while running."""
        return self.grants.expires_in

    @expires_in.setter
    def expires_in(self, value: int) -> None:
        self.grants.expires_in = value

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, connect_timeout: float = 10.0) -> Signer:
        self._sweep()
        self.tending.resume()
        self.mqtt.connect(connect_timeout)
        self._thread = threading.Thread(target=self._work_or_die, name="edge-signer", daemon=True)
        self._thread.start()
        if self._handoff:
            self._handoff.start()
        log.info("signer: answering %s", self.mqtt.subscription())
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)
        if self._handoff:
            self._handoff.stop()
        self.mqtt.disconnect()
        for reader in self._readers.values():
            if reader is not None:
                reader.close()
        self.tending.release()
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
        return self.mqtt.connected.wait(timeout)

    def live(self) -> bool:
        """The worker, the hand-off and the MQTT network thread are running (or not
        started yet)."""
        if self._crashed or (self._handoff is not None and not self._handoff.alive()):
            return False
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            return False
        net = getattr(self.mqtt.client, "_thread", None)
        return not (net is not None and not net.is_alive() and not self._stop.is_set())

    def ready(self) -> bool:
        """Live and subscribed: a request published now will be answered."""
        return self.live() and self.mqtt.connected.is_set() and not self._stop.is_set()

    def health(self) -> dict:
        with self.watch.lock:
            pending = len(self.watch.pending)
        return {
            "subscribed": self.mqtt.connected.is_set(),
            "share_group": self.share_group,
            "pending_grants": pending,
            "queued_requests": len(self._inbox),
            "dropped_requests": self._inbox.dropped,
            "rate_limited": self.stats.rate_limited,
            "capped": self.stats.capped,
            "claimed_grants": self.stats.claimed,
            "lease_lost": self.stats.lease_lost,
            "handoff_backlog": self._handoff.backlog() if self._handoff else 0,
            "handoff_stamp_failed": self._handoff.stamp_failed if self._handoff else 0,
        }

    def __enter__(self) -> Signer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

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
            self.verification.reads = reads
            while not self._stop.is_set():
                now = self.clock()
                due, publish = self.watch.take_due(now)
                for job in jobs(due):
                    checks.submit(self.verification.check_safely, job)
                for pub in publish:
                    self.mqtt.publish_verification(pub)
                self.grants.publish_answers_due(now)
                if now >= self._next_sweep:
                    self._sweep()
                if self.tending.due():
                    self.tending.tend()
                item = self._inbox.get(timeout=self._idle_timeout())
                if item is not None:
                    self.grants.handle_safely(*item)
                # Drain what else arrived (round-robin by device), without starving
                # the checks.
                for _ in range(50):
                    item = self._inbox.get(timeout=0)
                    if item is None:
                        break
                    self.grants.handle_safely(*item)

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
        times = self.watch.next_times()
        answer_due = self.grants.next_answer_due()
        if answer_due is not None:
            times.append(answer_due)
        if not times:
            return IDLE_POLL_S
        return min(IDLE_POLL_S, max(0.0, min(times) - now))
