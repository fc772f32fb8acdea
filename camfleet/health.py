"""A device's health from its own schedule: ok, late, silent or erroring.

One definition shared by the web console (what a person sees) and the fleet-health
flow (what raises alerts), so the page and the notification never disagree.

- expected interval: the device's trigger interval, else its wake schedule, else a day;
- last contact: the later of `devices.last_seen_at` and its newest stored capture;
- late: no contact for longer than its interval plus a quarter (jitter is not news);
- silent: no contact for longer than SILENT_AFTER_INTERVALS intervals (or never);
- erroring: in contact, but its errors outnumber its captures in the window, with at
  least MIN_ERRORS errors (one bad frame is not an incident).
"""

from __future__ import annotations

from datetime import datetime

SILENT_AFTER_INTERVALS = 2  # as flows/fleet_report.py: two missed wake-ups
LATE_AFTER_INTERVALS = 1.25
DEFAULT_EXPECTED_INTERVAL_S = 24 * 3600
MIN_ERRORS = 3

OK, LATE, SILENT, ERRORING = "ok", "late", "silent", "erroring"
STATES = (OK, LATE, SILENT, ERRORING)


def expected_interval_s(interval_seconds: int | None) -> int:
    return (
        interval_seconds
        if interval_seconds and interval_seconds > 0
        else (DEFAULT_EXPECTED_INTERVAL_S)
    )


def last_contact(last_seen_at: datetime | None, latest_capture_at: datetime | None):
    seen = [t for t in (last_seen_at, latest_capture_at) if t is not None]
    return max(seen) if seen else None


def classify(
    now: datetime,
    interval_seconds: int | None,
    last_seen_at: datetime | None,
    latest_capture_at: datetime | None,
    errors: int = 0,
    captures: int = 0,
) -> str:
    interval = expected_interval_s(interval_seconds)
    contact = last_contact(last_seen_at, latest_capture_at)
    if contact is None:
        return SILENT
    age = (now - contact).total_seconds()
    if age > interval * SILENT_AFTER_INTERVALS:
        return SILENT
    if errors >= MIN_ERRORS and errors > captures:
        return ERRORING
    if age > interval * LATE_AFTER_INTERVALS:
        return LATE
    return OK
