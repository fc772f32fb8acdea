"""Scan `pending_upload/`: the I/O around the decisions in `jobs.py`.

Only `lstat` and one bounded read of each settled JSON; symlinks are never followed.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import os
import shutil
import stat
import time
from pathlib import Path

from camfleet.uploader.jobs import (
    MAX_JSON_BYTES,
    VIDEO_SUFFIX,
    BadInput,
    FileInfo,
    Reconcile,
    Reject,
    ScanResult,
    Wait,
    check_files,
    event_id_from_name,
    is_candidate,
    make_job,
)


def _info(path: Path) -> FileInfo | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return FileInfo(st.st_size, st.st_mtime, stat.S_ISREG(st.st_mode))


def read_json_bounded(path: Path) -> bytes:
    """At most MAX_JSON_BYTES + 1 bytes of a regular file, never through a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BadInput("JSON is a symlink (refused)") from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise BadInput("JSON is not a regular file")
        return f.read(MAX_JSON_BYTES + 1)


# A scan looks at most this many of the oldest `*.json` per job it may take (and at
# least MIN_CANDIDATES): waiting and rejected packages use up candidates too, and a
# directory with a million entries must not cost a million stat results in memory.
# Whatever is left over is seen by the next run.
CANDIDATES_PER_JOB = 4
MIN_CANDIDATES = 10_000


def _candidates(entries):
    for entry in entries:
        if not is_candidate(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # moved away meanwhile (another uploader)
        yield (st.st_mtime, entry.name, st)


def scan_pending(
    pending_dir: Path,
    uploaded_dir: Path,
    remote_video_dir: str,
    remote_json_dir: str,
    *,
    settle_seconds: float,
    orphan_seconds: float,
    max_jobs: int,
    now: float | None = None,
) -> ScanResult:
    """Every `*.json` in `pending_dir`, oldest first, decided: ready, waiting, rejected."""
    now = time.time() if now is None else now
    result = ScanResult()
    with os.scandir(pending_dir) as entries:
        candidates = heapq.nsmallest(
            max(max_jobs * CANDIDATES_PER_JOB, MIN_CANDIDATES), _candidates(entries)
        )
    for _, name, st in candidates:
        if len(result.ready) >= max_jobs:
            break
        json_info = FileInfo(st.st_size, st.st_mtime, stat.S_ISREG(st.st_mode))
        try:
            event_id = event_id_from_name(name)
        except BadInput as exc:
            result.rejected.append(Reject(name, str(exc)))
            continue
        video_name = event_id + VIDEO_SUFFIX
        video_info = _info(pending_dir / video_name)
        decision = check_files(name, json_info, video_info, now, settle_seconds, orphan_seconds)
        if isinstance(decision, Wait):
            if video_info is None and (uploaded_dir / video_name).is_file():
                result.reconciled.append(Reconcile(name, event_id))
            else:
                result.waiting.append(decision)
            continue
        if isinstance(decision, Reject):
            result.rejected.append(decision)
            continue
        assert video_info is not None
        try:
            raw = read_json_bounded(pending_dir / name)
            result.ready.append(
                make_job(name, json_info, video_info, raw, remote_video_dir, remote_json_dir)
            )
        except BadInput as exc:
            result.rejected.append(Reject(name, str(exc), event_id, video_name))
        except FileNotFoundError:
            continue  # taken by another uploader between lstat and open
    return result


def finish_reconcile(item: Reconcile, pending_dir: Path, uploaded_dir: Path) -> None:
    """The video is archived already (only done after UPDATE): the JSON follows it."""
    with contextlib.suppress(FileNotFoundError):  # another uploader was quicker
        shutil.move(pending_dir / item.json_name, uploaded_dir / item.json_name)
