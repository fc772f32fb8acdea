"""`camfleet uploader run|once|serve|save-blocks` and `camfleet simulate events`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

uploader_app = typer.Typer(
    help="Seed 001 event upload: pending_upload/ -> SFTP + PostgreSQL -> uploaded/."
)

CONFIG = typer.Option(
    "config.json", "--config", "-c", help='The seed\'s config file ({"uploader": {...}}).'
)
SFTP_BLOCK = typer.Option(None, help="Saved camfleet-sftp-server block instead of `sftp`.")
DB_BLOCK = typer.Option(None, help="Saved camfleet-postgres block instead of `database`.")


def _config(path: str, sftp_block: str | None, database_block: str | None):
    from flows.event_upload import load_config

    try:
        return load_config(path, sftp_block, database_block)
    except FileNotFoundError:
        raise typer.BadParameter(f"no config file at {path}", param_hint="--config") from None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from None


def _logging() -> None:
    import logging

    from camfleet.settings import get_settings

    logging.basicConfig(
        level=get_settings().log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per SFTP channel and per Prefect API request: noise at INFO.
    for noisy in ("paramiko", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@uploader_app.command("run")
def run(config: str = CONFIG, sftp_block: str = SFTP_BLOCK, database_block: str = DB_BLOCK) -> None:
    """The seed's main loop: scan, upload each event, sleep scan_interval_seconds. Ctrl-C stops."""
    import signal

    from camfleet.uploader import DataUploader

    _logging()
    uploader = DataUploader(_config(config, sftp_block, database_block))
    signal.signal(signal.SIGTERM, lambda *_: uploader.stop())
    try:
        uploader.run()
    except KeyboardInterrupt:
        uploader.stop()


@uploader_app.command("once")
def once(
    config: str = CONFIG,
    sftp_block: str = SFTP_BLOCK,
    database_block: str = DB_BLOCK,
    flow: bool = typer.Option(
        False,
        help="Run it as the Prefect flow (artifacts, retries); needs a Prefect server "
        "(PREFECT_API_URL), never starts a temporary one.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """One scan-and-upload pass; exit code 1 if any event failed (it is left in place)."""
    from camfleet.commands import prefect_mode

    _logging()
    cfg = _config(config, sftp_block, database_block)
    try:
        url = prefect_mode.use_prefect(flow or False, "camfleet uploader once --flow")
    except prefect_mode.NoPrefectApi as exc:
        raise prefect_mode.refuse(exc) from None
    if url:
        import asyncio

        from flows.event_upload import event_upload

        with prefect_mode.reporting_to(url):
            state = asyncio.run(event_upload(config, sftp_block, database_block, return_state=True))
        summary = state.result(raise_on_failure=False)
        counts = summary.get("counts", {}) if isinstance(summary, dict) else {}
        rows: list = []
        ok = state.is_completed()
        if not ok:
            typer.echo(state.message, err=True)
    else:
        from camfleet.uploader import DataUploader

        uploader = DataUploader(cfg)
        try:
            report = uploader.run_once()
        finally:
            uploader.close()
        counts, rows, ok = report.counts, report.rows, report.count("failed") == 0
    if as_json:
        typer.echo(json.dumps({"counts": counts, "events": rows}, indent=2))
    else:
        for row in rows:
            reason = f"  {row['reason']}" if row["reason"] else ""
            typer.echo(f"{row['event']:<40} {row['state']:<18}{reason}")
        typer.echo(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "nothing to do")
    raise typer.Exit(0 if ok else 1)


@uploader_app.command("serve")
def serve(
    config: str = CONFIG,
    sftp_block: str = SFTP_BLOCK,
    database_block: str = DB_BLOCK,
    interval: int = typer.Option(None, help="Seconds between runs (default: the config's)."),
) -> None:
    """Serve the event-upload deployment every scan_interval_seconds (Prefect server needed)."""
    from camfleet.commands import prefect_mode

    _config(config, sftp_block, database_block)  # refuse a bad config before serving
    try:
        url = prefect_mode.require_api("camfleet uploader serve")
    except prefect_mode.NoPrefectApi as exc:
        raise prefect_mode.refuse(exc) from None
    with prefect_mode.reporting_to(url):
        from deployments.event_upload import serve as serve_deployment

        serve_deployment(
            str(Path(config).resolve()),
            sftp_block=sftp_block,
            database_block=database_block,
            interval=interval,
        )


@uploader_app.command("save-blocks")
def save_blocks(
    config: str = CONFIG,
    name: str = typer.Option("default", help="Name to save both blocks under."),
    overwrite: bool = typer.Option(True, help="Replace blocks of the same name."),
) -> None:
    """Save the config's `sftp` and `database` sections as Prefect blocks."""
    from blocks.postgres import PostgresDatabase
    from blocks.sftp import SftpServer

    cfg = _config(config, None, None)
    # The config's sections are plain models (camfleet.targets); the blocks have the
    # same fields, so each section becomes its block as it is.
    if cfg.sftp is not None:
        SftpServer(**dict(cfg.sftp)).save(name, overwrite=overwrite)
        typer.echo(f"saved camfleet-sftp-server/{name} ({cfg.sftp.describe()})")
    if cfg.database is not None:
        PostgresDatabase(**dict(cfg.database)).save(name, overwrite=overwrite)
        typer.echo(f"saved camfleet-postgres/{name} ({cfg.database.describe()})")
    typer.echo(f"use them with --sftp-block {name} --database-block {name}")


def simulate_events(
    directory: str = typer.Option("data/pending_upload", "--dir", help="pending_upload dir."),
    count: int = typer.Option(10, min=1, max=100_000),
    video_bytes: int = typer.Option(50_000, min=1, max=2**31),
    prefix: str = typer.Option("evt", help="Event id prefix."),
) -> None:
    """Write event packages (video first, then JSON) as the analyzer would."""
    from camfleet.keys import BadName, safe_id
    from camfleet.uploader.simulate import write_events

    try:
        safe_id(prefix + "0", "event id prefix")
    except BadName as exc:
        raise typer.BadParameter(str(exc), param_hint="--prefix") from None
    ids = write_events(directory, count, video_bytes, prefix=prefix)
    typer.echo(f"wrote {len(ids)} events to {directory} ({ids[0]} .. {ids[-1]})")


def register(app: typer.Typer, simulate: typer.Typer) -> None:
    app.add_typer(uploader_app, name="uploader")
    simulate.command("events")(simulate_events)
