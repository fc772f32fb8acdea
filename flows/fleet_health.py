"""fleet-health: find silent and erroring devices, record incidents, emit Prefect events.

Scheduled every FLEET_HEALTH_INTERVAL_S (prefect.yaml, deployment `fleet-health`). A
device is silent after two of its own intervals without contact, so the alert arrives
within 2x its schedule plus one run interval. Each transition (silent, back, erroring,
recovered) is one event; Prefect automations (deployments/alerts.py) notify on them.

It also checks services' readiness URLs: `service_urls` when given, else the services
`camfleet up` started (it hands their URLs to its children in CAMFLEET_SERVICE_URLS
and records them in stack.json). A service that fails CHECK_ATTEMPTS checks in a row
opens an incident (`camfleet.service.not-ready`), resolved by `camfleet.service.ready`.
"""

from __future__ import annotations

import json
import time
from urllib.parse import urlsplit, urlunsplit

import httpx
from prefect import flow, get_run_logger

from camfleet import alerts, db, metrics, resolve
from camfleet.settings import Settings

FLEET_HEALTH_INTERVAL_S = 60
READY_TIMEOUT_S = 5.0
# A service starting (or a GC pause) is not an incident: it must fail this many checks,
# CHECK_RETRY_S apart, within one run.
CHECK_ATTEMPTS = 3
CHECK_RETRY_S = 5.0
SERVICE_URLS_ENV = "CAMFLEET_SERVICE_URLS"


def default_service_urls() -> dict[str, str]:
    """The readiness URLs of the services `camfleet up` started (name -> URL): the
    setting CAMFLEET_SERVICE_URLS (a JSON object; from the environment, else from the
    running stack's stack.json, camfleet/settings.py), read afresh at each run: the
    stack may have been restarted on other ports since this worker started.
    Without either (deployments served elsewhere), none: pass `service_urls`."""
    raw = Settings().service_urls
    try:
        urls = json.loads(raw) if raw else {}
    except ValueError:
        urls = None
    if not isinstance(urls, dict):
        raise ValueError(f"{SERVICE_URLS_ENV} must be a JSON object of name -> readiness URL")
    return {str(name): str(url) for name, url in urls.items()}


def _shown(url: str) -> str:
    """A URL as it may appear in an event: no credentials, no query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def not_ready(url: str) -> str | None:
    """Why a readiness URL is not ready, or None when it answered 2xx."""
    try:
        status = httpx.get(url, timeout=READY_TIMEOUT_S).status_code
    except httpx.HTTPError as exc:
        return type(exc).__name__
    return None if 200 <= status < 300 else f"readiness answered {status}"


def check_services(urls: dict[str, str], retry_s: float | None = None) -> dict[str, str]:
    """The services that failed every one of CHECK_ATTEMPTS checks: name -> reason."""
    retry_s = CHECK_RETRY_S if retry_s is None else retry_s
    failing = dict(urls)
    reasons: dict[str, str] = {}
    for attempt in range(CHECK_ATTEMPTS):
        if attempt:
            time.sleep(retry_s)
        reasons = {n: r for n, u in failing.items() if (r := not_ready(u)) is not None}
        failing = {n: failing[n] for n in reasons}
        if not failing:
            break
    return reasons


@flow(name="fleet-health", log_prints=False)
def fleet_health(database_block: str | None = None, service_urls: dict | None = None) -> dict:
    log = get_run_logger()
    dsn = resolve.database_url(database_block)
    urls = service_urls
    if urls is None:
        try:
            urls = default_service_urls()
        except ValueError as exc:  # a bad setting must not stop the device alerts
            log.warning("no service checks: %s", exc)
            urls = {}
    down = check_services(urls) if urls else {}
    with db.transaction(dsn) as conn:
        transitions, counts = alerts.evaluate(conn)
        if urls:
            shown = {name: _shown(url) for name, url in urls.items()}
            transitions += alerts.evaluate_services(conn, shown, down)
    # Emitted after the commit: an event never announces an incident that rolled back.
    for t in transitions:
        alerts.emit(t)
        log.info("%s %s", t.event, t.device_id)
    for state, n in counts.items():
        metrics.FLEET_DEVICES.labels(state).set(n)
    return {
        "transitions": [(t.event, t.device_id) for t in transitions],
        "health": counts,
        "services_checked": sorted(urls),
        "services_down": sorted(down),
    }


if __name__ == "__main__":
    print(fleet_health())
