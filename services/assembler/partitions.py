"""Device partitions leased in PostgreSQL: several `camfleet assembler` replicas, one broker.

Mosquitto's `$share` groups are round-robin and would split one image's chunks over
replicas, so a device belongs to partition ``crc32(device id) mod P`` and each partition
is leased by at most one live replica (table assembler_partition_leases, migration
0140).  A replica subscribes to the status topic of every device and to the data topic
of each device of the partitions it holds (DeviceSubscriptions, below): the broker
delivers an image's chunks to its owner only.  Whatever still arrives for a partition
it does not hold (a status; a chunk in flight across a handover) is dropped in paho's
network thread from the topic alone (a crc32 and a set lookup, no JSON or base64).
Measured (bench/bench_assembler_replicas.py): 3 replicas use 1.09-1.12x the total CPU
per image of one instance.

Leases (docs/mqtt-ingest.md "Several assemblers"):

* Every RENEW_INTERVAL_S a replica, in one transaction: marks itself live in
  assembler_replicas, renews the leases it holds (lease_until = now() + TTL), claims
  lapsed or free ones up to its fair share ceil(P / live replicas) with
  ``FOR UPDATE SKIP LOCKED``, and releases idle ones beyond its share (a replica that
  joins gets partitions within two rounds).
* Fencing: a replica uses its leases only until (monotonic time before the renewing
  transaction began) + TTL - SAFETY_MARGIN_S.  The database ends the lease no sooner than
  TTL after that transaction began, so two replicas never serve one partition at the
  same time, whatever the database or this process's scheduler do.
* A SIGKILLed replica's partitions are claimed by the others at once, not after its TTL:
  every replica sets an MQTT will (REPLICA_GONE_TOPIC, payload its id) that the broker
  publishes when its connection drops, and a replica that hears it reaps the gone
  replica's leases (`reap`) as soon as PostgreSQL shows its lease session closed too
  (application_name ``assembler-leases <id>``): both connections closed is what a dead
  process looks like, and a forged or early will changes nothing while the session
  lives.  A replica whose broker connection dropped (its will went out) stops using its
  leases until its next round confirms them (`suspend`).  Without a will (a network
  partition that keeps both sockets open) the leases lapse after TTL + one round, as
  before.  Images in flight complete from the device's resend (the firmware resends an
  unACKed image, seed 002).  After gaining a partition, a replica drops a device's
  chunks of images it holds no metadata for until it has seen one metadata message of
  that device (``gained_at``: the rest of an image another replica had started); the
  resend brings the metadata, and no "metadata never arrived" error is written for an
  image the device did not give up on.  (A time window instead failed under load: a
  loaded device or worker delivered such a tail after any fixed grace had ended.)

Stored once: capture rows are unique per (device, capture id) and an identical resend is
recorded as a duplicate of the first (tasks/mqtt.py), objects are keyed by content
hash; so even the one window left (a batch that was already running when its lease
lapsed) cannot store an image twice.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import zlib
from collections.abc import Callable, Iterable

import psycopg2

from camfleet import db

log = logging.getLogger("camfleet.assembler")

DEFAULT_PARTITIONS = 64
# Lease renewal period and lifetime.  Failover takes TTL + up to one round; renewal
# costs one short transaction (4-5 statements) per replica per round.
RENEW_INTERVAL_S = 1.0
LEASE_TTL_S = 5.0
# A lease is used only until this long before the database ends it: covers a
# renewing transaction that is slow to start and clock rate differences.
SAFETY_MARGIN_S = 1.0
# Replica rows of replicas gone this long are deleted (they only count while live).
FORGET_REPLICA_S = 3600
# The will every replica's MQTT session carries (payload: its replica id).  Brokers
# with ACLs must let the assembler's account read and write it.
REPLICA_GONE_TOPIC = "camfleet/assembler/gone"
# After a will, check the gone replica's database session this often (its backend may
# take a moment to notice the closed socket) until its lease TTL has passed.
REAP_RETRY_S = 0.2
# Wills awaiting their database check at once (more are ignored: the TTL still works).
MAX_PENDING_WILLS = 100
# application_name is at most 63 bytes (NAMEDATALEN - 1)
APPLICATION_NAME_MAX = 63

_HEARTBEAT = """
INSERT INTO assembler_replicas (replica_id, seen_until)
VALUES (%(me)s, now() + make_interval(secs => %(ttl)s))
ON CONFLICT (replica_id) DO UPDATE SET seen_until = excluded.seen_until
"""
_LIVE = "SELECT count(*) FROM assembler_replicas WHERE seen_until > now()"
_FORGET_DEAD = """
DELETE FROM assembler_replicas
WHERE seen_until < now() - make_interval(secs => %(forget)s)
"""
_RENEW = """
UPDATE assembler_partition_leases SET lease_until = now() + make_interval(secs => %(ttl)s)
WHERE owner = %(me)s RETURNING partition
"""
_CLAIM = """
WITH free AS (
    SELECT partition FROM assembler_partition_leases
    WHERE lease_until < now() AND partition < %(p)s
    ORDER BY partition LIMIT %(n)s
    FOR UPDATE SKIP LOCKED
)
UPDATE assembler_partition_leases l
SET owner = %(me)s, lease_until = now() + make_interval(secs => %(ttl)s), claimed_at = now()
FROM free WHERE l.partition = free.partition
RETURNING l.partition
"""
_RELEASE = """
UPDATE assembler_partition_leases SET owner = NULL, lease_until = '-infinity'
WHERE owner = %(me)s AND partition = ANY(%(parts)s)
"""
_LEAVE = "DELETE FROM assembler_replicas WHERE replica_id = %(me)s"
# Of the replicas named in wills: the live ones, and whether their lease session is
# open.  One statement however many wills are pending; names that are no live replica
# (invented, or already lapsed) come back as nothing and are dropped.
_GONE_CHECK = """
SELECT r.replica_id, EXISTS (
    SELECT 1 FROM pg_stat_activity a
    WHERE a.application_name = w.app AND a.datname = current_database()
)
FROM unnest(%(ids)s::text[], %(apps)s::text[]) AS w(replica_id, app)
JOIN assembler_replicas r ON r.replica_id = w.replica_id AND r.seen_until > now()
"""
_REAP_LEASES = """
UPDATE assembler_partition_leases SET lease_until = '-infinity'
WHERE owner = %(gone)s RETURNING partition
"""
_REAP_REPLICA = """
UPDATE assembler_replicas SET seen_until = '-infinity' WHERE replica_id = %(gone)s
"""
_SEED = """
INSERT INTO assembler_partition_leases (partition)
SELECT generate_series(0, %(p)s - 1) ON CONFLICT DO NOTHING
"""
_COUNT = "SELECT count(*) FROM assembler_partition_leases"


class PartitionMismatch(RuntimeError):
    """Replicas of one fleet must agree on the number of partitions."""


def partition_of(device_id: str, partitions: int) -> int:
    """The partition of a device: stable across processes and machines (not hash())."""
    return zlib.crc32(device_id.encode("utf-8", "surrogatepass")) % partitions


def lease_session_name(replica_id: str) -> str:
    """The application_name of a replica's lease connection (how others see it live)."""
    name = f"assembler-leases {replica_id}"
    return name.encode()[:APPLICATION_NAME_MAX].decode(errors="ignore")


def fair_share(partitions: int, live: int) -> int:
    return math.ceil(partitions / max(1, live))


class PartitionLeases:
    """The partitions this replica holds, renewed on its own thread.

    ``owns(device_id)`` is the hot path (paho's network thread): a crc32, a frozenset
    lookup and a monotonic clock read.  ``on_lost(partitions)`` is called (on the lease
    thread) when partitions stop being ours, after ``owns`` already says False for them;
    ``busy()`` returns the partitions with images in assembly (not released while busy).
    """

    def __init__(
        self,
        dsn: str,
        replica_id: str,
        partitions: int,
        *,
        on_lost: Callable[[frozenset[int]], None] = lambda parts: None,
        busy: Callable[[], Iterable[int]] = frozenset,
        after_round: Callable[[frozenset[int]], None] = lambda owned: None,
        ttl_s: float = LEASE_TTL_S,
        interval_s: float = RENEW_INTERVAL_S,
        margin_s: float = SAFETY_MARGIN_S,
    ):
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        if ttl_s <= margin_s + interval_s:
            raise ValueError("lease TTL must exceed the renew interval + safety margin")
        self.dsn = dsn
        self.replica_id = replica_id
        self.partitions = partitions
        self.on_lost = on_lost
        self.busy = busy
        self.after_round = after_round
        self.ttl_s = ttl_s
        self.interval_s = interval_s
        self.margin_s = margin_s
        self._owned: frozenset[int] = frozenset()
        self._valid_until = 0.0  # monotonic; leases are not used past it
        self._gained_at: dict[int, float] = {}  # partition -> monotonic time gained
        self._conn = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # a will arrived: run a round now
        self._gone: dict[str, float] = {}  # replica id -> monotonic time to stop checking
        self._gone_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.live_replicas = 0
        self.rounds = 0
        self.failed_rounds = 0
        self.gained_total = 0
        self.lost_total = 0
        self.reaped_total = 0
        self.last_error: str | None = None

    # -- hot path ------------------------------------------------------------------------
    def owns(self, device_id: str) -> bool:
        return (
            zlib.crc32(device_id.encode("utf-8", "surrogatepass")) % self.partitions in self._owned
            and time.monotonic() < self._valid_until
        )

    def gained_at(self, device_id: str) -> float:
        """When (monotonic) this replica last gained the device's partition."""
        return self._gained_at.get(partition_of(device_id, self.partitions), 0.0)

    def owned(self) -> frozenset[int]:
        return self._owned if time.monotonic() < self._valid_until else frozenset()

    def valid(self) -> bool:
        return time.monotonic() < self._valid_until

    # -- failover ------------------------------------------------------------------------
    def reap(self, replica_id: str) -> None:
        """Another replica's will arrived (called on paho's network thread): take its
        leases from the database once its lease session is closed too."""
        if replica_id == self.replica_id or not replica_id or len(replica_id) > 200:
            return
        with self._gone_lock:
            if replica_id not in self._gone and len(self._gone) >= MAX_PENDING_WILLS:
                return  # a flood of invented wills: the TTL path still works
            self._gone[replica_id] = time.monotonic() + self.ttl_s
        self._wake.set()

    def suspend(self) -> None:
        """Our broker connection dropped (so our will went out and the others may reap
        our leases): use none of them until the next round confirms which are ours."""
        self._valid_until = 0.0
        self._wake.set()

    def _reap_gone(self, cur) -> None:
        """Inside a round's transaction: free the leases of live replicas whose will came
        and whose lease session is closed.  A will naming no live replica is dropped; one
        whose replica's session is still open is checked again next round until that
        replica's TTL has passed (it was alive: a network blip, or a forged will)."""
        with self._gone_lock:
            gone = dict(self._gone)
        ids = sorted(gone)
        cur.execute(_GONE_CHECK, {"ids": ids, "apps": [lease_session_name(r) for r in ids]})
        live = dict(cur.fetchall())
        now = time.monotonic()
        for replica_id, until in gone.items():
            session_open = live.get(replica_id)
            if session_open and now < until:
                continue  # its backend has not noticed yet, or it lives: check again
            if session_open is False:
                cur.execute(_REAP_LEASES, {"gone": replica_id})
                freed = len(cur.fetchall())
                cur.execute(_REAP_REPLICA, {"gone": replica_id})
                self.reaped_total += freed
                log.info(
                    "replica %s is gone (will received, database session closed): "
                    "%d partitions freed",
                    replica_id,
                    freed,
                )
            with self._gone_lock:
                if self._gone.get(replica_id) == until:
                    del self._gone[replica_id]

    def _reap_safely(self, cur) -> None:
        """`_reap_gone` in a savepoint: a check that fails must not cost us the round
        that renews our own leases (the gone replica's then lapse after their TTL)."""
        cur.execute("SAVEPOINT reap")
        try:
            self._reap_gone(cur)
        except psycopg2.Error as exc:
            cur.execute("ROLLBACK TO SAVEPOINT reap")
            with self._gone_lock:
                self._gone.clear()
            log.warning("checking gone replicas failed (%s): their leases lapse", exc.pgcode)
        else:
            cur.execute("RELEASE SAVEPOINT reap")

    def _reaping(self) -> bool:
        with self._gone_lock:
            return bool(self._gone)

    # -- rounds ----------------------------------------------------------------------------
    def _connection(self):
        if self._conn is None or self._conn.closed:
            self._conn = db.connect(
                self.dsn,
                connect_timeout=5,
                application_name=lease_session_name(self.replica_id),
            )
            with self._conn, self._conn.cursor() as cur:
                cur.execute("SET statement_timeout = %s", (int(self.ttl_s * 1000 / 2),))
        return self._conn

    def prepare(self) -> None:
        """Create the partition rows; refuse to run beside replicas with another P."""
        conn = self._connection()
        with conn, conn.cursor() as cur:
            cur.execute(_COUNT)
            (n,) = cur.fetchone()
            if n == 0:  # the fleet's first replica (concurrent firsts: same rows)
                cur.execute(_SEED, {"p": self.partitions})
                n = self.partitions
        if n != self.partitions:
            raise PartitionMismatch(
                f"assembler_partition_leases holds {n} partitions, this replica was "
                f"started with --partitions {self.partitions}: every replica of a fleet "
                "must use the same number"
            )

    def round(self) -> None:
        """One renewal round (the lease thread calls it every RENEW_INTERVAL_S)."""
        t0 = time.monotonic()
        announced = self._owned  # the worker may hold state for these
        try:
            live, held, release = self._renew_and_claim()
        except psycopg2.Error as exc:
            self.failed_rounds += 1
            self.last_error = type(exc).__name__
            log.warning("partition lease round failed (%s); retrying", type(exc).__name__)
            self._close()
            self._expire_if_lapsed()
            return
        self.rounds += 1
        self.live_replicas = live
        self.last_error = None
        self._account(t0, announced, live, held, release)

    def _renew_and_claim(self) -> tuple[int, set[int], set[int]]:
        """In one transaction: heartbeat, renew what we hold, claim up to our fair share,
        give back idle partitions beyond it. Returns (live replicas, held, released)."""
        args = {"me": self.replica_id, "ttl": self.ttl_s, "p": self.partitions}
        conn = self._connection()
        with conn, conn.cursor() as cur:
            if self._reaping():
                self._reap_safely(cur)
            cur.execute(_HEARTBEAT, args)
            if self.rounds % 60 == 0:
                cur.execute(_FORGET_DEAD, {"forget": FORGET_REPLICA_S})
            cur.execute(_LIVE)
            (live,) = cur.fetchone()
            cur.execute(_RENEW, args)
            held = {r[0] for r in cur.fetchall()}
            share = fair_share(self.partitions, live)
            if len(held) < share:
                cur.execute(_CLAIM, {**args, "n": share - len(held)})
                held |= {r[0] for r in cur.fetchall()}
            release = self._to_release(held, share)
            if release:
                # stop using them first: from here on messages of these partitions
                # are dropped, then the database lets the others claim them
                held -= release
                self._owned = frozenset(held)
                self.on_lost(frozenset(release))
                cur.execute(_RELEASE, {**args, "parts": sorted(release)})
        return live, held, release

    def _account(
        self, t0: float, announced: frozenset, live: int, held: set[int], release: set[int]
    ) -> None:
        """After a round: what was gained, what was lost while our lease lapsed."""
        now = time.monotonic()
        # new, or back after our lease lapsed (even for a moment during this round:
        # owns() said False meanwhile, so an image's head may have been dropped)
        usable = announced if now < self._valid_until else frozenset()
        gained = frozenset(held) - usable
        for p in gained:
            self._gained_at[p] = t0  # messages from here on may be ours
        for p in [p for p in self._gained_at if p not in held]:
            del self._gained_at[p]
        self._owned = frozenset(held)
        self._valid_until = t0 + self.ttl_s - self.margin_s
        lost = announced - self._owned - release
        if lost:  # taken by another replica while our lease lapsed
            self.lost_total += len(lost)
            self.on_lost(lost)
        if release:
            self.lost_total += len(release)
        if gained or release or lost:
            self.gained_total += len(gained)
            log.info(
                "partitions: %d held of %d (%d live replicas): +%d -%d",
                len(held),
                self.partitions,
                live,
                len(gained),
                len(release) + len(lost),
            )

    def _to_release(self, held: set[int], share: int) -> set[int]:
        """Idle partitions beyond this replica's fair share (busy ones wait a round)."""
        if len(held) <= share:
            return set()
        try:
            busy = set(self.busy())
        except RuntimeError:  # the worker changed its state meanwhile: next round
            return set()
        idle = sorted((p for p in held if p not in busy), reverse=True)
        return set(idle[: len(held) - share])

    def _expire_if_lapsed(self) -> None:
        if self._owned and time.monotonic() >= self._valid_until:
            lost, self._owned = self._owned, frozenset()
            self.lost_total += len(lost)
            log.warning("partition leases lapsed (database unreachable): %d dropped", len(lost))
            self.on_lost(lost)

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg2.Error:
                pass
            self._conn = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Prepare and run the first round here (a lone replica owns every partition
        when start() returns), then renew on a thread."""
        self.prepare()
        self.round()
        self._thread = threading.Thread(target=self._run, name="assembler-leases", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = time.monotonic()
        while True:
            self._wake.wait(REAP_RETRY_S if self._reaping() else self.interval_s)
            self._wake.clear()
            # rounds at most every REAP_RETRY_S, however many wills arrive
            if self._stop.wait(max(0.0, last + REAP_RETRY_S - time.monotonic())):
                return
            last = time.monotonic()
            try:
                self.round()
            except Exception:  # never let the lease thread die silently
                self.failed_rounds += 1
                log.exception("partition lease round crashed; retrying")
                self._close()
                self._expire_if_lapsed()
            try:
                self.after_round(self.owned())
            except Exception:
                log.exception("after a lease round: failed; retrying next round")

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def stop(self, release: bool = True) -> None:
        """Stop renewing; with release, hand every partition back at once so that the
        other replicas take them within one round instead of one TTL."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        held, self._owned = self._owned, frozenset()
        if release:
            try:
                conn = self._connection()
                with conn, conn.cursor() as cur:
                    cur.execute(_RELEASE, {"me": self.replica_id, "parts": sorted(held)})
                    cur.execute(_LEAVE, {"me": self.replica_id})
            except psycopg2.Error as exc:
                log.warning("could not release partitions (%s): they lapse", type(exc).__name__)
        self._close()

    def status(self) -> dict:
        owned = sorted(self.owned())
        return {
            "replica_id": self.replica_id,
            "partitions": self.partitions,
            "owned": owned,
            "owned_count": len(owned),
            "live_replicas": self.live_replicas,
            "fair_share": fair_share(self.partitions, self.live_replicas),
            "lease_valid_s": round(max(0.0, self._valid_until - time.monotonic()), 2),
            "rounds": self.rounds,
            "failed_rounds": self.failed_rounds,
            "gained_total": self.gained_total,
            "lost_total": self.lost_total,
            "reaped_total": self.reaped_total,
        }


def forget_devices(assembler, partitions: frozenset[int], count: int) -> int:
    """Drop the in-memory assembly state of devices in ``partitions`` (the worker
    thread calls it when they were lost: the new owner serves them from the device's
    resend; our half-assembled copies must not time out into error rows or NACKs)."""
    return assembler.forget(lambda device_id: partition_of(device_id, count) in partitions)


def busy_partitions(assembler, count: int) -> frozenset[int]:
    """Partitions with an image in assembly (read from the lease thread)."""
    return frozenset(partition_of(d, count) for d in assembler.devices_in_assembly())


# Topic filters per SUBSCRIBE/UNSUBSCRIBE packet (~30 bytes each: ~15 KB packets).
SUBSCRIBE_BATCH = 500


class DeviceSubscriptions:
    """A replica's data-topic subscriptions: one per device of the partitions it holds.

    Measured (bench/bench_assembler_replicas.py, docs/scaling.md): when every replica
    subscribes to ESP32CAM/+/data and drops other replicas' devices itself, 3 replicas
    cost 1.9-2.0x the CPU per image of one, because reading a message in paho costs
    about as much as assembling it.  With one subscription per device the broker does
    that filtering (a topic-tree lookup in C) and a replica reads its own devices only.
    Devices are learnt from `devices` (refreshed) and from the status topic, which every
    replica keeps as a wildcard: a device's status precedes its images at every wake,
    so a new device's images reach its owner from its first wake (or its first resend).

    paho's subscribe/unsubscribe are thread-safe: the lease thread calls sync(), the
    network thread add() and reset().
    """

    def __init__(self, data_pattern: str, partitions: int):
        if data_pattern.count("+") != 1:
            raise ValueError("the data topic pattern must have one + for the device id")
        self.pattern = data_pattern
        self.partitions = partitions
        self._subscribed: set[str] = set()
        self._pending: set[int] = set()  # SUBSCRIBE mids without a SUBACK yet
        self._lock = threading.Lock()

    def topic(self, device_id: str) -> str:
        return self.pattern.replace("+", device_id, 1)

    def __contains__(self, device_id: str) -> bool:
        return device_id in self._subscribed

    def reset(self) -> None:
        """A new (clean) session: the broker holds none of our subscriptions."""
        with self._lock:
            self._subscribed.clear()
            self._pending.clear()

    def acked(self, mid: int) -> bool:
        with self._lock:
            if mid in self._pending:
                self._pending.discard(mid)
                return True
            return False

    def add(self, client, device_id: str) -> None:
        with self._lock:
            if device_id not in self._subscribed:
                self._subscribe(client, [device_id])

    def sync(self, client, owned: frozenset[int], known: Iterable[str]) -> tuple[int, int]:
        """Subscribe to the devices of `owned` partitions, unsubscribe from the rest."""
        want = {d for d in known if partition_of(d, self.partitions) in owned}
        with self._lock:
            add = sorted(want - self._subscribed)
            # devices learnt from their status stay while their partition is ours
            drop = sorted(
                d for d in self._subscribed if partition_of(d, self.partitions) not in owned
            )
            for i in range(0, len(add), SUBSCRIBE_BATCH):
                self._subscribe(client, add[i : i + SUBSCRIBE_BATCH])
            for i in range(0, len(drop), SUBSCRIBE_BATCH):
                part = drop[i : i + SUBSCRIBE_BATCH]
                rc, _ = client.unsubscribe([self.topic(d) for d in part])
                if rc == 0:
                    self._subscribed.difference_update(part)
        return len(add), len(drop)

    def _subscribe(self, client, devices: list[str]) -> None:
        rc, mid = client.subscribe([(self.topic(d), 1) for d in devices])
        if rc == 0:  # else not connected: the next (re)connect subscribes again
            self._subscribed.update(devices)
            self._pending.add(mid)

    def status(self) -> dict:
        return {
            "device_subscriptions": len(self._subscribed),
            "subscribe_pending": len(self._pending),
        }
