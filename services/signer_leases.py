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
"""

from __future__ import annotations

from collections.abc import Iterable

from camfleet import db

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

    def take(self, conn, serial: str, names: Iterable[str]) -> None:
        """Lease the grants just issued for `names` (caller's transaction)."""
        names = list(names)
        if names:
            db.queries.edge_grants_lease(
                conn,
                owner=self.owner,
                lease_s=self.lease_s,
                device_id=serial,
                file_names=names,
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

    def release(self, conn) -> int:
        """Hand our open grants to whoever looks next (a clean stop)."""
        return db.queries.edge_grants_release(conn, owner=self.owner)
