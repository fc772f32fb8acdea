"""`camfleet assembler`: the MQTT chunk assembler service for ESP32-CAM fleets (seed 002)."""

from __future__ import annotations

import typer


def assembler(
    mqtt_block: str = typer.Option(
        None, envvar="CAMFLEET_MQTT_BLOCK", help="saved camfleet-mqtt-broker block (else MQTT_*)"
    ),
    # A block name, never a URL: a password on the command line is in the process list.
    database_block: str = typer.Option(
        None,
        envvar="CAMFLEET_DATABASE_BLOCK",
        help="saved camfleet-postgres block (else DATABASE_URL)",
    ),
    storage_url: str = typer.Option(None, help="object store URL (else STORAGE_URL)"),
    client_id: str = typer.Option(
        None, help="stable MQTT client id for the persistent session (else MQTT_CLIENT_ID)"
    ),
    log_control_only: bool = typer.Option(
        False,
        "--log-control-only",
        envvar="CAMFLEET_MQTT_LOG_CONTROL_ONLY",
        help="device_publish_log: skip chunk messages (status, metadata, ACK/NACK only)",
    ),
    no_prefect: bool = typer.Option(
        False,
        "--no-prefect",
        help="store, record and ACK without Prefect flow runs (no flow_run_id)",
    ),
    ack_path: str = typer.Option(
        "direct",
        help="direct: store+rows+ACK in the service's batch, one recording flow run per "
        "interval; flow: one mqtt-ingest flow run per batch on the ACK path (slower here)",
    ),
    batch_max: int = typer.Option(200, help="finished images per flow run, at most"),
    batch_window_ms: int = typer.Option(20, help="how long a batch waits for more images"),
    concurrent_batches: int = typer.Option(2, help="flow runs in flight"),
    recorder: str = typer.Option(
        "inline",
        help="where recording flow runs execute: inline (a thread of this process) or "
        "process (a child with its own Prefect client: off this GIL, ~120 MB more memory)",
    ),
    unknown_devices: str = typer.Option(
        "register",
        envvar="CAMFLEET_MQTT_UNKNOWN_DEVICES",
        help="device ids not in `devices`: register (admitted at a bounded rate, see "
        "--new-device-burst/--new-device-per-min) or refuse (registered devices only)",
    ),
    new_device_burst: int = typer.Option(200, help="new device ids admitted at once"),
    new_device_per_min: float = typer.Option(
        60, help="new device ids admitted per minute after the burst"
    ),
    health_port: int = typer.Option(
        None, help="serve GET /healthz on 127.0.0.1:PORT (200 ready, 503 not)"
    ),
    metrics_port: int = typer.Option(0, help="serve Prometheus /metrics on this port (0: off)"),
    partitions: int = typer.Option(
        0,
        envvar="CAMFLEET_ASSEMBLER_PARTITIONS",
        help="run as one of several replicas: devices are split into this many partitions "
        "leased in PostgreSQL (every replica the same number, e.g. 64); 0: the only "
        "assembler of the fleet, no leases",
    ),
    replica_id: str = typer.Option(
        None,
        envvar="CAMFLEET_ASSEMBLER_REPLICA_ID",
        help="this replica's name in the partition leases, also appended to its MQTT "
        "client id (with --partitions; default host-pid)",
    ),
    lease_ttl: float = typer.Option(
        5.0,
        envvar="CAMFLEET_ASSEMBLER_LEASE_TTL_S",
        help="with --partitions: seconds a partition lease outlives its last renewal "
        "(renewed every second; > 2). Bounds failover only when a replica is cut off "
        "without its broker connection closing: a killed replica's partitions move at "
        "once on its MQTT will",
    ),
) -> None:
    """Assemble chunked images from ESP32CAM/+/data, store them, write rows, ACK_OK."""
    import logging

    if ack_path not in ("direct", "flow"):
        raise typer.BadParameter("--ack-path is direct or flow")
    if recorder not in ("inline", "process"):
        raise typer.BadParameter("--recorder is inline or process")
    if partitions < 0:
        raise typer.BadParameter("--partitions is 0 (single assembler) or more")
    if lease_ttl <= 2:
        raise typer.BadParameter("--lease-ttl must exceed 2 s (1 s renewal + 1 s margin)")
    if unknown_devices not in ("register", "refuse"):
        raise typer.BadParameter("--unknown-devices is register or refuse")

    from camfleet import resolve
    from camfleet.protocol.assembler import Timing
    from camfleet.settings import get_settings
    from services.assembler import AssemblerService, ServiceConfig

    s = get_settings()
    logging.basicConfig(
        level=s.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    broker = resolve.mqtt_broker(mqtt_block)
    try:
        dsn = resolve.database_url(database_block)
    except RuntimeError as exc:
        raise typer.BadParameter(str(exc)) from None
    cfg = ServiceConfig(
        database_url=dsn,
        storage_url=storage_url or s.resolved_storage_url(),
        timing=Timing.from_ms(s.capture_timeout_ms, s.retransmit_delay_ms, s.retransmit_max),
        client_id=client_id or s.mqtt_client_id or "camfleet-assembler",
        log_control_only=log_control_only,
        use_prefect=not no_prefect,
        ack_path=ack_path,
        max_batch_images=batch_max,
        batch_window_s=batch_window_ms / 1000,
        max_concurrent_batches=concurrent_batches,
        recorder=recorder,
        topics=(s.topic_pattern_status, s.topic_pattern_data, s.topic_pattern_ack),
        unknown_devices=unknown_devices,
        new_device_burst=new_device_burst,
        new_device_per_min=new_device_per_min,
        health_port=health_port,
        partitions=partitions,
        replica_id=replica_id,
        lease_ttl_s=lease_ttl,
    )
    service = AssemblerService(broker, cfg)
    if metrics_port:
        from camfleet.metrics import expose_assembler

        expose_assembler(service, metrics_port)
    service.run_forever()


def register(app: typer.Typer, simulate: typer.Typer) -> None:
    app.command("assembler")(assembler)
