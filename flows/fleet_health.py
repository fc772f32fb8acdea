"""fleet-health: find silent and erroring devices, record incidents, emit Prefect events.

Scheduled every FLEET_HEALTH_INTERVAL_S (prefect.yaml, deployment `fleet-health`). A
device is silent after two of its own intervals without contact, so the alert arrives
within 2x its schedule plus one run interval. Each transition (silent, back, erroring,
recovered) is one event; Prefect automations (deployments/alerts.py) notify on them.
Optionally checks services' readiness URLs and emits `camfleet.service.not-ready`.
"""

from __future__ import annotations

import httpx
from prefect import flow, get_run_logger

from camfleet import alerts, db, metrics, resolve

FLEET_HEALTH_INTERVAL_S = 60
READY_TIMEOUT_S = 5.0


def check_services(urls: dict[str, str]) -> list[str]:
    """Names of services whose readiness URL did not answer 2xx."""
    down = []
    for name, url in urls.items():
        try:
            ok = httpx.get(url, timeout=READY_TIMEOUT_S).is_success
            reason = "" if ok else "readiness answered an error"
        except httpx.HTTPError as exc:
            ok, reason = False, type(exc).__name__
        if not ok:
            alerts.emit_service_not_ready(name, reason)
            down.append(name)
    return down


@flow(name="fleet-health", log_prints=False)
def fleet_health(database_block: str | None = None, service_urls: dict | None = None) -> dict:
    log = get_run_logger()
    dsn = resolve.database_url(database_block)
    with db.transaction(dsn) as conn:
        transitions, counts = alerts.evaluate(conn)
    # Emitted after the commit: an event never announces an incident that rolled back.
    for t in transitions:
        alerts.emit(t)
        log.info("%s %s", t.event, t.device_id)
    for state, n in counts.items():
        metrics.FLEET_DEVICES.labels(state).set(n)
    down = check_services(service_urls or {})
    return {
        "transitions": [(t.event, t.device_id) for t in transitions],
        "health": counts,
        "services_down": down,
    }


if __name__ == "__main__":
    print(fleet_health())
