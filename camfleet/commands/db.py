"""`camfleet db migrate|status`: the schema under sql/migrations."""

from __future__ import annotations

import typer

db_app = typer.Typer(help="Database schema: apply migrations, show what is pending.")


@db_app.command("migrate")
def migrate(block: str = typer.Option(None, help="camfleet-postgres block name")) -> None:
    """Apply pending migrations (idempotent)."""
    from camfleet import db, resolve

    applied = db.migrate(resolve.database_url(block))
    typer.echo(f"applied: {', '.join(applied)}" if applied else "schema is up to date")


@db_app.command("status")
def status(block: str = typer.Option(None, help="camfleet-postgres block name")) -> None:
    """Show pending migrations."""
    from camfleet import db, resolve

    pending = db.pending_migrations(resolve.database_url(block))
    typer.echo(f"pending: {', '.join(pending)}" if pending else "schema is up to date")


def register(app: typer.Typer, simulate: typer.Typer) -> None:
    app.add_typer(db_app, name="db")
