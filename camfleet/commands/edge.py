"""`camfleet edge run|serve --config ento.conf`: the device side of the edge upload."""

from __future__ import annotations

import typer

edge_app = typer.Typer(help="Edge device: batch-upload images through presigned POSTs (seed 000).")

CONFIG_HELP = "the device's ento.conf (seed layout)"


@edge_app.command("run")
def run(
    config: str = typer.Option("/etc/entomologist/ento.conf", help=CONFIG_HELP),
    mqtt_block: str = typer.Option(None, help="camfleet-mqtt-broker block (else ento.conf)"),
    max_batches: int = typer.Option(20, help="batches in this run"),
    min_age: float = typer.Option(2.0, help="seconds a new image must be unchanged"),
    prefect: bool = typer.Option(
        None,
        "--prefect/--no-prefect",
        help="report the run to the Prefect server (default: when PREFECT_API_URL or a "
        "Prefect profile names one; never a temporary local server)",
    ),
) -> None:
    """Drain cameraImageRepo/ once: move, request, upload, verify, delete."""
    from camfleet.commands import prefect_mode
    from camfleet.edge.config import ConfigError, load_ento_conf

    try:
        cfg = load_ento_conf(config)
        url = prefect_mode.use_prefect(prefect, "camfleet edge run --prefect")
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    except prefect_mode.NoPrefectApi as exc:
        raise prefect_mode.refuse(exc) from None
    if url is None:
        # The same steps as the flow, without Prefect: what a device with no server runs.
        from camfleet.edge.uploader import EdgeUploader

        broker = None
        if mqtt_block:
            from blocks.mqtt import MqttBroker

            broker = MqttBroker.load(mqtt_block)
        summaries = EdgeUploader(cfg, broker, min_age_s=min_age).drain(max_batches)
    else:
        with prefect_mode.reporting_to(url):
            from flows.edge_batch import edge_batch_upload

            summaries = edge_batch_upload(
                config, mqtt_block=mqtt_block, max_batches=max_batches, min_age_s=min_age
            )
    deleted = sum(s["deleted"] for s in summaries)
    files = sum(s["files"] for s in summaries)
    typer.echo(f"{len(summaries)} batches: {deleted}/{files} files verified and deleted")
    if files and deleted < files:
        raise typer.Exit(1)


@edge_app.command("serve")
def serve(
    config: str = typer.Option("/etc/entomologist/ento.conf", help=CONFIG_HELP),
    interval: int = typer.Option(60, help="seconds between runs"),
    mqtt_block: str = typer.Option(None, help="camfleet-mqtt-broker block (else ento.conf)"),
) -> None:
    """Serve the flow as a deployment with an interval schedule (runs until stopped).

    Needs a Prefect server (PREFECT_API_URL); without one, schedule `camfleet edge run`
    (cron, a systemd timer) instead.
    """
    from camfleet.commands import prefect_mode
    from camfleet.edge.config import ConfigError, load_ento_conf

    try:
        cfg = load_ento_conf(config)
        url = prefect_mode.require_api("camfleet edge serve")
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    except prefect_mode.NoPrefectApi as exc:
        raise prefect_mode.refuse(exc) from None
    with prefect_mode.reporting_to(url):
        from flows.edge_batch import edge_batch_upload

        edge_batch_upload.serve(
            name=f"edge-{cfg.serial}",
            interval=interval,
            parameters={"config_path": config, "mqtt_block": mqtt_block},
            description=f"Batch upload of device {cfg.serial}'s images every {interval} s",
        )


def register(app: typer.Typer, simulate: typer.Typer) -> None:
    app.add_typer(edge_app, name="edge")
