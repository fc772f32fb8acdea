"""The watch table: the open grants this instance looks for, and when it looks next.

`WatchTable` is a part of `Signer` (services/signer/__init__.py), which creates the
table (`_pending`, `_open_by_device`) and its lock; callers hold the lock.
"""

from __future__ import annotations

from dataclasses import dataclass

from camfleet.protocol import edge_batch as eb

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


@dataclass
class Pending:
    grant: eb.Grant
    group: str | None  # unchecked requests publish per group, after the settle delay
    next_check: float
    interval: float = CHECK_FIRST_S
    siblings: tuple[str, str] | None = None  # (serial, request) shared by a batch's files
    in_flight: bool = False  # a verification job is looking at it right now
    recheck: bool = False  # verified before; only confirming the object is still there


class WatchTable:
    """Watching and unwatching grants, and backing off between looks."""

    def _watch(self, pending: Pending) -> None:
        """Watch a grant (caller holds the lock); replaces the same name's earlier one."""
        key = (pending.grant.serial, pending.grant.name)
        if key not in self._pending:
            serial = pending.grant.serial
            self._open_by_device[serial] = self._open_by_device.get(serial, 0) + 1
        self._pending[key] = pending

    def _unwatch(self, pending: Pending) -> None:
        """Stop watching this grant, if it is still the one watched (caller holds the lock)."""
        key = (pending.grant.serial, pending.grant.name)
        if self._pending.get(key) is pending:
            del self._pending[key]
            left = self._open_by_device.get(key[0], 1) - 1
            if left > 0:
                self._open_by_device[key[0]] = left
            else:
                self._open_by_device.pop(key[0], None)

    def _backoff(self, pending: Pending, now: float) -> None:
        pending.interval = min(pending.interval * CHECK_BACKOFF, CHECK_MAX_INTERVAL_S)
        pending.next_check = now + pending.interval
