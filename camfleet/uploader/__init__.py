"""Seed 001's Data Uploader (Module C): event packages from `pending_upload/` to an SFTP
server and the `events` table. See docs/event-upload.md.

    from camfleet.uploader import DataUploader
    DataUploader(config).run()
"""

from __future__ import annotations

__all__ = ["DataUploader", "UploaderConfig"]


def __getattr__(name: str):
    # Lazy: tasks/ imports camfleet.uploader.phases, and DataUploader imports tasks/.
    if name == "DataUploader":
        from camfleet.uploader.uploader import DataUploader

        return DataUploader
    if name == "UploaderConfig":
        from camfleet.uploader.config import UploaderConfig

        return UploaderConfig
    raise AttributeError(name)
