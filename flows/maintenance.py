"""Housekeeping: old flow runs and old device log rows are deleted.

The recorder alone can create tens of thousands of flow runs a day; kept for ever they
slow the UI and the server's queries. `prune-flow-runs` (daily, prefect.yaml) deletes
runs that ended more than CAMFLEET_FLOW_RUN_RETENTION_DAYS days ago (default 14),
with their task runs, logs and states (the server cascades), and persisted result
files as old from the local result directory. Runs that have not ended
(scheduled, running, paused) are never touched, whatever their age.

The assembler writes a `device_publish_log` row per MQTT message (47 per image) and a
`device_status` row per status message; kept for ever the publish log is the first
limit of the database (docs/scaling.md). `prune-device-logs` (hourly, prefect.yaml)
deletes publish-log rows older than CAMFLEET_PUBLISH_LOG_RETENTION_DAYS (default 7)
and status rows older than CAMFLEET_DEVICE_STATUS_RETENTION_DAYS (default 30), in
batches of PRUNE_BATCH rows, each batch its own transaction. `device_errors` is not
pruned: the console lists a device's latest errors whatever their age, and its rows
come from failures (throttled per device), not from every image.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prefect import flow, get_client, get_run_logger

from camfleet import db, resolve
from camfleet.settings import Settings

# Retention periods: camfleet/settings.py (CAMFLEET_FLOW_RUN_RETENTION_DAYS, 14;
# CAMFLEET_PUBLISH_LOG_RETENTION_DAYS, 7: the fleet report's default window reads the
# publish log; CAMFLEET_DEVICE_STATUS_RETENTION_DAYS, 30: one status row per wake, read
# only as the latest 20, the seed's monitoring query).
# Deleted per run: bounds one run's load on the server; the next run continues.
DEFAULT_MAX_DELETES = 20_000
PAGE = 200


# Rows per DELETE, each batch its own transaction: the row locks, the WAL and the dead
# tuples of one statement stay small while the assembler keeps inserting.
PRUNE_BATCH = 5_000
# Rows deleted per table per run: bounds one run (~minutes, docs/scaling.md); the
# summary says when it stopped there, and the next run continues.
DEFAULT_MAX_LOG_DELETES = 20_000_000


def retention_days(value: int | str | None = None, setting: str = "flow_run_retention_days") -> int:
    """A run's retention: its parameter, else the setting (camfleet/settings.py, read
    afresh: a retry after fixing the variable sees the new value). At least 1 day."""
    if value is None:
        return getattr(Settings(), setting)  # the model refuses < 1 with the variable's name
    days = int(value)
    if days < 1:
        raise ValueError(f"a retention of at least 1 day, not {value!r}")
    return days


async def prune_before(cutoff: datetime, max_deletes: int = DEFAULT_MAX_DELETES) -> int:
    """Delete flow runs in a final state that ended before `cutoff`; returns how many."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterEndTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import TERMINAL_STATES

    old = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(TERMINAL_STATES))),
        end_time=FlowRunFilterEndTime(before_=cutoff),
    )
    deleted = 0
    async with get_client() as client:
        while deleted < max_deletes:
            limit = min(PAGE, max_deletes - deleted)
            page = await client.read_flow_runs(flow_run_filter=old, limit=limit)
            if not page:
                break
            for run in page:
                await client.delete_flow_run(run.id)
            deleted += len(page)
    return deleted


def prune_local_results(cutoff: datetime, root: Path | None = None) -> int:
    """Delete persisted result files older than `cutoff` from the local result directory
    (deployments/results.py); a result storage block keeps its own lifecycle rules."""
    if root is None:
        from prefect.settings import get_current_settings

        results = get_current_settings().results
        if results.default_storage_block:
            return 0
        root = Path(results.local_storage_path)
    if not root.is_dir():
        return 0
    deleted = 0
    limit = cutoff.timestamp()
    for path in root.rglob("*"):
        # lstat: a symlink planted in the directory is judged (and removed) itself
        if path.is_file() and not path.is_symlink() and path.lstat().st_mtime < limit:
            path.unlink(missing_ok=True)
            deleted += 1
    return deleted


@flow(name="prune-flow-runs", retries=1, retry_delay_seconds=60, timeout_seconds=3600)
async def prune_flow_runs(
    retention_days_override: int | None = None, max_deletes: int = DEFAULT_MAX_DELETES
) -> dict:
    """Delete flow runs that ended more than the retention period ago."""
    days = retention_days(retention_days_override)
    cutoff = datetime.now(UTC) - timedelta(days=days)
    deleted = await prune_before(cutoff, max_deletes)
    results = prune_local_results(cutoff)
    get_run_logger().info(
        "deleted %d flow runs and %d result files older than %s", deleted, results, cutoff
    )
    return {
        "retention_days": days,
        "cutoff": cutoff.isoformat(),
        "deleted": deleted,
        "result_files_deleted": results,
    }


def prune_rows(
    dsn: str,
    batch_query,
    cutoff: datetime,
    max_deletes: int = DEFAULT_MAX_LOG_DELETES,
    batch: int = PRUNE_BATCH,
) -> int:
    """Run `batch_query` (a `prune_*_batch` query) until no row older than `cutoff` is
    left or `max_deletes` rows are gone, committing after each batch; returns how many."""
    if max_deletes < 0 or batch < 1:
        raise ValueError(f"max_deletes must be >= 0 and batch >= 1, not {max_deletes}, {batch}")
    deleted = 0
    conn = db.connect(dsn)
    try:
        while deleted < max_deletes:
            size = min(batch, max_deletes - deleted)
            with conn:  # commits this batch: its locks are released before the next
                n = batch_query(conn, cutoff=cutoff, batch=size)
            deleted += n
            if n < size:
                break
    finally:
        conn.close()
    return deleted


@flow(name="prune-device-logs", retries=1, retry_delay_seconds=60, timeout_seconds=3600)
def prune_device_logs(
    publish_log_retention_days: int | None = None,
    device_status_retention_days: int | None = None,
    max_deletes: int = DEFAULT_MAX_LOG_DELETES,
    database_block: str | None = None,
) -> dict:
    """Delete publish-log and status rows older than their retention periods."""
    log_days = retention_days(publish_log_retention_days, "publish_log_retention_days")
    status_days = retention_days(device_status_retention_days, "device_status_retention_days")
    dsn = resolve.database_url(database_block)
    now = datetime.now(UTC)
    logger = get_run_logger()
    summary: dict = {"max_deletes": max_deletes}
    for table, days, query in (
        ("device_publish_log", log_days, db.queries.prune_publish_log_batch),
        ("device_status", status_days, db.queries.prune_device_status_batch),
    ):
        cutoff = now - timedelta(days=days)
        started = time.monotonic()
        deleted = prune_rows(dsn, query, cutoff, max_deletes)
        seconds = round(time.monotonic() - started, 1)
        logger.info("%s: deleted %d rows older than %s in %.1f s", table, deleted, cutoff, seconds)
        if deleted >= max_deletes:
            logger.warning(
                "%s: stopped at max_deletes=%d; older rows remain for the next run",
                table,
                max_deletes,
            )
        summary[table] = {
            "retention_days": days,
            "cutoff": cutoff.isoformat(),
            "deleted": deleted,
            "seconds": seconds,
            "stopped_at_max": deleted >= max_deletes,
        }
    return summary
