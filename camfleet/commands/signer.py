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
        "'deployment:<flow>/<name>' (run that deployment per batch) or 'none'; "
        "without a configured Prefect API (PREFECT_API_URL) there is no hand-off",
    ),
    buckets: str = typer.Option(
        None,
        envvar="CAMFLEET_EDGE_BUCKETS",
        help="comma-separated buckets a request's bucket-name may choose (same endpoint "
        "and credentials); unset: bucket-name is ignored",
    ),
    health_port: int = typer.Option(
        None, help="serve GET /live and /ready on 127.0.0.1:PORT for a supervisor"
    ),
    requests_per_s: float = typer.Option(
        50.0, help="per-device requests per second (burst 100); 0: no limit"
    ),
    max_open_per_device: int = typer.Option(100, help="open grants one device may hold"),
    metrics_port: int = typer.Option(0, help="serve Prometheus /metrics on this port (0: off)"),
    share_group: str = typer.Option(
        None,
        envvar="CAMFLEET_SIGNER_GROUP",
        help="run as one of several replicas: subscribe through the broker's shared "
        "subscription $share/GROUP/... and count rate limits in PostgreSQL; each replica "
        "needs its own --client-id (docs/edge-upload.md, replicas)",
    ),
    lease_s: float = typer.Option(
        15.0, help="seconds an open grant stays leased to this instance past its last renewal"
    ),
) -> None:
    """Answer edge devices' URL requests and verify their uploads (runs until stopped)."""
    import logging

    from camfleet import resolve
    from camfleet.commands import prefect_mode
    from camfleet.settings import get_settings
    from camfleet.storage import open_store
    from services.signer import Signer, WorkerDied
    from services.signer.health import HealthServer
    from services.signer.limits import REQUEST_BURST, RateLimiter, SharedRateLimiter

    logging.basicConfig(level=get_settings().log_level, format="%(asctime)s %(message)s")
    run = None
    if handoff not in ("flow", "none") and not handoff.startswith("deployment:"):
        raise typer.BadParameter("handoff is 'flow', 'deployment:<flow>/<name>' or 'none'")
    if handoff != "none" and prefect_mode.api_url() is None:
        # Never start a temporary Prefect server inside a long-running service: its
        # start can take longer than a device waits, and it outlives a killed signer.
        typer.echo("signer: no Prefect API configured (PREFECT_API_URL): no hand-off")
        handoff = "none"
    if handoff == "flow":
        from flows.edge_batch import run_uploads_received

        run = run_uploads_received
    elif handoff.startswith("deployment:"):
        name = handoff.removeprefix("deployment:")

        def run(captures: list[dict]) -> str | None:
            from prefect.deployments import run_deployment

            flow_run = run_deployment(name, parameters={"captures": captures}, timeout=0)
            return str(flow_run.id)

    allowed = [b.strip() for b in (buckets or "").split(",") if b.strip()]
    store = open_store(storage_url)
    broker = resolve.mqtt_broker(mqtt_block)
    typer.echo(f"signer: storage {store.describe()}, broker {broker.describe()}")
    if allowed:
        typer.echo(f"signer: bucket-name allowed: {', '.join(allowed)}")
    dsn = resolve.database_url(database_block)
    if share_group:
        typer.echo(f"signer: replica {client_id} of share group {share_group}")
        limiter = SharedRateLimiter(dsn, requests_per_s, REQUEST_BURST)
    else:
        limiter = RateLimiter(requests_per_s, REQUEST_BURST)
    service = Signer(
        store,
        dsn,
        broker,
        client_id=client_id,
        expires_in=expires_in,
        handoff=run,
        buckets=allowed,
        rate_limiter=limiter,
        max_open_per_device=max_open_per_device,
        share_group=share_group,
        lease_s=lease_s,
    )
    health = None
    if health_port is not None:
        health = HealthServer(health_port, service.live, service.ready, service.health).start()
        typer.echo(f"signer: health on http://127.0.0.1:{health.port}/ready and /live")
    if metrics_port:
        from camfleet.metrics import expose_signer

        expose_signer(service, metrics_port)
    try:
        service.run_forever()
    except WorkerDied as exc:
        typer.echo(f"signer: {exc}; exiting", err=True)
        raise typer.Exit(70) from None  # EX_SOFTWARE: the supervisor restarts us
    finally:
        if health is not None:
            health.stop()


def register(app: typer.Typer, simulate: typer.Typer) -> None:
    app.command("signer")(signer)
