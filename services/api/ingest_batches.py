"""Which Prefect flow run processes an ingest item: one run per time window, not per item.

At hundreds of ingests per second a flow run per item is impossible (the Prefect server
spends 35-50 ms of CPU per run; a served run spawns a process). Instead time is cut into
windows of WINDOW_S seconds; for each window the API creates, ahead of time, one flow
run of the `lifelog-ingest-processing` deployment, scheduled to start PROCESSING_DELAY_S
after the window closes. Every item ingested during the window gets that run's id as
its `task_id` (stored in captures.flow_run_id); the run processes exactly its items.

The run is created with an idempotency key derived from the window, so several API
instances share one run per window. When Prefect is unreachable or the deployment does
not exist, items get no run (task_id null) and the next run that starts adopts them.

`WindowRuns` is the I/O-free part (which window, what to create when); `PrefectRuns`
is the thin shell that talks to the Prefect API.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

log = logging.getLogger("camfleet.api.ingest")

DEPLOYMENT_NAME = "lifelog-ingest-processing/lifelog-ingest-processing"
# Ten seconds keeps Prefect's load at 0.1 flow runs/s per API fleet whatever the ingest
# rate, while an item still starts processing within ~15 s of its ingest.
WINDOW_S = 10
# Items of a window are committed a few ms after their run id is handed out; starting
# the run this long after the window closes leaves every such commit far behind.
PROCESSING_DELAY_S = 5
# After a failed creation (Prefect down), ingests do not wait on Prefect again for this
# long: they answer task_id null at full speed and the next run adopts the items.
RETRY_AFTER_FAILURE_S = 5.0
# An ingest waits at most this long for a run id before answering without one. Only
# the first ingest after start-up (or after an outage) waits at all: later windows'
# runs are created ahead. A cold Prefect client takes 1-3 s on a busy small box.
CREATE_TIMEOUT_S = 5.0


def window_of(now: float, window_s: int = WINDOW_S) -> int:
    return math.floor(now / window_s)


def window_start(window: int, window_s: int = WINDOW_S) -> datetime:
    return datetime.fromtimestamp(window * window_s, UTC)


class WindowRuns:
    """Run ids per window, created once each, the next one created ahead of need."""

    def __init__(
        self,
        create: Callable[[int], Awaitable[str | None]],
        clock: Callable[[], float],
        window_s: int = WINDOW_S,
        close: Callable[[], Awaitable[None]] | None = None,
        create_timeout_s: float = CREATE_TIMEOUT_S,
    ) -> None:
        self._create = create
        self._create_timeout_s = create_timeout_s
        self._close = close
        self._clock = clock
        self.window_s = window_s
        self._runs: dict[int, asyncio.Future] = {}
        self._failed_at: float | None = None

    def _start(self, window: int) -> asyncio.Future:
        fut = self._runs.get(window)
        if fut is None:
            fut = self._runs[window] = asyncio.ensure_future(self._create_checked(window))
        return fut

    async def _create_checked(self, window: int) -> str | None:
        try:
            run_id = await self._create(window)
        except Exception as exc:  # Prefect down, network error: ingest goes on without
            log.warning("cannot create the processing flow run: %r", exc)
            run_id = None
        if run_id is None:
            self._failed_at = self._clock()
            self._runs.pop(window, None)  # try again later
        return run_id

    def prepare(self) -> None:
        """Start creating the current window's run now (API start-up), so the first
        ingest does not wait for a cold Prefect client."""
        self._start(window_of(self._clock(), self.window_s))

    async def run_for_now(self) -> str | None:
        now = self._clock()
        if self._failed_at is not None and now - self._failed_at < RETRY_AFTER_FAILURE_S:
            return None
        window = window_of(now, self.window_s)
        for old in [w for w in self._runs if w < window]:
            del self._runs[old]
        fut = self._start(window)
        self._start(window + 1)  # ahead of need: the next window never waits on Prefect
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self._create_timeout_s)
        except TimeoutError:
            return None

    async def close(self) -> None:
        for fut in self._runs.values():
            fut.cancel()
        self._runs.clear()
        if self._close is not None:
            await self._close()


class PrefectRuns:
    """Creates the window's flow run from the processing deployment (Prefect API)."""

    def __init__(self, deployment_name: str = DEPLOYMENT_NAME, window_s: int = WINDOW_S):
        self.deployment_name = deployment_name
        self.window_s = window_s
        self._deployment_id = None
        self._client = None

    async def _get_client(self):
        if self._client is None:
            from prefect.client.orchestration import get_client

            self._client = get_client()
            await self._client.__aenter__()
        return self._client

    async def create(self, window: int) -> str | None:
        from prefect.exceptions import ObjectNotFound
        from prefect.states import Scheduled

        client = await self._get_client()
        if self._deployment_id is None:
            try:
                deployment = await client.read_deployment_by_name(self.deployment_name)
            except ObjectNotFound:
                log.warning("deployment %s not found: ingest items wait", self.deployment_name)
                return None
            self._deployment_id = deployment.id
        starts = window_start(window + 1, self.window_s) + timedelta(seconds=PROCESSING_DELAY_S)
        run = await client.create_flow_run_from_deployment(
            self._deployment_id,
            parameters={"window_start": window_start(window, self.window_s).isoformat()},
            state=Scheduled(scheduled_time=starts),
            idempotency_key=f"lifelog-ingest-window-{self.window_s}-{window}",
        )
        return str(run.id)

    def window_runs(
        self, clock: Callable[[], float], create_timeout_s: float = CREATE_TIMEOUT_S
    ) -> WindowRuns:
        return WindowRuns(
            self.create, clock, self.window_s, close=self.close, create_timeout_s=create_timeout_s
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.__aexit__(None, None, None)
            self._client = None


def runs_from_environment() -> WindowRuns | None:
    """The API's assigner when a Prefect API is configured (PREFECT_API_URL), else None."""
    if not os.environ.get("PREFECT_API_URL"):
        return None
    return PrefectRuns().window_runs(time.time)
