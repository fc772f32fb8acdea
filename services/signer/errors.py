"""`device_errors` rows for what went wrong with a device's request or upload, throttled.

`DeviceErrors` is a part of `Signer` (services/signer/__init__.py): it uses the
signer's pool, clock and lock.
"""

from __future__ import annotations

import logging

from camfleet import db

log = logging.getLogger("camfleet.signer")

# device_errors rows per device per minute: enough to diagnose a misbehaving device,
# few enough that one replaying garbage cannot fill the table. Devices tracked at once
# is bounded too (the window map is cleared when it grows past that).
MAX_ERRORS_PER_DEVICE_PER_MIN = 20
MAX_ERROR_WINDOWS = 10_000


class DeviceErrors:
    """Error rows per device, at most MAX_ERRORS_PER_DEVICE_PER_MIN a minute."""

    def _error_allowed(self, serial: str) -> bool:
        minute = int(self.clock() // 60)
        with self._lock:
            if len(self._error_windows) > MAX_ERROR_WINDOWS:
                self._error_windows.clear()
            start, count = self._error_windows.get(serial, (minute, 0))
            if start != minute:
                start, count = minute, 0
            self._error_windows[serial] = (start, count + 1)
        return count < MAX_ERRORS_PER_DEVICE_PER_MIN

    def _record_error(self, serial, capture_id, code, severity, message, details) -> None:
        if not self._error_allowed(serial):
            return
        try:
            with self.pool.connection() as conn:
                self._insert_error(conn, serial, capture_id, code, severity, message, details)
        except Exception as exc:
            log.warning("signer: could not record error %d: %s", code, type(exc).__name__)

    @staticmethod
    def _insert_error(conn, serial, capture_id, code, severity, message, details) -> None:
        db.queries.edge_error_insert(
            conn,
            device_id=serial,
            capture_id=capture_id,
            error_code=code,
            severity=severity,
            message=message,
            details=details,
        )
