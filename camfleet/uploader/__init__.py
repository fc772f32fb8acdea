"""Seed 001's Data Uploader (Module C): event packages from `pending_upload/` to an SFTP
server and the `events` table. See docs/event-upload.md.

    from camfleet.uploader import DataUploader
    DataUploader(config).run()

Layers: jobs/scan (decisions, no I/O) <- sftp/session (adapters: paramiko, PostgreSQL)
<- phases <- uploader (DataUploader). tasks/ wraps phases and the adapters in Prefect
tasks for flows/event_upload.py; nothing here imports Prefect, tasks/ or flows/.
"""

from __future__ import annotations

__all__ = ["DataUploader", "UploaderConfig"]


def __getattr__(name: str):
    # Lazy so that `camfleet.uploader.jobs` (the simulator, the scanner) loads without
    # paramiko and psycopg2. Nothing here imports Prefect, tasks/ or flows/: those
    # import this package (tests/test_uploader_layering.py holds it to that).
    if name == "DataUploader":
        from camfleet.uploader.uploader import DataUploader

        return DataUploader
    if name == "UploaderConfig":
        from camfleet.uploader.config import UploaderConfig

        return UploaderConfig
    raise AttributeError(name)
