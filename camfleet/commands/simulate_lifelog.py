"""`camfleet simulate lifelog`: paired ESP32 cameras uploading through presigned URLs."""

from __future__ import annotations

from pathlib import Path

import typer


def lifelog(
    api: str = typer.Option("http://127.0.0.1:8000", help="Device API base URL"),
    user_key: str = typer.Option(
        None,
        envvar="CAMFLEET_USER_KEY",
        help="User API key for pairing (camfleet users create-key)",
    ),
    devices: int = typer.Option(1, min=1, max=1000, help="Simulated cameras"),
    photos: int = typer.Option(3, min=1, help="Photos per camera"),
    image: Path = typer.Option(None, exists=True, dir_okay=False, help="JPEG to send"),
    interval: float = typer.Option(0.0, min=0, help="Seconds between a camera's photos"),
    duplicate_rate: float = typer.Option(
        0.0, min=0, max=1, help="Fraction of ingests re-sent as lost-answer retries"
    ),
    state_dir: Path = typer.Option(
        None, help="Keep each camera's token and seq here (resume instead of pairing again)"
    ),
) -> None:
    """Pair, activate, then upload-url -> PUT (streamed) -> ingest with a monotonic seq."""
    import asyncio
    import json

    from camfleet.simulators.lifelog import DeviceError, LifelogDevice, Timings, pair, percentile

    data: bytes | Path = image or (
        b"\xff\xd8\xff\xe0" + b"camfleet-simulated-jpeg" * 400 + b"\xff\xd9"
    )
    timings = Timings()

    async def one(i: int) -> None:
        state = state_dir / f"lifelog-{i}.json" if state_dir else None
        device = LifelogDevice(
            api, state_file=state, timings=timings, duplicate_rate=duplicate_rate
        )
        try:
            if device.token is None:
                if not user_key:
                    raise typer.BadParameter("--user-key (or CAMFLEET_USER_KEY) is needed to pair")
                paired = await pair(api, user_key, name=f"sim-lifelog-{i}", client=device.client)
                await device.activate(paired["pairing_code"])
            for n in range(photos):
                await device.upload_photo(data)
                if interval and n < photos - 1:
                    await asyncio.sleep(interval)
        finally:
            await device.aclose()

    async def main() -> None:
        if state_dir:
            state_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.gather(*(one(i) for i in range(devices)))

    try:
        asyncio.run(main())
    except DeviceError as exc:
        typer.echo(f"simulate lifelog: the API refused: {exc}", err=True)
        raise typer.Exit(1) from None
    summary = {
        "devices": devices,
        "statuses": timings.statuses,
        "retries": timings.retries,
        "p99_ms": {k: round(percentile(v, 99) * 1000, 1) for k, v in timings.latencies.items()},
    }
    typer.echo(json.dumps(summary))


def register(app: typer.Typer, simulate: typer.Typer) -> None:
    simulate.command("lifelog")(lifelog)
