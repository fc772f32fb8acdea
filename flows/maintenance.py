"""Housekeeping of the Prefect server's own data: old flow runs are deleted.

The recorder alone can create tens of thousands of flow runs a day; kept for ever they
slow the UI and the server's queries. `prune-flow-runs` (daily, prefect.yaml) deletes
runs that ended more than CAMFLEET_FLOW_RUN_RETENTION_DAYS days ago (default 14),
with their task runs, logs and states (the server cascades), and persisted result
files as old from the local result directory. Runs that have not ended
(scheduled, running, paused) are never touched, whatever their age.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prefect import flow, get_client, get_run_logger

RETENTION_ENV = "CAMFLEET_FLOW_RUN_RETENTION_DAYS"
DEFAULT_RETENTION_DAYS = 14
# Deleted per run: bounds one run's load on the server; the next run continues.
DEFAULT_MAX_DELETES = 20_000
PAGE = 200


def retention_days(value: int | str | None = None) -> int:
    raw = value if value is not None else os.environ.get(RETENTION_ENV, DEFAULT_RETENTION_DAYS)
    days = int(raw)
    if days < 1:
        raise ValueError(f"{RETENTION_ENV} must be at least 1 day, not {raw!r}")
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
