"""Fleet alerts: incidents in `device_alerts`, announced as Prefect events.

The fleet-health flow (flows/fleet_health.py) calls `evaluate` on a schedule. A device
that turns silent (no contact for SILENT_AFTER_INTERVALS of its own intervals) or
erroring (camfleet/health.py) opens an incident; when it is back, the incident is
resolved. Only transitions produce events, and the database's partial unique index
(one open incident per device and kind) makes "fires once per incident" hold even for
overlapping runs. Prefect automations (deployments/alerts.py) turn the events into
notifications through the user's notification blocks.

Services are incidents too (`service_alerts`, migration 0180): `evaluate_services`
opens one when a readiness check fails and resolves it when the service answers again.

Events (resource id `camfleet.device.<device_id>`, payload with device_id, kind, name,
interval_seconds, last_contact):

    camfleet.device.silent / camfleet.device.back
    camfleet.device.erroring / camfleet.device.recovered
    camfleet.service.not-ready / camfleet.service.ready  (resource `camfleet.service.<name>`,
                                                          payload service, url, reason)
    camfleet.alerts.test        (`camfleet alerts test`)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from camfleet import db, health

SILENT, BACK = "camfleet.device.silent", "camfleet.device.back"
ERRORING, RECOVERED = "camfleet.device.erroring", "camfleet.device.recovered"
SERVICE_NOT_READY, SERVICE_READY = "camfleet.service.not-ready", "camfleet.service.ready"
TEST = "camfleet.alerts.test"
# Errors are counted over this window for the "erroring" state.
ERROR_WINDOW = timedelta(hours=1)


@dataclass(frozen=True)
class Transition:
    event: str
    device_id: str  # for a service event: the service's name
    payload: dict = field(default_factory=dict)
    resource: str = "device"  # the event's resource is camfleet.<resource>.<device_id>


def evaluate(conn, now: datetime | None = None) -> tuple[list[Transition], dict[str, int]]:
    """Open and resolve incidents in one transaction; returns the transitions made and
    the count of devices per health state (for the fleet gauge)."""
    now = now or datetime.now(UTC)
    q = db.queries
    open_now = {(r[1], r[2]) for r in q.alerts_open(conn)}
    transitions: list[Transition] = []
    counts = dict.fromkeys(health.STATES, 0)
    for row in q.alerts_device_activity(conn, since=now - ERROR_WINDOW):
        (device_id, kind, name, _user, last_seen, interval, latest_capture, captures, errors) = row
        state = health.classify(now, interval, last_seen, latest_capture, errors, captures)
        counts[state] += 1
        contact = health.last_contact(last_seen, latest_capture)
        payload = {
            "device_id": device_id,
            "kind": kind,
            "name": name or device_id,
            "interval_seconds": health.expected_interval_s(interval),
            "last_contact": contact.isoformat() if contact else None,
            "errors_last_hour": errors,
            "captures_last_hour": captures,
        }
        silent = state == health.SILENT
        # A silent device says nothing about its errors: its erroring incident stays as is.
        wanted = {"silent": silent, "erroring": None if silent else state == health.ERRORING}
        for incident, on in wanted.items():
            is_open = (device_id, incident) in open_now
            if on and not is_open:
                opened = q.alerts_open_incident(
                    conn, device_id=device_id, kind=incident, details=payload
                )
                if opened:  # None: a concurrent run opened it first
                    event = SILENT if incident == "silent" else ERRORING
                    transitions.append(Transition(event, device_id, payload))
            elif on is False and is_open:
                resolved = q.alerts_resolve_incident(conn, device_id=device_id, kind=incident)
                if resolved:
                    event = BACK if incident == "silent" else RECOVERED
                    transitions.append(Transition(event, device_id, payload))
    return transitions, counts


def evaluate_services(conn, checked: dict[str, str], down: dict[str, str]) -> list[Transition]:
    """Open an incident for each checked service (name -> URL as shown) that is `down`
    (name -> reason) and resolve the open incidents of checked services that answered.
    A service no longer checked keeps its incident as it is: nobody looked."""
    q = db.queries
    open_now = {r[0] for r in q.alerts_open_services(conn)}
    transitions = []
    for service, url in checked.items():
        details = {"service": service, "url": url, "reason": down.get(service, "")[:500]}
        if service in down and service not in open_now:
            if q.alerts_open_service_incident(conn, service=service, details=details):
                transitions.append(Transition(SERVICE_NOT_READY, service, details, "service"))
        elif service not in down and service in open_now:
            if q.alerts_resolve_service_incident(conn, service=service):
                transitions.append(Transition(SERVICE_READY, service, details, "service"))
    return transitions


def emit(transition: Transition):
    """The Prefect event of one transition (buffered and sent by Prefect's client)."""
    from prefect.events import emit_event

    resource = {
        "prefect.resource.id": f"camfleet.{transition.resource}.{transition.device_id}",
        "prefect.resource.name": str(transition.payload.get("name", transition.device_id)),
    }
    if transition.resource == "device":
        resource["camfleet.device.kind"] = str(transition.payload.get("kind", ""))
    return emit_event(event=transition.event, resource=resource, payload=transition.payload)


def emit_test(note: str = "camfleet alerts test"):
    from prefect.events import emit_event

    return emit_event(
        event=TEST,
        resource={"prefect.resource.id": "camfleet.alerts"},
        payload={"note": note[:200]},
    )
