"""Event packages as the analyzer (Module B) writes them: for demos, tests, benchmarks.

The video goes first and the JSON (the trigger) last, as the seed's contract expects.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def write_event(
    pending_dir: str | os.PathLike[str],
    event_id: str,
    video_bytes: int = 50_000,
    *,
    age_seconds: float = 0.0,
    metadata: dict | None = None,
    video: bytes | None = None,
) -> tuple[Path, Path]:
    """Write `[event_id].mp4` then `[event_id].json`; mtimes `age_seconds` in the past."""
    pending = Path(pending_dir)
    pending.mkdir(parents=True, exist_ok=True)
    video_path = pending / f"{event_id}.mp4"
    json_path = pending / f"{event_id}.json"
    video_path.write_bytes(video if video is not None else os.urandom(video_bytes))
    body = {"eventId": event_id, "species": "fox", "confidence": 0.93, "duration_s": 12}
    json_path.write_text(json.dumps(metadata if metadata is not None else body))
    if age_seconds:
        stamp = time.time() - age_seconds
        for path in (video_path, json_path):
            os.utime(path, (stamp, stamp))
    return video_path, json_path


def write_events(
    pending_dir: str | os.PathLike[str],
    count: int,
    video_bytes: int = 50_000,
    *,
    prefix: str = "evt",
    age_seconds: float = 0.0,
) -> list[str]:
    """`count` packages named `{prefix}{n:06d}`; returns their event ids."""
    ids = [f"{prefix}{n:06d}" for n in range(count)]
    for event_id in ids:
        write_event(pending_dir, event_id, video_bytes, age_seconds=age_seconds)
    return ids


def local_config(sshd, dsn: str, base_dir: str | os.PathLike[str], **uploader) -> dict:
    """A seed-format config for a local SshdInstance and database URL (demos, tests).

    Directories live under `base_dir`; remote directories under the sshd's root. Keys
    in `uploader` override the section's defaults (e.g. settle_seconds=0).
    """
    from blocks.postgres import PostgresDatabase

    base = Path(base_dir)
    database = PostgresDatabase.from_url(dsn)
    section = {
        "scan_interval_seconds": 30,
        "pending_dir": str(base / "pending_upload"),
        "uploaded_dir": str(base / "uploaded"),
        "failed_dir": str(base / "failed_upload"),
        "settle_seconds": 0,
        "sftp": {
            "host": sshd.host,
            "port": sshd.port,
            "username": sshd.username,
            "ssh_key_path": str(sshd.client_key_path),
            "known_hosts_path": str(sshd.known_hosts_path),
            "remote_video_dir": str(Path(sshd.root) / base.name / "videos"),
            "remote_json_dir": str(Path(sshd.root) / base.name / "json"),
        },
        "database": {
            "host": database.host,
            "port": database.port,
            "dbname": database.dbname,
            "user": database.user,
            "password": database.password.get_secret_value() if database.password else None,
        },
    }
    section.update(uploader)
    return {"uploader": section}
