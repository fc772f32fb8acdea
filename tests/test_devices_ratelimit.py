"""The rate limiter's storage: fixed windows that reset, swept memory, no threads."""

from __future__ import annotations

import threading

import limits
from limits.strategies import FixedWindowRateLimiter

from services.api import ratelimit
from services.api.ratelimit import LoopMemoryStorage


def test_fixed_window_counts_resets_and_sweeps(monkeypatch):
    now = [1_000_000.0]
    monkeypatch.setattr(ratelimit.time, "time", lambda: now[0])
    threads = threading.active_count()
    storage = LoopMemoryStorage()
    limiter = FixedWindowRateLimiter(storage)
    item = limits.parse("3/second")
    assert [limiter.hit(item, "device", "d1") for _ in range(4)] == [True, True, True, False]
    assert limiter.hit(item, "device", "d2")  # another key has its own window
    assert threading.active_count() == threads  # limits' MemoryStorage would start one
    now[0] += 1.01
    assert limiter.hit(item, "device", "d1")  # the window reset
    assert storage.get_expiry(limiter_key(item, "d1")) > now[0]
    now[0] += ratelimit.SWEEP_INTERVAL_S + 1
    limiter.hit(item, "device", "d3")  # triggers the sweep of expired counters
    assert set(storage._counts) == {limiter_key(item, "d3")}


def limiter_key(item, device: str) -> str:
    return item.key_for("device", device)
