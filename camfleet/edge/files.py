"""The device's two directories: `cameraImageRepo/` (camera output) and the buffer.

A file moves from the repo into the buffer by an atomic rename and leaves the buffer
only when the cloud has verified it. Files already in the buffer (left by a crashed or
unverified run) are taken first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Collection
from pathlib import Path

from camfleet.keys import BadName
from camfleet.protocol import edge_batch as eb
from camfleet.storage.base import STREAM_CHUNK_BYTES

log = logging.getLogger("camfleet.edge")

# A camera may still be writing the newest file; one that has not changed for two
# seconds is complete (JPEG encoders write a frame in well under a second).
MIN_FILE_AGE_S = 2.0


def _candidates(
    directory: Path, min_age_s: float, now: float, exclude: Collection[str] = ()
) -> list[tuple[float, str]]:
    out = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.name in exclude or entry.name.startswith("."):
            continue
        if not entry.is_file(follow_symlinks=False):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # deleted meanwhile (verified by another batch, or the camera)
        if now - st.st_mtime < min_age_s:
            continue
        out.append((st.st_mtime, entry.name))
    out.sort()  # oldest first, then by name
    return out


def _usable(directory: Path, name: str, max_bytes: int) -> bool:
    try:
        eb.check_device_name(name)
    except BadName as exc:
        log.warning("edge: leaving %r in %s: %s", name[:80], directory, exc)
        return False
    try:
        size = (directory / name).stat().st_size
    except FileNotFoundError:
        return False
    if not 0 < size <= max_bytes:
        log.warning(
            "edge: leaving %s in %s: size %d outside 1-%d", name, directory, size, max_bytes
        )
        return False
    return True


def sha256_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(STREAM_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def take_batch(
    repo_dir: Path,
    buffer_dir: Path,
    batch_size: int = eb.DEFAULT_BATCH_SIZE,
    *,
    exclude: Collection[str] = (),
    min_age_s: float = MIN_FILE_AGE_S,
    max_bytes: int = eb.MAX_FILE_BYTES,
) -> list[eb.LocalFile]:
    """Up to `batch_size` files in the buffer: leftovers first, then the oldest new ones.

    `exclude` names files another batch of this process is already handling.
    """
    repo_dir, buffer_dir = Path(repo_dir), Path(buffer_dir)
    buffer_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    chosen: list[str] = []
    for _, name in _candidates(buffer_dir, 0.0, now, exclude):
        if len(chosen) >= batch_size:
            break
        if _usable(buffer_dir, name, max_bytes):
            chosen.append(name)
    if len(chosen) < batch_size:
        for _, name in _candidates(repo_dir, min_age_s, now):
            if len(chosen) >= batch_size:
                break
            if name in exclude or (buffer_dir / name).exists():
                continue  # a same-named file waits in the buffer: never overwrite it
            if not _usable(repo_dir, name, max_bytes):
                continue
            try:
                os.rename(repo_dir / name, buffer_dir / name)  # atomic on one filesystem
            except FileNotFoundError:
                continue  # the camera removed it meanwhile
            chosen.append(name)
        _fsync_dir(buffer_dir)
        _fsync_dir(repo_dir)
    batch = []
    for name in chosen:
        try:
            sha, size = sha256_file(buffer_dir / name)
        except FileNotFoundError:
            continue
        batch.append(eb.LocalFile(name, size, sha))
    return batch


def delete_verified(buffer_dir: Path, name: str) -> None:
    """Remove a verified file from the buffer (already gone counts as done)."""
    eb.check_device_name(name)
    (Path(buffer_dir) / name).unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
