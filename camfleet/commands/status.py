"""`camfleet status`: what the database holds, at a glance (seed 002's monitoring view)."""

from __future__ import annotations

import typer


def print_status(dsn: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from camfleet import db

    with db.transaction(dsn) as conn:
        devices, captures, stored, triggers, events, errors = db.queries.stack_counts(conn)
        recent = list(db.queries.recent_captures(conn))
        errs = list(db.queries.recent_errors(conn))
    console = Console()
    summary = Table(title="camfleet status", show_header=True)
    for column in ("devices", "captures", "stored", "triggers", "events", "errors"):
        summary.add_column(column, justify="right")
    summary.add_row(*(str(v) for v in (devices, captures, stored, triggers, events, errors)))
    console.print(summary)
    if recent:
        table = Table(title="recent captures")
        for column in ("device", "capture", "bytes", "status", "storage path", "created"):
            table.add_column(column)
        for device, capture, _at, size, _chunks, status, path, created in recent[:10]:
            table.add_row(device, capture or "", str(size or ""), status, path or "", str(created))
        console.print(table)
    if errs:
        table = Table(title="recent errors")
        for column in ("device", "capture", "code", "message", "when"):
            table.add_column(column)
        for device, capture, code, message, _details, when in errs[:10]:
            table.add_row(device or "", capture or "", str(code), message, str(when))
        console.print(table)


def status(block: str = typer.Option(None, help="camfleet-postgres block name")) -> None:
    """Counts of devices, captures, triggers, events and errors; recent captures and errors."""
    from camfleet import resolve

    print_status(resolve.database_url(block))


def register(app: typer.Typer, simulate: typer.Typer) -> None:
    app.command("status")(status)
    app.command("config")(config)


def config() -> None:
    """Every setting, its environment variable and its current value (secrets masked)."""
    from pydantic import SecretStr
    from rich.console import Console
    from rich.table import Table

    from camfleet.settings import Settings

    settings = Settings()
    table = Table(title="camfleet settings")
    for column in ("setting", "environment variable", "value"):
        table.add_column(column)
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        env = " / ".join(alias.choices) if hasattr(alias, "choices") else str(alias)
        value = getattr(settings, name)
        shown = "" if value is None else ("***" if isinstance(value, SecretStr) else str(value))
        table.add_row(name, env, shown)
    Console().print(table)
