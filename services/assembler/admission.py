"""Which device ids the assembler listens to (`--unknown-devices`, `--new-device-*`).

Any MQTT client can publish on ``ESP32CAM/<anything>/data``; without a broker ACL a
script can invent thousands of device ids a second, and each would get assemblies,
early-chunk buffers, a `devices` row and error rows.  Policy for an id not yet in
`devices` (read at start, refreshed every KNOWN_REFRESH_S):

* ``register`` (default): admitted at a bounded rate, a token bucket of
  ``new_device_burst`` ids (200) refilled at ``new_device_per_min`` (60/min).  An
  admitted id is registered (`devices` row) by the row writer like any other.
* ``refuse``: only registered devices (``camfleet devices`` / the API) are heard.

Messages from ids not admitted are dropped before parsing: no row, no memory, only
the counters ``unknown_dropped`` and a log line at most every LOG_EVERY_S.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("camfleet.assembler")

NEW_DEVICE_BURST = 200
NEW_DEVICE_PER_MIN = 60
KNOWN_REFRESH_S = 30
LOG_EVERY_S = 10
# Ids remembered as admitted, at most (far beyond any fleet this process serves; an
# invented-id flood is bounded by the bucket long before).
MAX_KNOWN = 1_000_000


class DeviceAdmission:
    def __init__(
        self,
        policy: str = "register",
        burst: int = NEW_DEVICE_BURST,
        per_min: float = NEW_DEVICE_PER_MIN,
        clock=time.monotonic,
    ):
        if policy not in ("register", "refuse"):
            raise ValueError("unknown-devices policy is register or refuse")
        self.policy = policy
        self.burst = burst
        self.rate = per_min / 60.0
        self._clock = clock
        self._tokens = float(burst)
        self._t = clock()
        self._known: set[str] = set()
        self._unannounced: set[str] = set()  # admitted new here, `devices` row not asked for
        self._lock = threading.Lock()
        self.dropped = 0
        self.admitted_new = 0
        self._last_log = 0.0

    def load(self, device_ids) -> None:
        with self._lock:
            for d in device_ids:
                if len(self._known) < MAX_KNOWN:
                    self._known.add(d)

    def known(self) -> frozenset[str]:
        """Every id registered or admitted so far (replicas subscribe to their data)."""
        with self._lock:
            return frozenset(self._known)

    def first_sight(self, device_id: str) -> bool:
        """True once for an id this process admitted as new (not loaded from `devices`):
        a replica that does not serve the device still has its row written, so that the
        replica that does learns it even if it missed the device's status."""
        if device_id not in self._unannounced:  # set lookup: the hot path
            return False
        with self._lock:
            if device_id in self._unannounced:
                self._unannounced.discard(device_id)
                return True
            return False

    def admit(self, device_id: str) -> bool:
        if device_id in self._known:  # set lookup: no lock needed for the hot path
            return True
        with self._lock:
            if device_id in self._known:
                return True
            if self.policy == "register" and len(self._known) < MAX_KNOWN:
                now = self._clock()
                self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate)
                self._t = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    self._known.add(device_id)
                    self._unannounced.add(device_id)
                    self.admitted_new += 1
                    return True
            self.dropped += 1
            now = self._clock()
            if now - self._last_log >= LOG_EVERY_S:
                self._last_log = now
                log.warning(
                    "device %s not admitted (unknown-devices=%s); %d messages from "
                    "unadmitted ids dropped so far",
                    device_id,
                    self.policy,
                    self.dropped,
                )
            return False


# Rows one device may cause per kind: (burst, per minute).  A real device sends a status
# and an image (45 chunks, up to 4,096 for a 4 MiB image) per wake-up; a device (or a
# stolen credential) looping on publish must not fill the tables for everyone.  Rows
# beyond the quota are dropped and counted (stats["rows_over_quota"]).
ROW_QUOTAS = {
    "status": (120, 60.0),
    "error": (300, 120.0),
    "log": (10_000, 10_000.0),
}


class RowQuota:
    """Per-device token buckets for the rows a device's messages create (worker thread
    only: no lock)."""

    def __init__(self, quotas: dict[str, tuple[int, float]] = ROW_QUOTAS, clock=time.monotonic):
        self.quotas = quotas
        self._clock = clock
        self._buckets: dict[tuple[str, str], list[float]] = {}
        self.over = 0

    def allow(self, kind: str, device_id: str | None) -> bool:
        q = self.quotas.get(kind)
        if q is None or device_id is None:
            return True
        burst, per_min = q
        now = self._clock()
        b = self._buckets.get((kind, device_id))
        if b is None:
            if len(self._buckets) >= MAX_KNOWN:
                self._buckets.clear()  # bounded; a reset only grants a fresh burst
            b = self._buckets[(kind, device_id)] = [float(burst), now]
        b[0] = min(burst, b[0] + (now - b[1]) * per_min / 60.0)
        b[1] = now
        if b[0] >= 1:
            b[0] -= 1
            return True
        self.over += 1
        return False
