"""Fairness for the edge signer: one device cannot starve the others.

- `FairInbox`: requests wait in one bounded queue per device and the worker takes
  them round-robin, so a device flooding its request topic delays only itself; the
  queue as a whole is bounded in count and bytes (paho's thread drops beyond that and
  counts it).
- `RateLimiter`: a token bucket per device; a request over the limit is answered with
  an error code (3007) instead of grants, only for that device.

Grant caps (open grants per device and in total) live in the signer, which owns the
grants.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

# Requests one device may have waiting: a camfleet device has one request in flight
# per lane (a few); more is a device replaying or flooding, and waiting would only
# make its answers stale.
MAX_QUEUED_PER_DEVICE = 8

# Whole inbox: a fleet's burst after an outage (2,000 devices asking at once), and at
# most 64 MiB of payloads (each cut to just over the request size limit).
MAX_QUEUED_REQUESTS = 2_000
MAX_QUEUED_BYTES = 64 * 1024 * 1024

# Default rate limit per device: camfleet's device drains a backlog at up to ~25
# batches a second over 4 lanes (bench/bench_edge_batch.py); twice that, with a burst
# of 100 for a reconnect, never slows a real device. A flood beyond it is answered
# 3007. Devices tracked at once are bounded (least recently seen forgotten first).
REQUESTS_PER_S = 50.0
REQUEST_BURST = 100
MAX_TRACKED_DEVICES = 20_000


class FairInbox:
    """Per-device FIFO queues served round-robin; `None` items only wake the reader."""

    def __init__(
        self,
        per_device: int = MAX_QUEUED_PER_DEVICE,
        max_items: int = MAX_QUEUED_REQUESTS,
        max_bytes: int = MAX_QUEUED_BYTES,
    ) -> None:
        self.per_device = per_device
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._queues: OrderedDict[str, deque[tuple[str, bytes]]] = OrderedDict()
        self._items = 0
        self._bytes = 0
        self._wakeups = 0
        self._cond = threading.Condition()
        self.dropped = 0  # requests refused because a queue was full (counted, logged)

    def put(self, device: str, item: tuple[str, bytes]) -> bool:
        """Queue a request for `device`; False (and counted) when it must be dropped."""
        size = len(item[1])
        with self._cond:
            q = self._queues.get(device)
            full = (
                (q is not None and len(q) >= self.per_device)
                or self._items >= self.max_items
                or self._bytes + size > self.max_bytes
            )
            if full:
                self.dropped += 1
                return False
            if q is None:
                q = self._queues[device] = deque()
            q.append(item)
            self._items += 1
            self._bytes += size
            self._cond.notify()
            return True

    def wake(self) -> None:
        with self._cond:
            self._wakeups += 1
            self._cond.notify()

    def get(self, timeout: float) -> tuple[str, bytes] | None:
        """The next device's oldest request, None on a wake-up or after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._items and not self._wakeups:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            if not self._items:
                self._wakeups = 0
                return None
            device, q = next(iter(self._queues.items()))
            item = q.popleft()
            if q:
                self._queues.move_to_end(device)  # its next request waits for the others
            else:
                del self._queues[device]
            self._items -= 1
            self._bytes -= len(item[1])
            return item

    def __len__(self) -> int:
        with self._cond:
            return self._items


class RateLimiter:
    """A token bucket per device: `allow(device)` spends one token or says no."""

    def __init__(
        self,
        rate_per_s: float = REQUESTS_PER_S,
        burst: int = REQUEST_BURST,
        clock: Callable[[], float] = time.monotonic,
        max_devices: int = MAX_TRACKED_DEVICES,
    ) -> None:
        self.rate = rate_per_s
        self.burst = burst
        self.clock = clock
        self.max_devices = max_devices
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, device: str) -> bool:
        if self.rate <= 0:
            return True  # no limit configured
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.pop(device, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            self._buckets[device] = (tokens, now)
            while len(self._buckets) > self.max_devices:
                self._buckets.popitem(last=False)  # forgotten: starts with a full bucket
            return allowed


# Expired shared counters are deleted at most this often per instance (a bounded batch,
# the same query the device API runs), so the table holds the devices of the last few
# windows, not every device ever seen.
SHARED_SWEEP_INTERVAL_S = 60.0


class SharedRateLimiter:
    """The per-device request limit across every signer instance (replicas).

    With a shared subscription the broker spreads one device's requests over the
    instances, so a limit per process would let a device through N times over. The
    counters are the device API's (`rate_limit_counters`, sql/migrations/0090, one
    atomic upsert per hit, `access_rate_hit`): a fixed window of burst / rate seconds
    holding at most `burst` requests, i.e. the same average rate as `RateLimiter`'s
    token bucket, with the burst granted once per window. One statement per request, in
    autocommit (one round trip); an unreachable database raises (the request is not
    answered; the device asks again).
    """

    def __init__(
        self,
        dsn: str,
        rate_per_s: float = REQUESTS_PER_S,
        burst: int = REQUEST_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from camfleet import db

        self.rate = rate_per_s
        self.burst = burst
        self.window_s = max(1.0, burst / rate_per_s) if rate_per_s > 0 else 1.0
        self.clock = clock
        self._db = db
        self._pool = db.Pool(dsn, maxconn=1)  # the request worker is its only caller
        self._next_sweep = clock() + SHARED_SWEEP_INTERVAL_S

    def allow(self, device: str) -> bool:
        if self.rate <= 0:
            return True  # no limit configured
        queries = self._db.queries
        with self._pool.connection() as conn:
            # The hit is one atomic statement: in autocommit it is one round trip,
            # where psycopg2's implicit transaction would add a BEGIN and a COMMIT.
            if not conn.autocommit:
                conn.autocommit = True
            rows = list(
                queries.access_rate_hit(
                    conn, keys=[f"signer:requests:{device}"], windows=[self.window_s], amount=1
                )
            )
            if self.clock() >= self._next_sweep:
                self._next_sweep = self.clock() + SHARED_SWEEP_INTERVAL_S
                queries.access_rate_sweep(conn)
        return rows[0][1] <= self.burst

    def close(self) -> None:
        self._pool.close()
