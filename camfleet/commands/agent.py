"""`camfleet agent`: the seed's Visant v2 device client (`device/main_v2.py`)."""

from __future__ import annotations

from pathlib import Path

import typer


def agent(
    api_url: str = typer.Option("http://127.0.0.1:8000", help="Cloud API base URL"),
    device_id: str = typer.Option(..., help="Unique device identifier"),
    camera_source: str = typer.Option(
        "0", help="0 for the default webcam, an image file, a directory of images, or an RTSP URL"
    ),
    camera_backend: str = typer.Option(None, help="OpenCV backend (dshow, msmf, v4l2, ...)"),
    camera_resolution: str = typer.Option(None, help="Camera resolution, e.g. 1920x1080"),
    camera_warmup: int = typer.Option(2, help="Warm-up frames to discard before a capture"),
    upload_timeout: float = typer.Option(30.0, help="Timeout for a capture upload (s)"),
    stream_timeout: float = typer.Option(70.0, help="Timeout for an SSE stream read (s)"),
    reconnect_delay: float = typer.Option(5.0, help="Delay before reconnecting after an error (s)"),
    max_reconnect_delay: float = typer.Option(60.0, help="Ceiling of the reconnect backoff (s)"),
    save_frames: bool = typer.Option(False, help="Save captured frames locally for debugging"),
    save_frames_dir: Path = typer.Option(Path("debug_captures"), help="Directory for saved frames"),
    device_token: str = typer.Option(
        None,
        envvar="CAMFLEET_DEVICE_TOKEN",
        help="Device token from pairing (X-Device-Token)",
        show_default=False,
    ),
    max_captures: int = typer.Option(None, help="Exit after this many uploads (demos, tests)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Verbose logging"),
) -> None:
    """Hold the command stream, capture on every command, upload, reconnect with backoff."""
    import asyncio
    import logging

    from camfleet.agent.camera import CameraError, open_camera
    from camfleet.agent.client import Agent, AgentConfig
    from camfleet.keys import BadName, safe_id

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        safe_id(device_id)
        camera = open_camera(camera_source, camera_backend, camera_resolution, camera_warmup)
    except (BadName, CameraError) as exc:
        typer.echo(f"camfleet agent: {exc}", err=True)
        raise typer.Exit(2) from None
    cfg = AgentConfig(
        api_url=api_url,
        device_id=device_id,
        device_token=device_token,
        upload_timeout=upload_timeout,
        stream_timeout=stream_timeout,
        reconnect_delay=reconnect_delay,
        max_reconnect_delay=max_reconnect_delay,
        save_frames=save_frames,
        save_frames_dir=save_frames_dir,
        max_captures=max_captures,
    )
    try:
        stats = asyncio.run(Agent(cfg, camera).run())
    except KeyboardInterrupt:
        return
    typer.echo(
        f"agent {device_id}: {stats.connects} connects, {stats.commands} commands, "
        f"{stats.uploads} uploads, {stats.failures} failures"
    )


def register(app: typer.Typer, simulate: typer.Typer) -> None:
    app.command("agent")(agent)
