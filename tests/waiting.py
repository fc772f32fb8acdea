"""Polling helper shared by the fault suites (the services they watch have no events)."""

from __future__ import annotations

import time


def wait_until(fn, timeout: float, step: float = 0.1):
    """fn's first truthy value within `timeout` seconds, polled every `step`; else fn()."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := fn():
            return value
        time.sleep(step)
    return fn()
