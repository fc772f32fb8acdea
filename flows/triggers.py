"""Capture-trigger flows (seed 003): the scheduler, manual triggers and the expiry sweep.

The scheduler does **not** create a flow run per capture. One run a minute:

1. ends the triggers whose time is up (pending -> expired, sent -> failed);
2. plans every enabled device's slots for the next `window_seconds` from its config
   (`interval_seconds`, staggered per device, and/or `cron`);
3. writes them in batches of up to 5,000 rows, one task per batch.

The rows carry their `scheduled_at`; the database announces each one and the API
instance holding the device's stream writes it when it is due. 1,000 devices every
10 s is 6,000 rows a minute: one flow run and two or three task runs, not 100 flow
runs a second. Windows overlap (2 minutes planned every minute) and slots are unique
per device, so a late or repeated run neither doubles nor drops a slot.

`manual-trigger` is one capture on demand (`prefect deployment run
'manual-trigger/manual-trigger' -p device_id=FLOOR1`); its run fails when the device
does not execute the trigger in time, so a dead camera shows red in the UI.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from camfleet import resolve
from camfleet.protocol import triggers as core
from tasks import triggers as trig

# Planned ahead on every run: two minutes when runs come every minute, so one late or
# missed run leaves no gap.
DEFAULT_WINDOW_SECONDS = 120
# A manual trigger's run polls its row this often while waiting for the capture.
MANUAL_POLL_SECONDS = 1.0


class TriggerNotExecuted(RuntimeError):
    """The device did not execute the trigger in time (the flow run fails with it)."""


# Safe to re-run: slots are unique per device, so a repeated window adds nothing twice.
@flow(
    name="trigger-scheduler",
    log_prints=False,
    retries=1,
    retry_delay_seconds=5,
    timeout_seconds=120,
)
def trigger_scheduler(
    window_seconds: int = DEFAULT_WINDOW_SECONDS, database_block: str | None = None
) -> dict:
    """Sweep, then plan and dispatch the next window of scheduled captures."""
    logger = get_run_logger()
    dsn = resolve.database_url(database_block)
    swept = trig.sweep_task(dsn)

    start = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
    end = start + timedelta(seconds=window_seconds)
    planned, refused = trig.plan_window_task(dsn, start, end)
    for device_id, reason in sorted(refused.items()):
        logger.warning("device %s: trigger config refused: %s", device_id, reason)

    run_id = str(flow_run.id) if flow_run.id else None
    created = 0
    for i in range(0, len(planned), trig.INSERT_BATCH_ROWS):
        created += trig.dispatch_batch_task(dsn, planned[i : i + trig.INSERT_BATCH_ROWS], run_id)

    summary = {
        "window_start": start.isoformat(),
        "window_end": end.isoformat(),
        "planned": len(planned),
        "created": created,
        "devices": len({p.device_id for p in planned}),
        "refused_configs": len(refused),
        "expired": len(swept["expired"]),
        "failed": len(swept["failed"]),
    }
    logger.info("trigger window %s", summary)
    return summary


@task(name="wait-for-trigger-execution", cache_policy=NO_CACHE)
def wait_for_execution(dsn: str, trigger_id: str, timeout_seconds: float) -> dict:
    deadline = time.monotonic() + timeout_seconds
    while True:
        state = trig.trigger_state(dsn, trigger_id)
        if state["status"] in core.FINAL_STATES or time.monotonic() >= deadline:
            return state
        time.sleep(MANUAL_POLL_SECONDS)


# No flow retries: a retry would be a second capture at another time, which the user
# asks for with a new run (the UI's Retry of a failed run does make a new trigger).
@flow(name="manual-trigger")
def manual_trigger(
    device_id: str,
    timeout_seconds: float = 120.0,
    label: str = "manual",
    database_block: str | None = None,
) -> dict:
    """Trigger one capture now and wait for it; the run fails if it is not executed."""
    logger = get_run_logger()
    dsn = resolve.database_url(database_block)
    run_id = str(flow_run.id) if flow_run.id else None
    trigger_id = trig.create_manual_task(dsn, device_id, timeout_seconds, label, run_id)
    logger.info("trigger %s created for %s", trigger_id, device_id)
    state = wait_for_execution(dsn, trigger_id, timeout_seconds)
    if state["status"] != core.EXECUTED:
        reason = state.get("failed_reason") or f"not executed within {timeout_seconds:g} s"
        trig.fail_trigger(dsn, trigger_id, reason)  # a final state, whatever happens next
        raise TriggerNotExecuted(f"trigger {trigger_id} for {device_id}: {reason}")
    logger.info("trigger %s executed: capture %s", trigger_id, state["capture_id"])
    return {"trigger_id": trigger_id, "status": state["status"], "capture_id": state["capture_id"]}


@flow(name="expire-triggers", retries=1, retry_delay_seconds=5, timeout_seconds=120)
def expire_triggers(
    execution_timeout_seconds: float = core.EXECUTION_TIMEOUT_SECONDS,
    database_block: str | None = None,
) -> dict:
    """End open triggers whose time is up; a table artifact lists them."""
    dsn = resolve.database_url(database_block)
    swept = trig.sweep_task(dsn, execution_timeout_seconds)
    rows = [{"trigger_id": t, "status": "expired"} for t in swept["expired"]]
    rows += [{"trigger_id": t, "status": "failed"} for t in swept["failed"]]
    if rows:
        create_table_artifact(rows[:1000], key="expired-triggers", description="Ended by time")
    return {"expired": len(swept["expired"]), "failed": len(swept["failed"])}
