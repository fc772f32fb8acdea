"""`camfleet up`: the whole stack on one machine, with embedded defaults."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import time

import typer

# (name, CLI module that must exist, argv after `camfleet`)
SERVICES = [
    ("assembler", "camfleet.commands.assembler", ["assembler"]),
    ("api", "camfleet.commands.api", ["api", "--host", "{api_host}", "--port", "{api_port}"]),
    ("signer", "camfleet.commands.signer", ["signer"]),
]
DEPLOYMENTS = ("deployments", "deployments.serve", None)
DEMO = [("demo", "camfleet.demo", None)]


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def up(
    demo: bool = typer.Option(False, help="Also run simulated devices of every kind."),
    api_port: int = typer.Option(8000, help="Port of the device API."),
    prefect_port: int = typer.Option(4200, help="Port of the local Prefect server/UI."),
    check: bool = typer.Option(
        False, help="Bring up databases and broker, print the status, and exit."
    ),
) -> None:
    """Start everything: Prefect server, migrations, blocks, deployments, services."""
    from camfleet.settings import get_settings
    from camfleet.stack import LocalStack, StackError
    from camfleet.supervisor import Supervisor
    from deployments.automations import HEARTBEAT_S

    settings = get_settings()
    stack = LocalStack(settings, prefect_port=prefect_port)
    # Ctrl-C (even when started from a shell that ignores SIGINT in the background) and
    # SIGTERM both stop what was started, including while infrastructure starts.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    supervisor = Supervisor(settings.data_dir.resolve() / "logs")
    try:
        try:
            stack.start(prefect=not check)
        except StackError as exc:
            typer.secho(f"camfleet up: {exc}", fg="red", err=True)
            raise typer.Exit(2) from None
        public_url = settings.public_url or f"http://{settings.api_host}:{api_port}"
        env = {**stack.env, "CAMFLEET_PUBLIC_URL": public_url}
        # Flow runs send heartbeats, so the zombie automation can crash dead ones.
        if "PREFECT_FLOWS_HEARTBEAT_FREQUENCY" not in os.environ:
            env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = str(HEARTBEAT_S)
        if not check:
            _register_blocks(env)
            fmt = {"api_host": settings.api_host, "api_port": str(api_port)}
            planned = SERVICES + [DEPLOYMENTS] + (DEMO if demo else [])
            for name, module, args in planned:
                if not _available(module):
                    continue
                if args is None:
                    argv = [sys.executable, "-m", module]
                else:
                    argv = [sys.executable, "-m", "camfleet.cli", *[a.format(**fmt) for a in args]]
                supervisor.start(name, argv, env)
            stack.lines.append(("device API", f"{public_url}  (docs: {public_url}/docs)"))
            stack.lines.append(("logs", str(supervisor.log_dir)))
        _banner(stack, supervisor)
        if check:
            _print_status(stack.dsn)
            return
        typer.echo("camfleet is up. Ctrl-C stops everything.")
        while True:
            for line in supervisor.poll():
                typer.echo(line)
            time.sleep(1.0)
    except KeyboardInterrupt:
        typer.echo("\nstopping...")
    finally:
        supervisor.stop_all()
        stack.stop()
        typer.echo("stopped.")


def _register_blocks(env: dict[str, str]) -> None:
    """Block types, plus `default` blocks for what this stack runs (none hold a default secret)."""
    import os

    os.environ.update(env)
    from camfleet.commands.blocks import blocks_from_env
    from camfleet.settings import get_settings

    get_settings.cache_clear()
    import blocks

    for name in blocks.__all__:
        getattr(blocks, name).register_type_and_schema()
    for block in blocks_from_env().values():
        block.save("default", overwrite=True)
    _ensure_automations()


def _ensure_automations() -> None:
    """Crash detection for runs whose process died (deployments/automations.py)."""
    import anyio
    from prefect.client.orchestration import get_client

    from deployments.automations import ensure_automations

    async def run() -> None:
        async with get_client() as client:
            await ensure_automations(client)

    anyio.run(run)


def _banner(stack, supervisor) -> None:
    typer.echo("=" * 64)
    typer.echo("camfleet - camera fleet ingestion")
    typer.echo("=" * 64)
    for label, value in stack.lines:
        typer.echo(f"{label + ':':<12} {value}")
    for child in supervisor.children:
        typer.echo(f"{'running:':<12} {child.name} (pid {child.proc.pid})")
    typer.echo("=" * 64)


def _print_status(dsn: str) -> None:
    from camfleet.commands.status import print_status

    print_status(dsn)


def register(app: typer.Typer, simulate: typer.Typer) -> None:
    app.command("up")(up)
