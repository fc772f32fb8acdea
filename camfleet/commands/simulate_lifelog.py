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
    photos: int = typer.Option(3, min=0, help="Photos per camera (0: until stopped)"),
    image: Path = typer.Option(None, exists=True, dir_okay=False, help="JPEG to send"),
    interval: float = typer.Option(0.0, min=0, help="Seconds between a camera's photos"),
    duplicate_rate: float = typer.Option(
        0.0, min=0, max=1, help="Fraction of ingests re-sent as lost-answer retries"
    ),
    state_dir: Path = typer.Option(
        None, help="Keep each camera's token and seq here (resume instead of pairing again)"
    ),
    demo: bool = typer.Option(
        False,
        help="camfleet up's demo: 2 cameras, a photo every 30 s until stopped, a demo user "
        "key created in the database, state under the data dir",
    ),
) -> None:
    """Pair, activate, then upload-url -> PUT (streamed) -> ingest with a monotonic seq."""
    import asyncio
    import json

    if demo:
        api, user_key, state_dir = _demo_setup(api, user_key, state_dir)
        devices, photos, interval = 2, 0, DEMO_INTERVAL_S
        image = image or _demo_jpeg(state_dir)

    from camfleet.progress import run_with_progress
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
            while device.token is None:
                if not user_key:
                    raise typer.BadParameter("--user-key (or CAMFLEET_USER_KEY) is needed to pair")
                try:
                    paired = await pair(
                        api, user_key, name=f"sim-lifelog-{i}", client=device.client
                    )
                    await device.activate(paired["pairing_code"])
                except DeviceError:
                    if not demo:
                        raise
                    await asyncio.sleep(DEMO_INTERVAL_S)  # the API is still starting
            n = 0
            while photos == 0 or n < photos:  # 0: until stopped (the demo)
                try:
                    await device.upload_photo(data)
                except DeviceError:
                    if not demo:
                        raise
                n += 1
                if interval and (photos == 0 or n < photos):
                    await asyncio.sleep(interval)
        finally:
            await device.aclose()

    async def main() -> None:
        if state_dir:
            state_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.gather(*(one(i) for i in range(devices)))

    def uploaded() -> int:
        return len(timings.latencies.get("ingest", []))

    try:
        if photos:
            run_with_progress(
                lambda: asyncio.run(main()),
                total=devices * photos,
                done=uploaded,
                description=f"{devices} Lifelog cameras uploading",
            )
        else:  # until stopped: no total to show
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


# The seed's camera: one JPEG every ~30 seconds.
DEMO_INTERVAL_S = 30.0


def _demo_setup(api: str, user_key: str | None, state_dir: Path | None):
    """A demo user key (created once, kept with the cameras' state) and the local API."""
    from camfleet.settings import get_settings

    settings = get_settings()
    if api == "http://127.0.0.1:8000":
        api = settings.public_url or f"http://{settings.api_host}:{settings.api_port}"
    state_dir = state_dir or (settings.data_dir / "demo-lifelog")
    state_dir.mkdir(parents=True, exist_ok=True)
    key_file = state_dir / "user-key"
    if user_key is None and key_file.exists():
        user_key = key_file.read_text().strip()
    if user_key is None:
        from camfleet import db, resolve, tokens

        user_key = tokens.new_user_key()
        key_hash = tokens.hash_user_key(resolve.secret_key(), user_key)
        with db.transaction(resolve.database_url()) as conn:
            db.queries.devices_create_user(conn, user_id="demo", name="camfleet demo")
            db.queries.devices_create_user_key(
                conn, user_id="demo", key_hash=key_hash, label="simulate lifelog --demo"
            )
        key_file.write_text(user_key)
        key_file.chmod(0o600)
    return api, user_key, state_dir


def _demo_jpeg(state_dir: Path) -> Path:
    """A real 640x480 JPEG (gradient + noise), so the evaluation flow has a photo to score."""
    path = state_dir / "demo.jpg"
    if not path.exists():
        from PIL import Image, ImageChops

        gradient = Image.linear_gradient("L").resize((640, 480)).convert("RGB")
        noise = Image.effect_noise((640, 480), 40).convert("RGB")
        ImageChops.blend(gradient, noise, 0.3).save(path, "JPEG", quality=85)
    return path


def register(app: typer.Typer, simulate: typer.Typer) -> None:
    simulate.command("lifelog")(lifelog)
