"""`camfleet broker add-device`: MQTT credentials for a device on the local broker."""

from __future__ import annotations

import typer

broker_app = typer.Typer(help="The local MQTT broker `camfleet up` runs.", no_args_is_help=True)


@broker_app.command("add-device")
def add_device(
    device_id: str = typer.Argument(..., help="Device id (ESP32-CAM) or serial (edge box)."),
) -> None:
    """Create (or replace) a device's account; it may use only its own topics.

    Prints the username and password once: put them in the device's configuration.
    A running broker rereads its accounts at once; otherwise the next `camfleet up` does.
    """
    from camfleet import localbroker, stackfile
    from camfleet.settings import get_settings

    data_dir = get_settings().data_dir.resolve()
    auth = localbroker.BrokerAuth(data_dir / "mosquitto")
    try:
        password = auth.add_device(device_id)
    except localbroker.BrokerAuthError as exc:
        typer.secho(f"camfleet broker add-device: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    facts = stackfile.read(data_dir)
    reloaded = localbroker.reload(facts.get("broker_pid"))
    typer.echo(f"username: {device_id}")
    typer.echo(f"password: {password}")
    if facts.get("broker"):
        typer.echo(f"broker:   {facts['broker']}")
    if not reloaded:
        typer.echo("(no local broker running: the account applies from the next `camfleet up`)")


def register(app: typer.Typer, simulate: typer.Typer) -> None:
    app.add_typer(broker_app, name="broker")
