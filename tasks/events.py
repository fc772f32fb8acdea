"""Prefect events for what happens in the fleet, so users can build automations on them.

Every event names the device as its resource (`camfleet.device.<device_id>`), so an
automation can match one camera, a label, or all of them. Events are batched: one per
device and kind per call, carrying a count and the first ids, never one per capture,
so a busy fleet does not flood the Prefect server.

Event names (docs/event-upload.md lists them with their payloads):

    camfleet.capture.stored / camfleet.capture.failed      Lifelog verification
    camfleet.capture.evaluation-failed                     unreadable or undecodable image
    camfleet.trigger.expired / camfleet.trigger.failed     sweep of triggers whose time is up
    camfleet.device.silent                                 fleet report: no contact for too long
    camfleet.event-upload.uploaded / .failed               seed 001 event packages (resource:
                                                           the uploading host)

Emitting never fails the caller: a Prefect server that is down costs the events, not
the work they describe.
"""

from __future__ import annotations

import logging
import socket
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("camfleet.events")

# Ids listed per event; the count is always exact.
MAX_IDS_PER_EVENT = 50
# Devices per call: beyond this, one summary event names how many were left out.
MAX_EVENTS_PER_CALL = 1000
# Prefect resource ids are free text; a hostile device id must not make them huge.
MAX_ID_CHARS = 200


def device_resource(device_id: Any) -> dict[str, str]:
    device = str(device_id)[:MAX_ID_CHARS]
    return {
        "prefect.resource.id": f"camfleet.device.{device}",
        "prefect.resource.name": device,
        "camfleet.device_id": device,
    }


def _emit(event: str, resource: dict[str, str], payload: dict[str, Any]) -> bool:
    from prefect.events import emit_event

    try:
        return emit_event(event, resource=resource, payload=payload) is not None
    except Exception as exc:  # events are best effort; the work itself is recorded
        log.warning("event %s not emitted: %s", event, type(exc).__name__)
        return False


def emit_per_device(
    event: str, items: Iterable[tuple[Any, Any]], payload: dict[str, Any] | None = None
) -> int:
    """One `event` per device for (device_id, item_id) pairs; returns events emitted."""
    by_device: dict[str, list[str]] = defaultdict(list)
    for device_id, item_id in items:
        by_device[str(device_id)[:MAX_ID_CHARS]].append(str(item_id)[:MAX_ID_CHARS])
    emitted = 0
    devices = sorted(by_device)
    for device in devices[:MAX_EVENTS_PER_CALL]:
        ids = by_device[device]
        body = {**(payload or {}), "count": len(ids), "ids": ids[:MAX_IDS_PER_EVENT]}
        emitted += _emit(event, device_resource(device), body)
    if len(devices) > MAX_EVENTS_PER_CALL:
        left = devices[MAX_EVENTS_PER_CALL:]
        emitted += _emit(
            event,
            {"prefect.resource.id": "camfleet.fleet", "prefect.resource.name": "camfleet"},
            {"devices_not_listed": len(left), "count": sum(len(by_device[d]) for d in left)},
        )
    return emitted


def emit_for_host(event: str, payload: dict[str, Any]) -> bool:
    """An event about this machine's work (the event uploader runs per host)."""
    host = socket.gethostname()[:MAX_ID_CHARS]
    resource = {"prefect.resource.id": f"camfleet.host.{host}", "prefect.resource.name": host}
    return _emit(event, resource, payload)
