"""What a stopped or killed serve process leaves behind, cleaned up when it starts again.

`camfleet up` serves its deployments from one process (deployments/serve.py). When
that process stops, is killed, or its machine reboots, three things can remain:

- runs it had taken (Pending: being submitted; Running; Cancelling) that nobody will
  ever finish. Runs of deployments tagged `resume-after-restart` (their work is tied
  to their run id, like a Lifelog window's items) are rescheduled to run now; the
  others are marked Crashed, so the UI shows what happened and nothing looks busy;
- routine runs that fell due while it was down. Replaying an hour of every-minute
  runs would delay the user's own runs for minutes and do nothing the next one does
  not do, so late auto-scheduled runs of interval deployments are deleted (a missed
  daily report, a cron deployment, is kept and runs);
- nothing else: ad-hoc runs still waiting (Scheduled) run as usual.

Only runs of the deployments this process serves are touched, and only before it
starts taking runs, so it never races its own submissions.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

log = logging.getLogger("camfleet.deployments")

CRASH_MESSAGE = "camfleet stopped while this run was in progress"
RESCHEDULE_MESSAGE = "Rescheduled: camfleet stopped while this run was in progress"
# A routine run this late when the process starts is one it missed while stopped.
LATE_AFTER = timedelta(seconds=60)
PAGE = 200


async def recover_interrupted_runs(
    deployments: dict[UUID, dict[str, Any]], resume_tag: str, client=None
) -> dict[str, int]:
    """Crash or reschedule interrupted runs; delete missed routine runs. Returns counts."""
    from prefect import get_client

    if client is None:
        async with get_client() as own:
            return await recover_interrupted_runs(deployments, resume_tag, own)

    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed, Scheduled

    now = datetime.now(UTC)
    counts = {"crashed": 0, "rescheduled": 0, "missed_deleted": 0}
    interrupted = await _runs(
        client, deployments, [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]
    )
    for run in interrupted:
        definition = deployments[run.deployment_id]
        if resume_tag in (definition.get("tags") or []):
            state = Scheduled(scheduled_time=now, name="Rescheduled", message=RESCHEDULE_MESSAGE)
            counts["rescheduled"] += 1
        else:
            state = Crashed(message=CRASH_MESSAGE)
            counts["crashed"] += 1
        await client.set_flow_run_state(run.id, state, force=True)
        log.info("flow run %s (%s): %s", run.name, definition["name"], state.name)

    routine = {i: d for i, d in deployments.items() if _has_interval_schedule(d)}
    if routine:
        for run in await _runs(client, routine, [StateType.SCHEDULED], before=now - LATE_AFTER):
            if run.auto_scheduled:
                await client.delete_flow_run(run.id)
                counts["missed_deleted"] += 1
    return counts


def _has_interval_schedule(definition: dict[str, Any]) -> bool:
    return any("interval" in s for s in definition.get("schedules") or [])


async def _runs(client, deployments, state_types, before: datetime | None = None) -> list:
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )

    flow_filter = FlowRunFilter(
        deployment_id=FlowRunFilterDeploymentId(any_=list(deployments)),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=state_types)),
    )
    if before is not None:
        flow_filter.expected_start_time = FlowRunFilterExpectedStartTime(before_=before)
    runs, offset = [], 0
    while True:
        page = await client.read_flow_runs(flow_run_filter=flow_filter, limit=PAGE, offset=offset)
        runs += page
        if len(page) < PAGE:
            return runs
        offset += PAGE
