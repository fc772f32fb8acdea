"""Prefect tasks over the `events` session (camfleet/uploader/session.py): phases 1 and 3.

The session itself (advisory locks, named queries) imports nothing of Prefect; these
tasks only add retries and run logging around the phase functions.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from camfleet.uploader import phases
from camfleet.uploader.session import EventSession

__all__ = [
    "EventSession",
    "claim_events",
    "insert_pending",
    "mark_completed",
    "record_outcomes",
]

# ---- Prefect tasks (flows/event_upload.py) -------------------------------------------
# Each runs one phase over the run's batch of jobs (a task run per event would cost the
# Prefect server more CPU than the upload itself). A task raises only when the database
# connection is gone; its retry reconnects, re-claims the locks and skips the jobs the
# ledger already shows done. Per-job errors are in the ledger, not task failures.


# 2 s, 4 s, 8 s: rides out a database restart or failover without holding a run for
# minutes; a longer outage is the next scheduled run's business.
DB_RETRIES = 3
DB_RETRY_DELAYS = exponential_backoff(backoff_factor=2)


@task(
    name="claim events",
    retries=DB_RETRIES,
    retry_delay_seconds=DB_RETRY_DELAYS,
    cache_policy=NO_CACHE,
)
def claim_events(session: EventSession, jobs, pending_dir, ledger):
    """Lock each event for this run; skip those another uploader holds."""
    claimed = phases.claim_phase(session, jobs, pending_dir, ledger, get_run_logger())
    get_run_logger().info("claimed %d of %d events", len(claimed), len(jobs))
    return claimed


@task(
    name="insert pending rows",
    retries=DB_RETRIES,
    retry_delay_seconds=DB_RETRY_DELAYS,
    cache_policy=NO_CACHE,
)
def insert_pending(session: EventSession, jobs, ledger):
    """Phase 1: an `events` row per job, status 'pending' (idempotent on event id)."""
    return phases.insert_phase(session, jobs, ledger, get_run_logger())


@task(
    name="mark rows completed",
    retries=DB_RETRIES,
    retry_delay_seconds=DB_RETRY_DELAYS,
    cache_policy=NO_CACHE,
)
def mark_completed(session: EventSession, jobs, ledger):
    """Phase 3: status 'completed' with both remote paths."""
    return phases.update_phase(session, jobs, ledger, get_run_logger())


@task(name="record outcomes", cache_policy=NO_CACHE)
def record_outcomes(session: EventSession, ledger) -> None:
    """Failed and rejected events get their reason on the row (best effort)."""
    phases.record_outcomes(session, ledger, get_run_logger())
