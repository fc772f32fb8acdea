"""`camfleet simulate edge`: an edge device (camfleet's or the seed firmware's) with images."""

from __future__ import annotations

from pathlib import Path

import typer


def simulate_edge(
    serial: str = typer.Option("ENTO-SIM-0001", help="device serial"),
    files: int = typer.Option(12, help="images to create in cameraImageRepo/"),
    size: int = typer.Option(50 * 1024, help="bytes per image"),
    workdir: str = typer.Option(".camfleet/edge-sim", help="where the device's directories go"),
    mqtt_block: str = typer.Option(None, help="camfleet-mqtt-broker block (else MQTT_* env)"),
    seed_firmware: bool = typer.Option(
        False,
        "--seed-firmware",
        help="behave like deployed seed firmware (names only, no checksums)",
    ),
    lanes: int = typer.Option(1, help="batches in flight at once (camfleet device only)"),
    pictures: bool = typer.Option(
        False, "--pictures", help="real JPEGs showing serial and time (size is ignored)"
    ),
) -> None:
    """Create images, then upload them through the signer the way a device does."""
    import os
    import time

    from camfleet import resolve
    from camfleet.edge.config import EdgeConfig

    broker = resolve.mqtt_broker(mqtt_block)
    root = Path(workdir).resolve()
    cfg = EdgeConfig(
        serial=serial,
        buffer_dir=root / "bufferStorage",
        repo_dir=root / "cameraImageRepo",
        broker_host=broker.host,
        broker_port=broker.port,
        tls=broker.tls,
    )
    cfg.repo_dir.mkdir(parents=True, exist_ok=True)
    cfg.buffer_dir.mkdir(parents=True, exist_ok=True)
    stamp = int(time.time())
    for i in range(files):
        if pictures:
            from camfleet.simulators.pictures import picture

            data = picture(serial, i)
        else:
            data = b"\xff\xd8" + os.urandom(max(0, size - 4)) + b"\xff\xd9"
        (cfg.repo_dir / f"sim_{stamp}_{i:04d}.jpg").write_bytes(data)
    t0 = time.perf_counter()
    if seed_firmware:
        from camfleet.edge import files as edge_files
        from camfleet.edge.seed_device import run_seed_batch

        deleted = 0
        while batch := edge_files.take_batch(cfg.repo_dir, cfg.buffer_dir, 5, min_age_s=0):
            names = [f.name for f in batch]
            done = run_seed_batch(broker, serial, cfg.buffer_dir, names, root)
            deleted += len(done)
            if not done:
                break
    else:
        from camfleet.edge.uploader import EdgeUploader

        summaries = EdgeUploader(cfg, broker, lanes=lanes, min_age_s=0).drain()
        deleted = sum(s["deleted"] for s in summaries)
    took = time.perf_counter() - t0
    typer.echo(f"{deleted}/{files} images verified and deleted in {took:.1f} s")


def register(app: typer.Typer, simulate: typer.Typer) -> None:
    simulate.command("edge")(simulate_edge)
