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
        self._lock = threading.Lock()
        self.dropped = 0
        self.admitted_new = 0
        self._last_log = 0.0

    def load(self, device_ids) -> None:
        with self._lock:
            for d in device_ids:
                if len(self._known) < MAX_KNOWN:
                    self._known.add(d)

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
