"""The four phases of seed 001, applied to a batch of jobs, with a ledger of outcomes.

    claim  -> lock each event in PostgreSQL (skip those another uploader holds)
    insert -> Phase 1: `events` row 'pending'            (idempotent on event id)
    upload -> Phase 2: SFTP video, then JSON              (temp name + size + rename)
    update -> Phase 3: row 'completed' with both remote paths
    move   -> Phase 4: both local files to `uploaded/`

Each phase takes only the jobs that came through the phase before it, so a job is
moved to `uploaded/` if and only if its INSERT, both transfers and its UPDATE
succeeded. A job that fails a phase stays in `pending_upload/` untouched and is
picked up by the next run; a job that can never succeed is rejected (moved aside
with the reason). A phase raises only when its connection is gone (the caller, a
retried Prefect task or DataUploader's loop, tries again); per-job errors go in the
ledger. The ledger also makes a retried phase skip the jobs it already finished.

Both the Prefect flow (flows/event_upload.py, one task per phase) and DataUploader
(one job at a time, as the seed's `_process_job`) run these functions.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path

import paramiko
import psycopg2

from camfleet.uploader.jobs import Job, Reject
from camfleet.uploader.session import CONNECTION_ERRORS, EventSession, LockLost
from camfleet.uploader.sftp import (
    LocalFileChanged,
    SftpConnection,
    remove_quietly,
    temp_path,
    upload_file,
)

log = logging.getLogger("camfleet.uploader")

# Errors that mean the SSH connection itself is gone (paramiko raises SSHException for
# "Server connection dropped"); anything else is about one file.
SFTP_CONNECTION_ERRORS = (paramiko.SSHException, EOFError, ConnectionError, TimeoutError)

# How much of an exception message goes into the ledger, the row and the artifacts:
# enough for the cause, bounded for a message that embeds a whole server reply.
MAX_REASON_CHARS = 300


class Phase(IntEnum):
    SCAN = 0
    CLAIM = 1
    INSERT = 2
    UPLOAD = 3
    UPDATE = 4
    MOVE = 5


# Final states of a job in one run.
UPLOADED = "uploaded"  # all four phases done in this run
ARCHIVED = "already-completed"  # row was completed by an earlier run; only moved now
FAILED = "failed"  # a phase failed; files left in place for the next run
REJECTED = "rejected"  # can never succeed; moved aside with the reason
WAITING = "waiting"  # not settled yet (still being written, or video not there yet)
BUSY = "busy"  # another uploader holds this event right now
GONE = "gone"  # another uploader finished it between our scan and our claim


@dataclass
class Outcome:
    json_name: str
    event_id: str | None = None
    phase: Phase = Phase.SCAN  # the last phase this job completed
    state: str | None = None  # None while the job is still going
    reason: str = ""
    video_bytes: int = 0
    # True when an earlier run had completed the row and this run only moved the files.
    completed_before: bool = False
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0


class Ledger:
    """Per-job record of one run: phases completed, final state, reason. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, Outcome] = {}
        self.rejects: list[Reject] = []

    def _get(self, json_name: str, event_id: str | None = None) -> Outcome:
        out = self._jobs.get(json_name)
        if out is None:
            out = self._jobs[json_name] = Outcome(json_name, event_id)
        return out

    def track(self, job: Job) -> None:
        with self._lock:
            self._get(job.json_name, job.event_id).video_bytes = job.video_size

    def passed(self, job: Job, phase: Phase) -> bool:
        with self._lock:
            out = self._jobs.get(job.json_name)
            return out is not None and out.phase >= phase

    def advance(self, job: Job, phase: Phase, completed_before: bool = False) -> None:
        with self._lock:
            out = self._get(job.json_name, job.event_id)
            out.phase = max(out.phase, phase)
            out.completed_before = out.completed_before or completed_before

    def completed_before(self, job: Job) -> bool:
        with self._lock:
            out = self._jobs.get(job.json_name)
            return out is not None and out.completed_before

    def finish(self, json_name: str, state: str, reason: str = "", event_id: str | None = None):
        with self._lock:
            out = self._get(json_name, event_id)
            if out.state is None:
                out.state = state
                out.reason = reason[:MAX_REASON_CHARS]
                out.seconds = time.monotonic() - out.started

    def reject(self, reject: Reject) -> None:
        self.finish(reject.json_name, REJECTED, reject.reason, reject.event_id)
        with self._lock:
            self.rejects.append(reject)

    def fail_open(self, jobs: list[Job], phase: Phase, reason: str) -> None:
        """Mark every job of `jobs` that is still going as failed in `phase`."""
        for job in jobs:
            self.finish(job.json_name, FAILED, f"{phase.name.lower()}: {reason}", job.event_id)

    def state_of(self, json_name: str) -> str | None:
        with self._lock:
            out = self._jobs.get(json_name)
            return out.state if out else None

    def has_failures(self) -> bool:
        """Any failed or rejected job with an event id (something to note on its row)."""
        with self._lock:
            return any(o.event_id and o.state in (FAILED, REJECTED) for o in self._jobs.values())

    def outcomes(self) -> list[Outcome]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda o: o.json_name)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(Counter(o.state or "unfinished" for o in self._jobs.values()))

    def progress(self) -> float:
        """Percent of the phase steps (claim..move) done over all tracked jobs."""
        with self._lock:
            jobs = [o for o in self._jobs.values() if o.state not in (WAITING, BUSY, GONE)]
            if not jobs:
                return 100.0
            steps = sum(int(Phase.MOVE) if o.state is not None else int(o.phase) for o in jobs)
            return round(100.0 * steps / (len(jobs) * int(Phase.MOVE)), 1)

    def rows(self) -> list[dict[str, object]]:
        """One row per job, for the Prefect table artifact and the CLI."""
        return [
            {
                "event": o.event_id or repr(o.json_name),  # an unusable name: quoted
                "state": o.state or "unfinished",
                "last phase": o.phase.name.lower(),
                "video bytes": o.video_bytes,
                "seconds": round(o.seconds, 3),
                "reason": o.reason,
            }
            for o in self.outcomes()
        ]


def describe_error(exc: BaseException) -> str:
    """A short, secret-free description: exception type and first line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:MAX_REASON_CHARS] if text else type(exc).__name__


# ---- claim ------------------------------------------------------------------------------


def claim_phase(
    session: EventSession, jobs: list[Job], pending_dir: Path, ledger: Ledger, logger=log
) -> list[Job]:
    """Lock the events; keep those we got whose files are still in `pending_dir`."""
    for job in jobs:
        ledger.track(job)
    got = set(session.claim(j.event_id for j in jobs))
    claimed = []
    for job in jobs:
        if job.event_id not in got:
            ledger.finish(job.json_name, BUSY, "another uploader holds this event", job.event_id)
            logger.info("event %s: another uploader is on it, skipped", job.event_id)
        elif not (pending_dir / job.json_name).exists():
            # Another run finished and moved it between our scan and our lock.
            session.release(job.event_id)
            ledger.finish(job.json_name, GONE, "finished by another uploader", job.event_id)
        else:
            ledger.advance(job, Phase.CLAIM)
            claimed.append(job)
    return claimed


def _drop_lost(session: EventSession, jobs: list[Job], ledger: Ledger, logger) -> list[Job]:
    lost = session.ensure()
    for job in jobs:
        if job.event_id in lost:
            ledger.finish(job.json_name, BUSY, "lock lost with the connection", job.event_id)
            logger.warning("event %s: database connection dropped, lock lost", job.event_id)
    return [j for j in jobs if j.event_id not in lost]


# ---- phase 1: INSERT --------------------------------------------------------------------


def insert_phase(
    session: EventSession, jobs: list[Job], ledger: Ledger, logger=log
) -> tuple[list[Job], list[Job]]:
    """Phase 1. Returns (jobs to upload, jobs an earlier run already completed).

    One statement for the whole batch (one commit); if the database refuses it, one
    statement per job, so the refusal lands on the job that caused it.
    """
    to_upload: list[Job] = []
    completed_before: list[Job] = []
    todo: list[Job] = []
    for job in _drop_lost(session, jobs, ledger, logger):
        if ledger.state_of(job.json_name) is not None:
            continue
        if ledger.passed(job, Phase.INSERT):
            to_upload.append(job)
        else:
            todo.append(job)
    if not todo:
        return to_upload, completed_before
    try:
        pending_ids: set[str] | None = session.insert_pending_many(todo)
    except CONNECTION_ERRORS:
        raise
    except (psycopg2.Error, LockLost) as exc:
        logger.warning("batch INSERT refused (%s); one by one", describe_error(exc))
        pending_ids = None
    for job in todo:
        if pending_ids is not None:
            pending = job.event_id in pending_ids
        else:
            pending = _insert_one(session, job, ledger, logger)
            if pending is None:
                continue
        if pending:
            ledger.advance(job, Phase.INSERT)
            to_upload.append(job)
        elif _completed_with_same_video(session, job, ledger):
            # A crash between UPDATE and the move: the upload is done, only move it.
            ledger.advance(job, Phase.UPDATE, completed_before=True)
            completed_before.append(job)
            logger.info("event %s was completed by an earlier run; archiving", job.event_id)
    return to_upload, completed_before


def _insert_one(session: EventSession, job: Job, ledger: Ledger, logger) -> bool | None:
    """INSERT one job: True pending, False already completed, None failed (in ledger)."""
    try:
        return session.insert_pending(job.event_id, job.metadata, job.video_size)
    except CONNECTION_ERRORS:
        raise
    except psycopg2.DataError as exc:
        # The database refuses this metadata as such: retrying cannot help.
        reason = f"database refused the metadata: {describe_error(exc)}"
        ledger.reject(Reject(job.json_name, reason, job.event_id, job.video_name))
    except (psycopg2.Error, LockLost) as exc:
        ledger.finish(job.json_name, FAILED, f"insert: {describe_error(exc)}", job.event_id)
        logger.error("event %s: INSERT failed, will retry: %s", job.event_id, describe_error(exc))
    return None


def _completed_with_same_video(session: EventSession, job: Job, ledger: Ledger) -> bool:
    """A completed row for this event id: ours (same size) or a clash (reject)."""
    row = session.get(job.event_id) or {}
    if row.get("video_bytes") in (None, job.video_size):
        return True
    ledger.reject(
        Reject(
            job.json_name,
            f"event id already completed with a different video "
            f"({row.get('video_bytes')} bytes, this one {job.video_size})",
            job.event_id,
            job.video_name,
        )
    )
    return False


# ---- phase 2: SFTP ----------------------------------------------------------------------


def _fence(holds: Callable[[str], bool] | None, event_id: str) -> Callable[[], None] | None:
    if holds is None:
        return None

    def check() -> None:
        if not holds(event_id):
            raise LockLost(f"event {event_id} is no longer locked by this run")

    return check


def upload_phase(
    connection: SftpConnection,
    jobs: list[Job],
    pending_dir: Path,
    ledger: Ledger,
    logger=log,
    client: paramiko.SFTPClient | None = None,
    holds: Callable[[str], bool] | None = None,
) -> list[Job]:
    """Phase 2 for one lane: video then JSON per job, over one SFTP channel.

    Raises when the connection itself is lost (the caller retries the lane; jobs this
    lane already uploaded are skipped then); per-job errors are recorded and the lane
    goes on. `client`: an SFTP channel to reuse (the caller closes it); by default
    the lane opens its own on the shared connection. `holds(event_id)`: whether this
    run still holds the event's lock, asked before each rename into place (a run whose
    database session died mid-transfer has lost the event to the next run, which
    writes the same temporary name).
    """
    jobs = [j for j in jobs if ledger.state_of(j.json_name) is None]
    if not jobs:
        return []
    uploaded: list[Job] = []
    own_client = client is None
    if client is None:
        client = connection.channel()
    try:
        dirs = {posixpath.dirname(j.remote_video_path) for j in jobs}
        dirs |= {posixpath.dirname(j.remote_json_path) for j in jobs}
        connection.ensure_dirs(client, *sorted(dirs))
        for job in jobs:
            if ledger.passed(job, Phase.UPLOAD):
                uploaded.append(job)
                continue
            fence = _fence(holds, job.event_id)
            try:
                upload_file(
                    client,
                    pending_dir / job.video_name,
                    job.remote_video_path,
                    expected_size=job.video_size,
                    before_rename=fence,
                )
                upload_file(
                    client,
                    pending_dir / job.json_name,
                    job.remote_json_path,
                    expected_size=job.json_size,
                    before_rename=fence,
                )
            except LockLost:
                # The temporary files are the new owner's now: leave them alone.
                ledger.finish(job.json_name, BUSY, "lock lost with the connection", job.event_id)
                logger.warning("event %s: lock lost mid-upload, left to its owner", job.event_id)
                continue
            except Exception as exc:
                if (
                    isinstance(exc, SFTP_CONNECTION_ERRORS)
                    or not connection.alive
                    or client.get_channel().closed
                ):
                    raise  # the connection is gone: the whole lane is retried
                for path in (job.remote_video_path, job.remote_json_path):
                    remove_quietly(client, temp_path(path))
                reason = describe_error(exc)
                if (
                    isinstance(exc, LocalFileChanged | FileNotFoundError)
                    and not (pending_dir / job.video_name).exists()
                ):
                    reason = "local file vanished during the upload"
                ledger.finish(job.json_name, FAILED, f"upload: {reason}", job.event_id)
                logger.error("event %s: SFTP upload failed, will retry: %s", job.event_id, reason)
                continue
            ledger.advance(job, Phase.UPLOAD)
            uploaded.append(job)
    finally:
        if own_client:
            with contextlib.suppress(Exception):
                client.close()
    return uploaded


def split_lanes(jobs: list[Job], lanes: int) -> list[list[Job]]:
    """Round-robin jobs into at most `lanes` non-empty lists."""
    lanes = max(1, min(lanes, len(jobs)))
    return [jobs[i::lanes] for i in range(lanes)] if jobs else []


# ---- phase 3: UPDATE --------------------------------------------------------------------


def update_phase(session: EventSession, jobs: list[Job], ledger: Ledger, logger=log) -> list[Job]:
    """Phase 3: mark rows completed with both remote paths (batch, then one by one)."""
    completed: list[Job] = []
    todo: list[Job] = []
    for job in _drop_lost(session, jobs, ledger, logger):
        if ledger.state_of(job.json_name) is not None:
            continue
        if ledger.passed(job, Phase.UPDATE):
            completed.append(job)
        else:
            todo.append(job)
    if not todo:
        return completed
    try:
        done_ids: set[str] | None = session.mark_completed_many(todo)
    except CONNECTION_ERRORS:
        raise
    except (psycopg2.Error, LockLost) as exc:
        logger.warning("batch UPDATE refused (%s); one by one", describe_error(exc))
        done_ids = None
    for job in todo:
        if done_ids is not None:
            done = job.event_id in done_ids
        else:
            try:
                done = session.mark_completed(
                    job.event_id, job.remote_video_path, job.remote_json_path
                )
            except CONNECTION_ERRORS:
                raise
            except (psycopg2.Error, LockLost) as exc:
                # The files are on the server but the row says pending: inconsistent
                # until the next run re-uploads (the same bytes, renamed over) and updates.
                reason = describe_error(exc)
                ledger.finish(job.json_name, FAILED, f"update: {reason}", job.event_id)
                logger.critical(
                    "event %s: UPDATE failed after upload (inconsistent until retried): %s",
                    job.event_id,
                    reason,
                )
                continue
        if not done:
            ledger.finish(job.json_name, FAILED, "update: row was not pending", job.event_id)
            logger.critical("event %s: row not pending at UPDATE", job.event_id)
            continue
        ledger.advance(job, Phase.UPDATE)
        completed.append(job)
    return completed


# ---- phase 4: move ----------------------------------------------------------------------


def move_phase(
    jobs: list[Job], pending_dir: Path, uploaded_dir: Path, ledger: Ledger, logger=log
) -> list[Job]:
    """Phase 4: move video, then JSON (the job's trigger goes last) to `uploaded_dir`."""
    moved: list[Job] = []
    uploaded_dir.mkdir(parents=True, exist_ok=True)
    for job in jobs:
        if ledger.state_of(job.json_name) is not None:
            continue
        try:
            for name in (job.video_name, job.json_name):
                src = pending_dir / name
                if src.exists() or not (uploaded_dir / name).exists():
                    shutil.move(src, uploaded_dir / name)
        except OSError as exc:
            # The row is completed; the next run sees that and only moves the files.
            ledger.finish(job.json_name, FAILED, f"move: {describe_error(exc)}", job.event_id)
            logger.error(
                "event %s: moving to %s failed: %s", job.event_id, uploaded_dir, describe_error(exc)
            )
            continue
        state = ARCHIVED if ledger.completed_before(job) else UPLOADED
        ledger.advance(job, Phase.MOVE)
        ledger.finish(job.json_name, state, event_id=job.event_id)
        moved.append(job)
    return moved


# ---- rejects ----------------------------------------------------------------------------


def set_aside(reject: Reject, pending_dir: Path, failed_dir: Path, logger=log) -> None:
    """Move a package that can never succeed to `failed_dir`, with `<json>.reason.txt`."""
    failed_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    # The name is the device's: quoted (repr) wherever it is written, so a name with a
    # newline or escape sequence cannot forge a log line.
    (failed_dir / f"{reject.json_name}.reason.txt").write_text(
        f"{stamp} camfleet event upload refused {reject.json_name!r}: {reject.reason}\n"
    )
    for name in (reject.video_name, reject.json_name):
        if name:
            # Another uploader sharing the directory may have set it aside first.
            with contextlib.suppress(FileNotFoundError):
                shutil.move(pending_dir / name, failed_dir / name)
    logger.error(
        "event package %r set aside in %s: %s", reject.json_name, failed_dir, reject.reason
    )


def record_outcomes(session: EventSession, ledger: Ledger, logger=log) -> None:
    """Make failures visible on the rows: last_error for retries, 'failed' for rejects."""
    outcomes = [o for o in ledger.outcomes() if o.event_id and o.state in (REJECTED, FAILED)]
    if not outcomes:
        return
    try:
        session.ensure()
    except psycopg2.Error as exc:
        logger.warning("could not record outcomes: %s", describe_error(exc))
        return
    for out in outcomes:
        if out.event_id is None:
            continue
        try:
            if out.state == REJECTED:
                session.mark_failed(out.event_id, out.reason)
            elif out.state == FAILED and out.phase >= Phase.CLAIM:
                session.note_error(out.event_id, out.reason)
        except psycopg2.Error as exc:
            logger.warning(
                "could not record the outcome of %s: %s", out.event_id, describe_error(exc)
            )
            return  # the database is down: the logs and artifacts still say it
