"""The watch table: the open grants this instance looks for, and when it looks next.

`WatchTable` is the state the signer's parts share: the watched grants (`pending`,
`open_by_device`), the unchecked requests' verification groups (`publishing`) and the
lock that guards all three (verification jobs resolve grants concurrently). `Signer`
(services/signer/__init__.py) creates one and hands it to each part that needs it;
callers of `watch`/`unwatch` hold `lock`. `SignerStats` are the counters every part
adds to (one object, shared the same way).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

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


class WatchTable:
    """The grants watched here, by (serial, name); backing off between looks."""

    def __init__(self, settle_s: float = eb.LEGACY_SETTLE_S) -> None:
        self.lock = threading.Lock()  # verification threads resolve grants concurrently
        self.pending: dict[tuple[str, str], Pending] = {}
        self.open_by_device: dict[str, int] = {}  # len of `pending` per serial
        # Unchecked requests' `{"file"}` messages, published per group after settle_s.
        self.publishing = eb.VerificationQueue(settle_s)

    def watch(self, pending: Pending) -> None:
        """Watch a grant (caller holds the lock); replaces the same name's earlier one."""
        key = (pending.grant.serial, pending.grant.name)
        if key not in self.pending:
            serial = pending.grant.serial
            self.open_by_device[serial] = self.open_by_device.get(serial, 0) + 1
        self.pending[key] = pending

    def unwatch(self, pending: Pending) -> None:
        """Stop watching this grant, if it is still the one watched (caller holds the lock)."""
        key = (pending.grant.serial, pending.grant.name)
        if self.pending.get(key) is pending:
            del self.pending[key]
            left = self.open_by_device.get(key[0], 1) - 1
            if left > 0:
                self.open_by_device[key[0]] = left
            else:
                self.open_by_device.pop(key[0], None)

    def take_due(self, now: float) -> tuple[list[Pending], list[eb.Publish]]:
        """(grants due for a look, now marked in flight; `{"file"}` messages due)."""
        with self.lock:
            due = [p for p in self.pending.values() if not p.in_flight and p.next_check <= now]
            for p in due:
                p.in_flight = True
            return due, self.publishing.due(now)

    def next_times(self) -> list[float]:
        """When each grant not in flight is looked at next, and the next group is due.

        In-flight grants are rescheduled by their job, which then wakes the worker.
        """
        with self.lock:
            times = [p.next_check for p in self.pending.values() if not p.in_flight]
            ready = self.publishing.next_due()
        if ready is not None:
            times.append(ready)
        return times

    def room(self, max_pending: int) -> int:
        """How many more grants may be watched under `max_pending`."""
        with self.lock:
            return max_pending - len(self.pending)

    @staticmethod
    def backoff(pending: Pending, now: float) -> None:
        pending.interval = min(pending.interval * CHECK_BACKOFF, CHECK_MAX_INTERVAL_S)
        pending.next_check = now + pending.interval
