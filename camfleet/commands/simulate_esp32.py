"""`camfleet simulate esp32`: ESP32S3-CAM devices speaking seed 002's chunk protocol."""

from __future__ import annotations

import json

import typer


def simulate_esp32(
    devices: int = typer.Option(1, help="simulated devices"),
    images: int = typer.Option(1, help="images per device"),
    image_bytes: int = typer.Option(45 * 1024 - 100, help="bytes per image (45 chunks)"),
    chunk_size: int = typer.Option(1024, help="bytes per chunk before base64"),
    drop: float = typer.Option(0.0, help="probability a chunk's first send is lost"),
    duplicate: float = typer.Option(0.0, help="probability a chunk is sent twice"),
    reorder: float = typer.Option(0.0, help="probability two neighbouring chunks swap"),
    no_wait_ack: bool = typer.Option(
        False, "--no-wait-ack", help="fire and forget, do not wait for ACK_OK"
    ),
    ack_timeout: float = typer.Option(15.0, help="seconds to wait for ACK_OK before resending"),
    broker: str = typer.Option(None, help="host:port (else the MQTT_* environment variables)"),
    mqtt_block: str = typer.Option(None, help="a saved camfleet-mqtt-broker block"),
    id_prefix: str = typer.Option("A0B0C0", help="device ids are PREFIX + 6 hex digits"),
    clients: int = typer.Option(1, help="MQTT connections shared by the devices"),
    seed: int = typer.Option(0, help="random seed (image bytes, drops)"),
    json_out: bool = typer.Option(False, "--json", help="print the result as JSON"),
    pictures: bool = typer.Option(
        False, "--pictures", help="real JPEGs showing device and time, uniquely named"
    ),
) -> None:
    """Send images like an ESP32-CAM fleet: status, metadata, base64 chunks, NACK, ACK_OK."""
    from blocks.mqtt import MqttBroker
    from camfleet.progress import run_with_progress
    from camfleet.simulators.esp32 import Esp32Fleet, SimOptions

    if mqtt_block:
        b = MqttBroker.load(mqtt_block)
    else:
        b = MqttBroker.from_env()
        if broker:
            host, _, port = broker.rpartition(":")
            b.host, b.port = host or "127.0.0.1", int(port)
    opts = SimOptions(
        devices=devices,
        images=images,
        image_bytes=image_bytes,
        chunk_size=chunk_size,
        drop=drop,
        duplicate=duplicate,
        reorder=reorder,
        wait_ack=not no_wait_ack,
        ack_timeout=ack_timeout,
        clients=clients,
        id_prefix=id_prefix,
        seed=seed,
        pictures=pictures,
    )
    fleet = Esp32Fleet(b, opts)
    r = run_with_progress(
        fleet.run,
        total=devices * images,
        done=lambda: fleet.result.images_acked + fleet.result.images_failed,
        description=f"{devices} ESP32-CAMs sending",
    )
    lat = sorted(r.ack_latencies)
    summary = {
        "devices": devices,
        "images_sent": r.images_sent,
        "images_acked": r.images_acked,
        "images_failed": r.images_failed,
        "chunks_sent": r.chunks_sent,
        "nacks": r.nacks,
        "resends": r.resends,
        "elapsed_s": round(r.elapsed, 3),
        "ack_p50_s": round(lat[len(lat) // 2], 4) if lat else None,
        "ack_p99_s": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 4) if lat else None,
    }
    if json_out:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            print(f"{k:>14}: {v}")
    if r.images_failed:
        # Say where they went: the usual cause is a broker nobody ingests from.
        typer.echo(
            f"{r.images_failed} image(s) not acknowledged by mqtt://{b.host}:{b.port} "
            "(is `camfleet up` or `camfleet assembler` running against this broker?)",
            err=True,
        )
        raise typer.Exit(1)


def register(app: typer.Typer, simulate: typer.Typer) -> None:
    simulate.command("esp32")(simulate_esp32)
