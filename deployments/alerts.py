"""Prefect automations that turn camfleet's fleet events into notifications.

The fleet-health flow emits one event per incident transition (camfleet/alerts.py);
each automation here reacts to one event name and sends a notification through every
notification block whose name starts with ALERT_BLOCK_PREFIX ("camfleet-alerts"): a
webhook, Slack or email block the user saved (`camfleet alerts webhook URL`, or any
Prefect notification block saved under such a name in the UI).

`ensure_alert_automations(client)` creates what is missing and updates automations
whose blocks changed, so it is safe to call on every `camfleet up`.
"""

from __future__ import annotations

from camfleet import alerts
from deployments.automations import ensure_automation, run_against_server

ALERT_BLOCK_PREFIX = "camfleet-alerts"
AUTOMATION_PREFIX = "camfleet alert: "

_DEVICE = "{{ event.payload.name }} ({{ event.payload.kind }}, {{ event.payload.device_id }})"
# event name -> (automation name, subject, body); Jinja rendered by Prefect's server.
RULES = {
    alerts.SILENT: (
        "device silent",
        f"camfleet: {_DEVICE} is silent",
        "No contact since {{ event.payload.last_contact or 'ever' }}; it is expected every "
        "{{ event.payload.interval_seconds }} s. [camfleet.device.silent]",
    ),
    alerts.BACK: (
        "device back",
        f"camfleet: {_DEVICE} is back",
        "Last contact {{ event.payload.last_contact }}. [camfleet.device.back]",
    ),
    alerts.ERRORING: (
        "device erroring",
        f"camfleet: {_DEVICE} is erroring",
        "{{ event.payload.errors_last_hour }} errors and {{ event.payload.captures_last_hour }} "
        "captures in the last hour. [camfleet.device.erroring]",
    ),
    alerts.RECOVERED: (
        "device recovered",
        f"camfleet: {_DEVICE} recovered",
        "Errors are below captures again. [camfleet.device.recovered]",
    ),
    alerts.SERVICE_NOT_READY: (
        "service not ready",
        "camfleet: service {{ event.payload.service }} is not ready",
        "{{ event.payload.url }}: {{ event.payload.reason }} [camfleet.service.not-ready]",
    ),
    alerts.SERVICE_READY: (
        "service ready",
        "camfleet: service {{ event.payload.service }} is ready again",
        "{{ event.payload.url }} answers again. [camfleet.service.ready]",
    ),
    alerts.TEST: (
        "test",
        "camfleet: test alert",
        "{{ event.payload.note }} [camfleet.alerts.test]",
    ),
}


def automation_for(event: str, block_ids: list) -> object:
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    name, subject, body = RULES[event]
    return AutomationCore(
        name=AUTOMATION_PREFIX + name,
        description=f"Notifies on {event} (camfleet, docs/alerts.md).",
        trigger=EventTrigger(
            expect={event},
            match={"prefect.resource.id": "camfleet.*"},
            posture=Posture.Reactive,
            threshold=1,
            within=0,
        ),
        actions=[
            SendNotification(block_document_id=b, subject=subject, body=body) for b in block_ids
        ],
    )


async def alert_block_ids(client) -> list:
    """Saved notification blocks named camfleet-alerts*, oldest first."""
    docs = await client.read_block_documents()
    return [
        d.id
        for d in docs
        if d.name
        and d.name.startswith(ALERT_BLOCK_PREFIX)
        and "notify" in (d.block_schema.capabilities if d.block_schema else [])
    ]


async def ensure_alert_automations(client, block_ids: list | None = None) -> list[str]:
    """Create or update one automation per fleet event; returns the names changed.

    Without any alert block there is nobody to notify: nothing is created.
    """
    if block_ids is None:
        block_ids = await alert_block_ids(client)
    if not block_ids:
        return []
    blocks = {str(b) for b in block_ids}

    def notifies_these_blocks(existing) -> bool:
        # An alert block added or removed since: the automation is re-written.
        return blocks == {
            str(a.block_document_id) for a in existing.actions if hasattr(a, "block_document_id")
        }

    changed = []
    for event in RULES:
        wanted = automation_for(event, block_ids)
        if await ensure_automation(client, wanted, up_to_date=notifies_these_blocks):
            changed.append(wanted.name)
    return changed


async def list_alert_automations(client) -> list:
    return [a for a in await client.read_automations() if a.name.startswith(AUTOMATION_PREFIX)]


def main() -> None:
    run_against_server(ensure_alert_automations, "changed", "alert automations up to date")


if __name__ == "__main__":
    main()
