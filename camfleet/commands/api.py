"""`camfleet api`: the device HTTP API (pairing, uploads, ingest, commands)."""

from __future__ import annotations

import typer


def api(
    host: str = typer.Option(None, help="Bind address (default CAMFLEET_API_HOST, 127.0.0.1)"),
    port: int = typer.Option(None, help="Port (default CAMFLEET_API_PORT, 8000)"),
    log_level: str = typer.Option("info", help="uvicorn log level"),
    access_log: bool = typer.Option(True, help="Log each request (query strings stripped)"),
    secrets_block: str = typer.Option(None, help="camfleet-secrets block name"),
    database_block: str = typer.Option(None, help="camfleet-postgres block name"),
) -> None:
    """Serve the device API with uvicorn in one process."""
    from camfleet.settings import get_settings
    from services.api.server import serve

    settings = get_settings()
    try:
        serve(
            host=host or settings.api_host,
            port=port or settings.api_port,
            log_level=log_level,
            access_log=access_log,
            secrets_block=secrets_block,
            database_block=database_block,
        )
    except RuntimeError as exc:  # missing secret or database: say which, no traceback
        typer.echo(f"camfleet api: {exc}", err=True)
        raise typer.Exit(2) from None


def register(app: typer.Typer, simulate: typer.Typer) -> None:
    app.command("api")(api)
