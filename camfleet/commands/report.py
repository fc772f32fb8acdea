"""`camfleet report`: the fleet report in the terminal (and as files / a flow run)."""

from __future__ import annotations

import typer


def report(
    days: int = typer.Option(7, help="How many days back."),
    out_dir: str = typer.Option(None, help="Write Parquet/CSV/PNG here as well."),
    flow_run: bool = typer.Option(
        False, "--flow-run", help="Run it as a Prefect flow run (artifacts in the UI)."
    ),
    block: str = typer.Option(None, help="camfleet-postgres block name"),
) -> None:
    """Captures, errors, NACKs and trigger outcomes per device and day; silent devices."""
    from datetime import UTC, datetime, timedelta
    from pathlib import Path

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from camfleet import resolve
    from flows import fleet_report as fr

    if flow_run:
        counts = fr.fleet_report(days=days, out_dir=out_dir, database_block=block)
        typer.echo(f"flow run finished: {counts}")
        return
    now = datetime.now(UTC)
    with Progress(transient=True) as progress:
        step = progress.add_task("reading the fleet's rows", total=3)
        raw = fr.read_rows(resolve.database_url(block), now - timedelta(days=days))
        progress.update(step, advance=1, description="summarising")
        tables = fr.build_report(raw, now)
        progress.update(step, advance=1, description="writing files")
        if out_dir:
            fr.write_files.fn(tables, Path(out_dir))
            fr.captures_per_hour_chart.fn(raw["captures"], Path(out_dir) / "captures_per_hour.png")
        progress.update(step, advance=1)
    console = Console()
    for name, frame in tables.items():
        table = Table(title=name.replace("_", " "))
        for column in frame.columns:
            table.add_column(column)
        for row in frame.head(50).iter_rows():
            table.add_row(*("" if v is None else str(v) for v in row))
        if frame.is_empty():
            table.add_row(*("-" for _ in frame.columns))
        console.print(table)
    if out_dir:
        console.print(f"files written to {out_dir}")


def register(app: typer.Typer, simulate: typer.Typer) -> None:
    app.command("report")(report)
