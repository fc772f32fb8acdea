"""Wait until the services `camfleet up` started can serve a device.

"camfleet is up" means a device sending right then is served: every service answers its
readiness URL with 200, and when the assembler runs as replicas, every device partition
is held by one of them and their data subscriptions are acknowledged.  Replicas share
the partitions out within a lease round or two after starting (services/assembler/
partitions.py); an image sent meanwhile by a device of an unheld partition reaches
nobody and waits for the device's resend, so the banner waits for it instead.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable

READY_TIMEOUT_S = 180.0
POLL_S = 0.25


def probe(url: str, timeout: float = 2.0) -> dict | None:
    """The JSON body of a 200 answer (``{}`` when it is not JSON); None when not ready."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback
            raw = resp.read(65536)
    except (OSError, urllib.error.URLError, ValueError):
        return None  # refused, 503, timed out: not ready (yet)
    try:
        body = json.loads(raw)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def partitions_settled(bodies: list[dict]) -> bool:
    """Leasing assembler replicas hold every partition between them, each at least its
    floor share, with no subscription still waiting for the broker's SUBACK."""
    parts = [b["partitions"] for b in bodies if isinstance(b.get("partitions"), dict)]
    if not parts:
        return True  # a single assembler subscribes to every device's topics itself
    total = parts[0].get("partitions", 0)
    floor = total // len(parts)
    return (
        sum(p.get("owned_count", 0) for p in parts) == total
        and all(p.get("owned_count", 0) >= floor for p in parts)
        and all(p.get("subscribe_pending", 0) == 0 for p in parts)
    )


def wait_ready(
    urls: dict[str, str],
    *,
    tick: Callable[[], None] = lambda: None,
    timeout: float = READY_TIMEOUT_S,
) -> list[str]:
    """Poll every readiness URL until all are ready (and partitions settled) or the
    timeout passes; ``tick`` runs between polls (the supervisor restarts crashed
    children there).  Returns the names still not ready ([] when all are)."""
    deadline = time.monotonic() + timeout
    while True:
        bodies = {name: probe(url) for name, url in urls.items()}
        waiting = [name for name, body in bodies.items() if body is None]
        assemblers = [b for n, b in bodies.items() if n.startswith("assembler") and b]
        if not waiting and not partitions_settled(assemblers):
            waiting = ["assembler partitions"]
        if not waiting or time.monotonic() >= deadline:
            return waiting
        tick()
        time.sleep(POLL_S)
