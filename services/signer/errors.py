"""`device_errors` rows for what went wrong with a device's request or upload, throttled.

`DeviceErrors` is built with the pool it writes through and the clock its windows are
measured by; the grant-request and verification parts each get the signer's one
instance (one window per device, whoever records).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from camfleet import db

log = logging.getLogger("camfleet.signer")

# device_errors rows per device per minute: enough to diagnose a misbehaving device,
# few enough that one replaying garbage cannot fill the table. Devices tracked at once
# is bounded too (the window map is cleared when it grows past that).
MAX_ERRORS_PER_DEVICE_PER_MIN = 20
MAX_ERROR_WINDOWS = 10_000


class DeviceErrors:
    """Error rows per device, at most MAX_ERRORS_PER_DEVICE_PER_MIN a minute."""

    def __init__(self, pool: db.Pool, clock: Callable[[], float] = time.time) -> None:
        self.pool = pool
        self.clock = clock
        self._lock = threading.Lock()  # the request worker and verification jobs record
        self._windows: dict[str, tuple[int, int]] = {}

    def allowed(self, serial: str) -> bool:
        """Count one error row for `serial`; False once its minute's budget is spent."""
        minute = int(self.clock() // 60)
        with self._lock:
            if len(self._windows) > MAX_ERROR_WINDOWS:
                self._windows.clear()
            start, count = self._windows.get(serial, (minute, 0))
            if start != minute:
                start, count = minute, 0
            self._windows[serial] = (start, count + 1)
        return count < MAX_ERRORS_PER_DEVICE_PER_MIN

    def record(self, serial, capture_id, code, severity, message, details) -> None:
        """An error row in a transaction of its own (if the device's budget allows)."""
        if not self.allowed(serial):
            return
        try:
            with self.pool.connection() as conn:
                self.insert(conn, serial, capture_id, code, severity, message, details)
        except Exception as exc:
            log.warning("signer: could not record error %d: %s", code, type(exc).__name__)

    @staticmethod
    def insert(conn, serial, capture_id, code, severity, message, details) -> None:
        """An error row in the caller's transaction (the caller checked `allowed`)."""
        db.queries.edge_error_insert(
            conn,
            device_id=serial,
            capture_id=capture_id,
            error_code=code,
            severity=severity,
            message=message,
            details=details,
        )
