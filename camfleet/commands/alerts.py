"""`camfleet alerts`: notification targets, the automations on them, incidents, a test.

camfleet alerts webhook URL [--name camfleet-alerts]   save a webhook block + automations
camfleet alerts slack URL                              the same with a Slack webhook
camfleet alerts setup                                  (re)create the automations
camfleet alerts list                                   automations, device and service incidents
camfleet alerts test                                   emit a test event -> notification
camfleet alerts check                                  run the fleet-health flow once
"""

from __future__ import annotations

import typer

alerts_app = typer.Typer(help="Fleet alerts through Prefect automations (docs/alerts.md).")


def _run(coro_fn):
    import anyio
    from prefect.client.orchestration import get_client

    async def run():
        async with get_client() as client:
            return await coro_fn(client)

    return anyio.run(run)


def _setup() -> list[str]:
    from deployments.alerts import ensure_alert_automations

    return _run(ensure_alert_automations)


@alerts_app.command("webhook")
def webhook(
    url: str = typer.Argument(..., help="Where to POST each alert as JSON {subject, body}."),
    name: str = typer.Option("camfleet-alerts", help="Block name (must start camfleet-alerts)."),
) -> None:
    """Save a webhook notification block and point the alert automations at it."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    from deployments.alerts import ALERT_BLOCK_PREFIX

    if not name.startswith(ALERT_BLOCK_PREFIX):
        raise typer.BadParameter(f"the name must start with {ALERT_BLOCK_PREFIX}")
    block = CustomWebhookNotificationBlock(
        name="camfleet alerts",
        url=url,
        method="POST",
        json_data={"subject": "{{subject}}", "body": "{{body}}"},
    )
    block.save(name, overwrite=True)
    typer.echo(f"saved webhook block {name}; automations changed: {_setup() or 'none'}")


@alerts_app.command("slack")
def slack(
    url: str = typer.Argument(..., help="The Slack incoming-webhook URL."),
    name: str = typer.Option("camfleet-alerts-slack", help="Block name."),
) -> None:
    """Save a Slack webhook block and point the alert automations at it."""
    from prefect.blocks.notifications import SlackWebhook

    SlackWebhook(url=url).save(name, overwrite=True)
    typer.echo(f"saved Slack block {name}; automations changed: {_setup() or 'none'}")


@alerts_app.command("setup")
def setup() -> None:
    """Create or update the alert automations for every camfleet-alerts* block."""
    changed = _setup()
    typer.echo("changed: " + ", ".join(changed) if changed else "alert automations up to date")


@alerts_app.command("list")
def list_alerts(
    block: str = typer.Option(None, help="camfleet-postgres block name"),
    recent: int = typer.Option(20, help="How many recent incidents to show."),
) -> None:
    """The alert automations (with their blocks) and the recent incidents."""
    from rich.console import Console
    from rich.table import Table

    from deployments.alerts import list_alert_automations

    console = Console()
    table = Table(title="alert automations")
    for column in ("name", "enabled", "event", "notification blocks"):
        table.add_column(column)
    for a in _run(list_alert_automations):
        blocks = ", ".join(
            str(x.block_document_id) for x in a.actions if hasattr(x, "block_document_id")
        )
        table.add_row(a.name, str(a.enabled), ", ".join(sorted(a.trigger.expect)), blocks)
    console.print(table)

    from camfleet import db, resolve

    try:
        dsn = resolve.database_url(block)
    except Exception as exc:  # noqa: BLE001 - no database configured: automations only
        console.print(f"incidents: no database ({type(exc).__name__})")
        return
    incidents = Table(title="recent incidents")
    for column in ("source", "name", "kind", "opened", "resolved"):
        incidents.add_column(column)
    with db.transaction(dsn) as conn:
        for row in recent_incidents(conn, recent):
            incidents.add_row(*row)
    console.print(incidents)


def recent_incidents(conn, limit: int) -> list[tuple[str, str, str, str, str]]:
    """Device and service incidents (migrations 0130, 0180), newest first, as shown:
    (source, device id or service name, kind, opened, resolved or "open")."""
    from camfleet import db

    return [
        (source, subject, kind, str(opened), str(resolved or "open"))
        for source, subject, kind, opened, resolved in db.queries.alerts_recent_incidents(
            conn, limit=limit
        )
    ]


@alerts_app.command("test")
def test() -> None:
    """Emit a camfleet.alerts.test event; every alert block should receive a notification."""
    from prefect.events.worker import EventsWorker

    from camfleet.alerts import emit_test

    event = emit_test()

    EventsWorker.drain_all()
    typer.echo(f"emitted {event.event if event else 'nothing (no Prefect API?)'}")


@alerts_app.command("check")
def check(block: str = typer.Option(None, help="camfleet-postgres block name")) -> None:
    """Run the fleet-health flow once (what the fleet-health deployment runs)."""
    from flows.fleet_health import fleet_health

    typer.echo(fleet_health(database_block=block))


def register(app: typer.Typer, simulate: typer.Typer) -> None:
    app.add_typer(alerts_app, name="alerts")
