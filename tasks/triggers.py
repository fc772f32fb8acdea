"""Capture-trigger work against PostgreSQL, as plain functions and as Prefect tasks.

The plain functions (`plan_window`, `insert_planned`, `create_manual`, `sweep`,
`trigger_state`) take a DSN and are what the CLI and tests call; the `@task` wrappers
add retries and names for the flows in `flows/triggers.py`.
"""

from __future__ import annotations

from datetime import datetime

from prefect import task
from prefect.cache_policies import NO_CACHE

from camfleet import db
from camfleet.protocol import triggers as core

# Rows per INSERT when materialising slots: one statement for a minute of 1,000
# devices at 10 s (6,000 rows) is ~0.1 s; bigger batches only lengthen the transaction.
INSERT_BATCH_ROWS = 5_000


def plan_window(dsn: str, start: datetime, end: datetime) -> tuple[list, dict[str, str]]:
    """Planned scheduled triggers for every enabled device, and the configs refused."""
    with db.transaction(dsn) as conn:
        devices = list(db.queries.triggers_schedulable_devices(conn))
    return core.plan(devices, start, end)


def insert_planned(dsn: str, planned: list, flow_run_id: str | None = None) -> int:
    """Insert planned slots in one statement; existing slots are skipped. Returns new rows."""
    if not planned:
        return 0
    with db.transaction(dsn) as conn:
        rows = db.queries.triggers_insert_scheduled_batch(
            conn,
            flow_run_id=flow_run_id,
            trigger_ids=[p.trigger_id for p in planned],
            device_ids=[p.device_id for p in planned],
            labels=[p.label for p in planned],
            scheduled_ats=[p.scheduled_at for p in planned],
            expires_ats=[p.expires_at for p in planned],
        )
        return len(list(rows))


def create_manual(
    dsn: str,
    device_id: str,
    ttl_seconds: float = core.MANUAL_TTL_SECONDS,
    label: str = "manual",
    flow_run_id: str | None = None,
    now: datetime | None = None,
) -> str:
    """A manual trigger row (the database announces it to the API instances)."""
    from datetime import UTC

    now = now or datetime.now(UTC)
    with db.transaction(dsn) as conn:
        device = db.queries.triggers_device(conn, device_id=device_id)
        if device is None:
            raise LookupError(f"no device {device_id!r}")
        row = db.queries.triggers_create_manual(
            conn,
            trigger_id=core.manual_trigger_id(device_id, now),
            device_id=device_id,
            label=label,
            expires_at=core.manual_expiry(now, ttl_seconds),
            flow_run_id=flow_run_id,
        )
        return row[0]


def sweep_rows(dsn: str, execution_timeout: float = core.EXECUTION_TIMEOUT_SECONDS) -> dict:
    """End open triggers whose time is up; (trigger_id, device_id) pairs per outcome."""
    reason = f"not executed within {int(execution_timeout)} s of being sent"
    with db.transaction(dsn) as conn:
        expired = list(db.queries.triggers_expire_due(conn))
        failed = list(
            db.queries.triggers_fail_unexecuted(
                conn, reason=reason, timeout_seconds=execution_timeout
            )
        )
    return {"expired": [(r[0], r[1]) for r in expired], "failed": [(r[0], r[1]) for r in failed]}


def sweep(dsn: str, execution_timeout: float = core.EXECUTION_TIMEOUT_SECONDS) -> dict:
    """End open triggers whose time is up: pending -> expired, sent -> failed."""
    rows = sweep_rows(dsn, execution_timeout)
    return {outcome: [trigger for trigger, _ in pairs] for outcome, pairs in rows.items()}


def trigger_state(dsn: str, trigger_id: str) -> dict | None:
    with db.transaction(dsn) as conn:
        row = db.queries.triggers_get(conn, trigger_id=trigger_id)
    if row is None:
        return None
    names = (
        "trigger_id device_id trigger_type status label scheduled_at sent_at executed_at "
        "expires_at capture_id failed_reason flow_run_id"
    ).split()
    return dict(zip(names, row, strict=True))


def fail_trigger(dsn: str, trigger_id: str, reason: str) -> None:
    with db.transaction(dsn) as conn:
        db.queries.triggers_fail_one(conn, trigger_id=trigger_id, reason=reason)


# --- Prefect tasks --------------------------------------------------------------------
# NO_CACHE on all: each call reads or writes the current trigger rows; a cached result
# (same inputs in a retried run) would reuse an old trigger or skip a sweep.


# persist_result=False: thousands of planned slots a minute are not worth keeping.
@task(
    name="plan-trigger-window",
    retries=3,
    retry_delay_seconds=5,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def plan_window_task(dsn: str, start: datetime, end: datetime) -> tuple[list, dict[str, str]]:
    return plan_window(dsn, start, end)


@task(name="dispatch-trigger-batch", retries=3, retry_delay_seconds=5, cache_policy=NO_CACHE)
def dispatch_batch_task(dsn: str, planned: list, flow_run_id: str | None = None) -> int:
    return insert_planned(dsn, planned, flow_run_id)


@task(name="create-manual-trigger", retries=3, retry_delay_seconds=2, cache_policy=NO_CACHE)
def create_manual_task(
    dsn: str, device_id: str, ttl_seconds: float, label: str, flow_run_id: str | None
) -> str:
    return create_manual(dsn, device_id, ttl_seconds, label, flow_run_id)


@task(name="sweep-expired-triggers", retries=3, retry_delay_seconds=5, cache_policy=NO_CACHE)
def sweep_task(dsn: str, execution_timeout: float = core.EXECUTION_TIMEOUT_SECONDS) -> dict:
    from tasks.events import emit_per_device

    rows = sweep_rows(dsn, execution_timeout)
    for outcome, pairs in rows.items():  # one event per device: automations in the UI
        emit_per_device(f"camfleet.trigger.{outcome}", ((d, t) for t, d in pairs))
    return {outcome: [trigger for trigger, _ in pairs] for outcome, pairs in rows.items()}
