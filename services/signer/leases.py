"""Leases on open edge grants: several signer instances, each grant verified by one.

Every open grant in `edge_upload_grants` is leased to the signer instance that issued
it (`leased_by` = the instance's MQTT client id, unique per instance). Only the holder
records the grant's verification or failure: `held()` locks the rows in the
verification's own transaction, so a grant another instance claimed meanwhile is never
recorded (nor its `{"file"}` published) twice. Holders renew their leases while they
live; an instance that dies (SIGKILL, lost machine) stops renewing, and once its leases
expire the others claim them with `FOR UPDATE SKIP LOCKED` and watch them as their
own. An instance that stops cleanly releases its leases; one restarted under the same
client id takes its own back at once (a client id serves one process at a time: the
broker disconnects the older session of a duplicate).

A device that asks again for a name gets a fresh grant leased to whichever instance
answered: the lease follows the latest grant, and the earlier holder drops its watch
when it finds the lease gone.

`Leases` is the SQL side (one instance's owner name and lease length); `LeaseTending`
is built with the pool, a `Leases`, the watch table it adds claimed grants to, the
stats, the clock, the allowed buckets and the cap on watched grants, and does the
resuming, renewing, taking over and releasing for `Signer`'s lifecycle and worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence

from camfleet import db
from camfleet.protocol import edge_batch as eb
from services.signer.watch import Pending, SignerStats, WatchTable

log = logging.getLogger("camfleet.signer")

# How long a lease outlives its holder's last renewal. Leases are renewed, and expired
# ones claimed, every third of that (one statement each: an idle fleet costs every
# instance two tiny statements per 5 s), so a killed instance's grants are claimed by
# the others within 4/3 LEASE_S (20 s); the device meanwhile waits for its
# verification (VERIFY_TIMEOUT_S, 30 s) and would ask again after that anyway.
LEASE_S = 15.0


class Leases:
    """One signer instance's side of the grant leases (SQL: sql/queries/edge_leases.sql)."""

    def __init__(self, owner: str, lease_s: float = LEASE_S) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self.owner = owner
        self.lease_s = float(lease_s)
        self.tend_every_s = self.lease_s / 3

    def issue(self, conn, serial: str, checked: bool, grants: list[eb.Grant]) -> None:
        """Write the grant rows of one request part, leased to us, in one statement
        (caller's transaction; `edge_grants_issue`, sql/queries/edge.sql): what
        registering the device, writing and leasing each grant once took 2 + N."""
        if not grants:
            return
        db.queries.edge_grants_issue(
            conn,
            device_id=serial,
            checked=checked,
            owner=self.owner,
            lease_s=self.lease_s,
            file_names=[g.name for g in grants],
            object_keys=[g.key for g in grants],
            request_ids=[g.request_id for g in grants],
            declared_sizes=[g.declared_size for g in grants],
            declared_sha256s=[g.declared_sha256 for g in grants],
            max_bytes=[g.max_bytes for g in grants],
            expires_ats=[float(g.expires_at) for g in grants],
            buckets=[g.bucket for g in grants],
        )

    def claim(self, conn, max_rows: int, own: bool = False) -> list[tuple]:
        """Open grants nobody holds, now ours (rows as `edge_grants_open`'s).

        `own`: also this owner's leases from an earlier life (at start).
        """
        if max_rows <= 0:
            return []
        return list(
            db.queries.edge_grants_claim(
                conn, owner=self.owner, lease_s=self.lease_s, own=own, max_rows=max_rows
            )
        )

    def renew(self, conn) -> int:
        """Extend every open lease of ours; the number renewed."""
        return db.queries.edge_grants_renew(conn, owner=self.owner, lease_s=self.lease_s)

    def held(self, conn, serial: str, names: Iterable[str]) -> set[str]:
        """Of `names`, those whose open grant we hold, locked until the transaction ends."""
        names = sorted(set(names))
        if not names:
            return set()
        rows = db.queries.edge_grants_held(
            conn, device_id=serial, file_names=names, owner=self.owner
        )
        return {row[0] for row in rows}

    def holding(self, conn, items: Sequence[tuple]) -> tuple[list[tuple], list[Pending]]:
        """(items whose grant we hold, now locked by `conn`'s transaction; lost pendings).

        Each item's first element is its `Pending`. A recheck is a grant verified
        before, confirmed for the device that asked: no open grant, nothing leased; the
        instance that answered the request does it.
        """
        names: dict[str, list[str]] = {}
        for item in items:
            pending = item[0]
            if not pending.recheck:
                names.setdefault(pending.grant.serial, []).append(pending.grant.name)
        held = {
            (serial, name)
            for serial, wanted in names.items()
            for name in self.held(conn, serial, wanted)
        }
        kept, lost = [], []
        for item in items:
            grant = item[0].grant
            if item[0].recheck or (grant.serial, grant.name) in held:
                kept.append(item)
            else:
                lost.append(item[0])
        return kept, lost

    def release(self, conn) -> int:
        """Hand our open grants to whoever looks next (a clean stop)."""
        return db.queries.edge_grants_release(conn, owner=self.owner)


class LeaseLost(Exception):
    """Another instance holds the grant now: this one records nothing for it."""


class LeaseTending:
    """The signer's side of its leases: resume, renew, take over, release."""

    def __init__(
        self,
        pool: db.Pool,
        leases: Leases,
        watch: WatchTable,
        stats: SignerStats,
        *,
        clock: Callable[[], float] = time.time,
        buckets: Iterable[str | None] = (None,),
        max_pending: int,
    ) -> None:
        self.pool = pool
        self.leases = leases
        self.watch = watch
        self.stats = stats
        self.clock = clock
        self.buckets = set(buckets)  # a claimed grant's bucket no longer here: our own
        self.max_pending = max_pending
        self.next_tend = 0.0  # time.monotonic()

    def due(self) -> bool:
        """Time to renew our leases and look for grants to take over."""
        return time.monotonic() >= self.next_tend

    def resume(self) -> None:
        """At start: our own open grants from before a restart, and those nobody holds."""
        with self.pool.connection() as conn:
            rows = self.leases.claim(conn, self.watch.room(self.max_pending), own=True)
        self.watch_claimed(rows, "resumed")
        self.next_tend = time.monotonic() + self.leases.tend_every_s

    def tend(self) -> None:
        """Renew our leases; take over open grants whose holder stopped renewing."""
        self.next_tend = time.monotonic() + self.leases.tend_every_s
        try:
            with self.pool.connection() as conn:
                self.leases.renew(conn)
                rows = self.leases.claim(conn, self.watch.room(self.max_pending))
        except Exception as exc:  # the database is down: try again next time
            log.warning("signer: renewing grant leases failed: %s", type(exc).__name__)
            return
        self.watch_claimed(rows, "took over")

    def release(self) -> None:
        try:
            with self.pool.connection() as conn:
                self.leases.release(conn)
        except Exception as exc:  # they expire instead
            log.warning("signer: releasing grant leases failed: %s", type(exc).__name__)

    def watch_claimed(self, rows: list[tuple], how: str) -> None:
        """Watch claimed grants as if granted here (rows as `edge_grants_open`'s)."""
        table = self.watch
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
            if bucket is not None and bucket not in self.buckets:
                bucket = None  # no longer allowed: looked for in the signer's own bucket
            grant = eb.Grant(
                serial, name, key, max_bytes, expires_at, request_id, size, sha, bucket
            )
            siblings = (serial, request_id or "")
            with table.lock:
                if (serial, name) in table.pending:  # ours already (our lease had lapsed)
                    continue
                table.watch(Pending(grant, group, now, siblings=siblings))
            watched += 1
            if group is not None:
                groups.setdefault((serial, group), []).append(name)
        with table.lock:
            for (serial, group), names in groups.items():
                table.publishing.open_request(serial, group, names, now)
            self.stats.claimed += watched
        if watched:
            log.info("signer: %s %d open grants", how, watched)
