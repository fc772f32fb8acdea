"""The `camfleet` command line.

Each command group lives in its own module under `camfleet/commands/` and adds itself
with `register(app, simulate)`; heavy imports stay inside the commands so `--help`
is fast.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    help="camfleet: ingestion and orchestration for camera fleets.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold secrets
)
simulate = typer.Typer(help="Simulated devices of every kind, for tests, demos and benchmarks.")
app.add_typer(simulate, name="simulate")

COMMAND_MODULES = [
    "db",
    "blocks",
    "status",
    "up",
    "broker",
    "assembler",
    "simulate_esp32",
    "uploader",
    "edge",
    "simulate_edge",
    "signer",
    "api",
    "agent",
    "triggers",
    "devices",
    "simulate_lifelog",
    "report",
    "faults",
    "alerts",
]

for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"camfleet.commands.{_name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"camfleet.commands.{_name}":
            raise
        continue  # that command group is not part of this build
    _module.register(app, simulate)


if __name__ == "__main__":
    app()
