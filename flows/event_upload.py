"""Event upload (seed 001): `pending_upload/` -> SFTP + `events` -> `uploaded/`.

One run:

1. scan `pending_upload/` for settled `[event_id].json` + `[event_id].mp4` packages;
   set aside the ones that can never succeed (with the reason next to them);
2. claim the events (PostgreSQL advisory locks: an overlapping run skips them);
3. Phase 1: INSERT each `events` row as 'pending';
4. Phase 2: SFTP video then JSON, in a few concurrent lanes on one SSH connection;
5. Phase 3: UPDATE the rows to 'completed' with both remote paths;
6. Phase 4: move both local files to `uploaded/`.

Each phase is one retried task over the whole batch and passes on only the jobs that
made it, so the move happens if and only if INSERT, both uploads and UPDATE succeeded
for that event; everything else stays in `pending_upload/` for the next run. A
progress artifact follows the phases; a summary table and a per-event table close the
run. The run ends Failed when any event failed (it is retried by the next run).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.context import SyncClientContext
from prefect.utilities.annotations import quote

from camfleet.settings import Settings
from camfleet.uploader import phases
from camfleet.uploader.config import UploaderConfig
from camfleet.uploader.jobs import Job
from camfleet.uploader.phases import Ledger, Phase
from camfleet.uploader.uploader import scan
from tasks.database import (
    EventSession,
    claim_events,
    insert_pending,
    mark_completed,
    record_outcomes,
)
from tasks.sftp import SftpConnection, upload_lane

# Where a deployment without a config_path parameter finds the seed's config file.
CONFIG_ENV = "CAMFLEET_UPLOADER_CONFIG"  # camfleet/settings.py: uploader_config
# Rows in the per-event table artifact: enough to see every event of a normal run;
# a backlog run of thousands shows the first ones and says how many it left out.
MAX_ARTIFACT_ROWS = 500


class EventsNotUploaded(RuntimeError):
    """Some events failed in this run; their files stay for the next run."""


@task(name="scan pending_upload", cache_policy=NO_CACHE)
def scan_pending(config: UploaderConfig, remote_dirs: tuple[str, str], ledger: Ledger):
    """Settled, valid packages, oldest first; rejects are moved aside with the reason."""
    result = scan(config, remote_dirs, ledger)
    get_run_logger().info(
        "%d ready, %d waiting, %d set aside in %s",
        len(result.ready),
        len(result.waiting),
        len(result.rejected),
        config.failed_dir,
    )
    return result.ready


@task(name="move to uploaded", cache_policy=NO_CACHE)
def move_to_uploaded(jobs: list[Job], config: UploaderConfig, ledger: Ledger) -> list[Job]:
    """Phase 4: both local files to `uploaded/`, now that the remote side is durable."""
    return phases.move_phase(
        jobs, config.pending_dir, config.uploaded_dir, ledger, get_run_logger()
    )


@task(name="set aside rejected", cache_policy=NO_CACHE)
def set_aside_rejected(config: UploaderConfig, ledger: Ledger, jobs: list[Job]) -> None:
    """Packages a phase found unusable (e.g. the database refused the metadata)."""
    names = {j.json_name for j in jobs}
    for reject in ledger.rejects:
        if reject.json_name in names:
            phases.set_aside(reject, config.pending_dir, config.failed_dir, get_run_logger())


@flow(name="event-upload", log_prints=False)
async def event_upload(
    config_path: str | None = None,
    sftp_block: str | None = None,
    database_block: str | None = None,
    task_retries: int | None = None,
    retry_delay_seconds: float | None = None,
) -> dict[str, Any]:
    """Upload every settled event package in `pending_upload/` (seed 001's phases).

    config_path: the seed's config file (`{"uploader": {...}}`; default: the
    CAMFLEET_UPLOADER_CONFIG variable, else config.json, and no run without one); sftp_block and
    database_block: saved `camfleet-sftp-server` / `camfleet-postgres` blocks to use
    instead of its `sftp` / `database` sections. task_retries, retry_delay_seconds:
    override the phases' retries (default 3, backoff 2 s, 4 s, 8 s).
    """
    started = time.monotonic()
    if config_path is None:
        config_path = Settings().uploader_config
        if not Path(config_path).is_file():
            get_run_logger().warning(
                "no uploader config at %s (set %s or pass config_path): nothing to do",
                config_path,
                CONFIG_ENV,
            )
            return {"counts": {}, "skipped": f"no config at {config_path}"}
    config = load_config(config_path, sftp_block, database_block)
    await load_blocks(config)
    server = config.sftp_server()
    ledger = Ledger()
    progress = await acreate_progress_artifact(
        0.0, key="event-upload-progress", description="phases done over this run's events"
    )

    phase = PhaseRunner(ledger, task_retries, retry_delay_seconds)
    session = EventSession(config.database_dsn())  # both connect on first use
    connection = SftpConnection(server)
    # One sync Prefect client for every phase task: without it each sync task called
    # from this async flow builds its own client (and TLS context), the largest share
    # of the flow's own CPU in bench/bench_sftp_upload.py's profile.
    client_context = SyncClientContext.get_or_create()
    client_context.__enter__()
    try:
        jobs = scan_pending(
            config, (server.remote_video_dir, server.remote_json_dir), quote(ledger)
        )
        claimed = (
            phase(Phase.CLAIM, claim_events, session, jobs, config.pending_dir, ledger, on=jobs)
            or []
        )
        to_upload, completed_before = phase(
            Phase.INSERT, insert_pending, session, claimed, ledger, on=claimed
        ) or ([], [])
        await aupdate_progress_artifact(progress, ledger.progress())

        uploaded = upload_in_lanes(connection, to_upload, config, ledger, phase, session)
        await aupdate_progress_artifact(progress, ledger.progress())

        completed = (
            phase(Phase.UPDATE, mark_completed, session, uploaded, ledger, on=uploaded) or []
        )
        if completed or completed_before:
            move_to_uploaded(quote(completed + completed_before), config, quote(ledger))
        if ledger.rejects:
            set_aside_rejected(config, quote(ledger), quote(jobs))
        if ledger.has_failures():
            record_outcomes(session, quote(ledger))
    finally:
        client_context.__exit__(None, None, None)
        connection.close()
        session.close()
    await aupdate_progress_artifact(progress, 100.0)
    summary = await publish_summary(ledger, time.monotonic() - started)

    failed = summary["counts"].get(phases.FAILED, 0)
    _emit_upload_events(summary["counts"])
    if failed:
        raise EventsNotUploaded(
            f"{failed} event(s) not uploaded in this run (left in place for the next run); "
            "see the event-upload-events artifact"
        )
    return summary


def _emit_upload_events(counts: dict[str, int]) -> None:
    """camfleet.event-upload.uploaded / .failed for this host, with the run's counts."""
    from tasks.events import emit_for_host

    if counts.get(phases.UPLOADED, 0):
        emit_for_host("camfleet.event-upload.uploaded", dict(counts))
    if counts.get(phases.FAILED, 0):
        emit_for_host("camfleet.event-upload.failed", dict(counts))


async def load_blocks(config: UploaderConfig) -> None:
    """Fill the `sftp` / `database` sections from their named blocks (Block.load would
    hand an async flow a coroutine)."""
    from blocks.postgres import PostgresDatabase
    from blocks.sftp import SftpServer
    from camfleet.settings import get_settings

    if config.sftp is None and config.sftp_block:
        config.sftp = await SftpServer.aload(config.sftp_block)
    if config.database is None:
        name = config.database_block or get_settings().database_block
        if name:
            config.database = await PostgresDatabase.aload(name)


def load_config(
    config_path: str, sftp_block: str | None, database_block: str | None
) -> UploaderConfig:
    config = UploaderConfig.from_file(config_path)
    if sftp_block:
        config.sftp, config.sftp_block = None, sftp_block
    if database_block:
        config.database, config.database_block = None, database_block
    return config


class PhaseRunner:
    """Runs a phase task; if it still fails after its retries, its jobs fail for this run.

    The run goes on with the jobs that made it (none, for that phase) and reports the
    rest: a failed phase never moves or deletes anything.
    """

    def __init__(self, ledger: Ledger, retries: int | None, retry_delay_seconds: float | None):
        self.ledger = ledger
        self.options: dict[str, Any] = {}
        if retries is not None:
            self.options["retries"] = retries
        if retry_delay_seconds is not None:
            self.options["retry_delay_seconds"] = retry_delay_seconds

    def task(self, task_fn):
        return task_fn.with_options(**self.options) if self.options else task_fn

    def fail(self, jobs: list[Job], phase: Phase, exc: BaseException) -> None:
        reason = phases.describe_error(exc)
        self.ledger.fail_open(jobs, phase, reason)
        get_run_logger().error("%s failed for %d events: %s", phase.name.lower(), len(jobs), reason)

    def __call__(self, phase: Phase, task_fn, *args, on: list[Job]):
        if not on:
            return None
        try:
            # quote: the job lists and the ledger hold no futures, so Prefect need not
            # walk them (per event, per task) looking for some.
            return self.task(task_fn)(*(quote(a) for a in args))
        except Exception as exc:
            self.fail(on, phase, exc)
            return None


def upload_in_lanes(
    connection: SftpConnection,
    jobs: list[Job],
    config: UploaderConfig,
    ledger: Ledger,
    phase: PhaseRunner,
    session: EventSession,
) -> list[Job]:
    """Phase 2 in `concurrency` lanes at once, all on one SSH connection."""
    lanes = phases.split_lanes(jobs, config.concurrency)
    upload = phase.task(upload_lane)
    futures = [
        upload.submit(connection, quote(lane), config.pending_dir, quote(ledger), session.holds)
        for lane in lanes
    ]
    uploaded: set[str] = set()
    for lane, future in zip(lanes, futures, strict=True):
        try:
            uploaded |= {job.json_name for job in future.result()}
        except Exception as exc:
            # What the lane finished before it gave up goes on to UPDATE and the move.
            done = {job.json_name for job in lane if ledger.passed(job, Phase.UPLOAD)}
            uploaded |= done
            phase.fail([job for job in lane if job.json_name not in done], Phase.UPLOAD, exc)
    return [job for job in jobs if job.json_name in uploaded]  # scan order


async def publish_summary(ledger: Ledger, seconds: float) -> dict[str, Any]:
    counts = ledger.counts()
    rows = ledger.rows()
    done = counts.get(phases.UPLOADED, 0)
    summary = {
        "counts": counts,
        "seconds": round(seconds, 3),
        "events_per_second": round(done / seconds, 1) if seconds > 0 else 0.0,
        "bytes_uploaded": sum(r["video bytes"] for r in rows if r["state"] == phases.UPLOADED),
    }
    await acreate_table_artifact(
        [{"state": state, "events": n} for state, n in sorted(counts.items())]
        + [{"state": "(seconds)", "events": summary["seconds"]}],
        key="event-upload-summary",
        description=f"Event upload: {done} uploaded in {seconds:.1f}s",
    )
    if rows:
        shown = rows[:MAX_ARTIFACT_ROWS]
        note = "" if len(rows) <= MAX_ARTIFACT_ROWS else f" (first {len(shown)} of {len(rows)})"
        await acreate_table_artifact(
            shown, key="event-upload-events", description=f"One row per event{note}"
        )
    get_run_logger().info("event upload: %s in %.2fs", counts, seconds)
    return summary


if __name__ == "__main__":
    import asyncio
    import sys

    asyncio.run(event_upload(sys.argv[1] if len(sys.argv) > 1 else None))
