"""`camfleet signer`: the cloud side of the edge upload (presigned POSTs + verification)."""

from __future__ import annotations

import typer


def signer(
    storage_url: str = typer.Option(None, help="STORAGE_URL (s3://bucket?endpoint_url=...)"),
    mqtt_block: str = typer.Option(None, help="camfleet-mqtt-broker block (else MQTT_* env)"),
    database_block: str = typer.Option(None, help="camfleet-postgres block (else DATABASE_URL)"),
    client_id: str = typer.Option("camfleet-signer", help="stable MQTT client id (session)"),
    expires_in: int = typer.Option(300, help="presigned POST lifetime, seconds"),
    handoff: str = typer.Option(
        "flow",
        help="post-processing of verified uploads: 'flow' (a flow run per batch), "
        "'deployment:<flow>/<name>' (run that deployment per batch) or 'none'",
    ),
    metrics_port: int = typer.Option(0, help="serve Prometheus /metrics on this port (0: off)"),
) -> None:
    """Answer edge devices' URL requests and verify their uploads (runs until stopped)."""
    import logging

    from camfleet import resolve
    from camfleet.settings import get_settings
    from camfleet.storage import open_store
    from services.signer import Signer

    logging.basicConfig(level=get_settings().log_level, format="%(asctime)s %(message)s")
    run = None
    if handoff == "flow":
        from flows.edge_batch import run_uploads_received

        run = run_uploads_received
    elif handoff.startswith("deployment:"):
        name = handoff.removeprefix("deployment:")

        def run(captures: list[dict]) -> str | None:
            from prefect.deployments import run_deployment

            flow_run = run_deployment(name, parameters={"captures": captures}, timeout=0)
            return str(flow_run.id)

    elif handoff != "none":
        raise typer.BadParameter("handoff is 'flow', 'deployment:<flow>/<name>' or 'none'")
    store = open_store(storage_url)
    broker = resolve.mqtt_broker(mqtt_block)
    typer.echo(f"signer: storage {store.describe()}, broker {broker.describe()}")
    service = Signer(
        store,
        resolve.database_url(database_block),
        broker,
        client_id=client_id,
        expires_in=expires_in,
        handoff=run,
    )
    if metrics_port:
        from camfleet.metrics import expose_signer

        expose_signer(service, metrics_port)
    service.run_forever()


def register(app: typer.Typer, simulate: typer.Typer) -> None:
    app.command("signer")(signer)
