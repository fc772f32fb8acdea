"""The event-upload deployment, on the config's own `scan_interval_seconds`.

    camfleet uploader serve --config config.json     # serve it from this process
    prefect deployment run event-upload/event-upload # an ad-hoc run meanwhile

prefect.yaml has the same deployment for `prefect deploy` (a fixed 60 s interval and
the config path from CAMFLEET_UPLOADER_CONFIG).
"""

from __future__ import annotations

from pathlib import Path

from camfleet.uploader.config import UploaderConfig

DEPLOYMENT_NAME = "event-upload"


def deployment(
    config_path: str,
    sftp_block: str | None = None,
    database_block: str | None = None,
    interval: int | None = None,
):
    """A RunnerDeployment of flows.event_upload every `interval` (default: the config's)."""
    from flows.event_upload import event_upload

    config = UploaderConfig.from_file(config_path)  # fail now, not on every scheduled run
    return event_upload.to_deployment(
        name=DEPLOYMENT_NAME,
        interval=interval or config.scan_interval_seconds,
        parameters={
            "config_path": str(Path(config_path).resolve()),
            "sftp_block": sftp_block,
            "database_block": database_block,
        },
        description="Seed 001 event packages: pending_upload/ -> SFTP + events -> uploaded/.",
    )


def serve(config_path: str, **kwargs) -> None:
    from prefect import serve as prefect_serve

    prefect_serve(deployment(config_path, **kwargs))
