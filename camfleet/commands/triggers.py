"""`camfleet triggers ...`: capture triggers from the command line (seed 003).

summary    the seed's check_test_results report: captures and triggers by state
create     a manual trigger (delivered by whichever API instance holds the stream)
configure  set a device's {"trigger": {...}} config (the seed's setup_test_device)
plan       materialise the next window of scheduled triggers once, without Prefect
sweep      end triggers whose time is up (pending -> expired, sent -> failed)
"""

from __future__ import annotations

import json

import typer

triggers_app = typer.Typer(help="Capture triggers: summary, manual triggers, schedules.")

LINE = "=" * 70


def _dsn(database_block: str | None) -> str:
    from camfleet import resolve

    try:
        return resolve.database_url(database_block)
    except RuntimeError as exc:
        typer.echo(f"camfleet triggers: {exc}", err=True)
        raise typer.Exit(2) from None


def render_summary(dsn: str, device_id: str | None, since_minutes: float | None) -> str:
    """The seed's check_test_results.py report, for one device or every triggered one."""
    from datetime import UTC, datetime, timedelta

    from camfleet import db
    from services.api.command_hub import STALE_SECONDS

    since = (
        datetime.now(UTC) - timedelta(minutes=since_minutes)
        if since_minutes
        else datetime(1970, 1, 1, tzinfo=UTC)
    )
    out = [LINE, "CLOUD-TRIGGERED CAMERA TEST RESULTS", LINE]
    with db.transaction(dsn) as conn:
        devices = list(
            db.queries.triggers_summary_devices(
                conn, device_id=device_id, stale_seconds=STALE_SECONDS
            )
        )
        if not devices:
            out += ["", f"No device {device_id}" if device_id else "No triggered devices", LINE]
            return "\n".join(out)
        for dev_id, status, last_seen, connected in devices:
            cap = db.queries.triggers_summary_captures(conn, device_id=dev_id, since=since)
            trg = db.queries.triggers_summary_triggers(conn, device_id=dev_id, since=since)
            c_total, c_pending, c_done, c_failed = cap
            t_total, manual, scheduled, pending, sent, executed, failed, expired, linked = trg
            seen = last_seen.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if last_seen else "never"
            out += [
                "",
                f"Device: {dev_id}",
                f"Status: {status}",
                f"Last Seen: {seen}",
                "",
                "[CAPTURES]",
                f"Total Captures: {c_total}",
                f"  - Pending Evaluation: {c_pending}",
                f"  - Evaluation Completed: {c_done}",
                f"  - Evaluation Failed: {c_failed}",
                "",
                "[TRIGGERS]",
                f"Total Triggers: {t_total}",
                f"  - Manual: {manual}",
                f"  - Scheduled: {scheduled}",
                f"  - Pending: {pending}",
                f"  - Sent: {sent}",
                f"  - Executed: {executed}",
                f"  - Failed: {failed}",
                f"  - Expired: {expired}",
                "",
            ]
            mark = "[OK]" if connected else "[!!]"
            state = "connected and active" if connected else f"not connected ({status})"
            out.append(f"{mark} Device {state}")
            out.append(f"{'[OK]' if c_total else '[!!]'} {c_total} captures uploaded successfully")
            out.append(f"[OK] {t_total} triggers tracked in database")
            ok = executed == sent
            out.append(f"{'[OK]' if ok else '[!!]'} {executed} triggers marked as executed")
            if failed or expired:
                out.append(f"[!!] {failed} failed, {expired} expired (see failed_reason)")
            evaluated = c_pending == 0
            out.append(
                "[OK] All captures are being evaluated"
                if evaluated
                else f"[..] {c_pending} captures waiting for evaluation"
            )
    out.append(LINE)
    return "\n".join(out)


@triggers_app.command("summary")
def summary(
    device_id: str = typer.Option(None, help="One device (default: every triggered device)"),
    since_minutes: float = typer.Option(None, help="Only the last N minutes"),
    database_block: str = typer.Option(None, help="camfleet-postgres block name"),
) -> None:
    """Captures and triggers by state, as the seed's check_test_results.py prints them."""
    typer.echo(render_summary(_dsn(database_block), device_id, since_minutes))


@triggers_app.command("create")
def create(
    device_id: str = typer.Argument(..., help="Device to capture"),
    ttl_seconds: float = typer.Option(300, help="Expire if not delivered within this long"),
    label: str = typer.Option("manual", help="Trigger label"),
    database_block: str = typer.Option(None, help="camfleet-postgres block name"),
) -> None:
    """Create a manual trigger; prints its id."""
    from tasks.triggers import create_manual

    try:
        typer.echo(create_manual(_dsn(database_block), device_id, ttl_seconds, label))
    except LookupError as exc:
        typer.echo(f"camfleet triggers: {exc}", err=True)
        raise typer.Exit(1) from None


@triggers_app.command("configure")
def configure(
    device_id: str = typer.Argument(..., help="Device to configure (created if missing)"),
    interval_seconds: int = typer.Option(None, help="Capture every N seconds"),
    cron: str = typer.Option(None, help='Cron expression, e.g. "*/5 * * * *"'),
    disable: bool = typer.Option(False, help="Disable scheduled captures"),
    transport: str = typer.Option("sse", help="sse or mqtt (commands on ESP32CAM/{id}/cmd)"),
    database_block: str = typer.Option(None, help="camfleet-postgres block name"),
) -> None:
    """Set a device's trigger config (validated as the scheduler will read it)."""
    from camfleet import db
    from camfleet.keys import BadName, safe_id
    from camfleet.protocol.triggers import BadTriggerConfig, parse_trigger_config

    section: dict = {"enabled": not disable}
    if interval_seconds is not None:
        section["interval_seconds"] = interval_seconds
    if cron:
        section["cron"] = cron
    if transport not in ("sse", "mqtt"):
        typer.echo("camfleet triggers: --transport must be sse or mqtt", err=True)
        raise typer.Exit(2)
    if transport != "sse":
        section["transport"] = transport
    try:
        safe_id(device_id)
        parse_trigger_config({"trigger": section})
    except (BadName, BadTriggerConfig) as exc:
        typer.echo(f"camfleet triggers: {exc}", err=True)
        raise typer.Exit(2) from None
    dsn = _dsn(database_block)
    with db.transaction(dsn) as conn:
        row = db.queries.triggers_device(conn, device_id=device_id)
        config = dict(row[4] or {}) if row else {}
        config["trigger"] = section
        if row is None:
            db.queries.triggers_create_device(
                conn, device_id=device_id, kind="visant", friendly_name=device_id, config=config
            )
        else:
            db.queries.triggers_set_device_config(conn, device_id=device_id, config=config)
    typer.echo(json.dumps({"device_id": device_id, "config": config}))


@triggers_app.command("plan")
def plan(
    window_seconds: int = typer.Option(120, help="Plan this far ahead"),
    database_block: str = typer.Option(None, help="camfleet-postgres block name"),
) -> None:
    """Materialise the next window of scheduled triggers once (what the flow does)."""
    from datetime import UTC, datetime, timedelta

    from tasks.triggers import insert_planned, plan_window

    dsn = _dsn(database_block)
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
    planned, refused = plan_window(dsn, start, start + timedelta(seconds=window_seconds))
    created = insert_planned(dsn, planned)
    for device_id, reason in sorted(refused.items()):
        typer.echo(f"refused config of {device_id}: {reason}", err=True)
    typer.echo(json.dumps({"planned": len(planned), "created": created}))


@triggers_app.command("sweep")
def sweep(
    execution_timeout: float = typer.Option(90, help="Seconds a sent trigger may wait"),
    database_block: str = typer.Option(None, help="camfleet-postgres block name"),
) -> None:
    """End triggers whose time is up."""
    from tasks.triggers import sweep as do_sweep

    result = do_sweep(_dsn(database_block), execution_timeout)
    typer.echo(json.dumps({k: len(v) for k, v in result.items()}))


def register(app: typer.Typer, simulate: typer.Typer) -> None:
    app.add_typer(triggers_app, name="triggers")
