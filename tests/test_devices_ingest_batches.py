"""The window -> flow run assigner's I/O-free core: one run per window, created ahead,
and no waiting on Prefect right after it failed."""

from __future__ import annotations

import asyncio

from services.api import ingest_batches
from services.api.ingest_batches import WindowRuns


def test_one_run_per_window_next_created_ahead_and_backoff_after_failure():
    now = [1000.0]
    created: list[int] = []
    failing = [False]

    async def create(window: int) -> str | None:
        created.append(window)
        await asyncio.sleep(0)
        if failing[0]:
            raise ConnectionError("prefect down")
        return f"run-{window}"

    async def scenario():
        runs = WindowRuns(create, lambda: now[0], window_s=10)
        first = [await runs.run_for_now() for _ in range(5)]
        await asyncio.sleep(0.01)  # let the ahead-of-time creation finish
        assert created == [100, 101]  # this window once, the next one ahead
        now[0] = 1010.0
        second = await runs.run_for_now()
        assert created == [100, 101, 102]  # window 101 was ready: no wait, 102 ahead
        failing[0] = True
        now[0] = 1030.0
        down = await runs.run_for_now()
        calls = len(created)
        now[0] = 1031.0  # within RETRY_AFTER_FAILURE_S: answers at once, no call
        still_down = await runs.run_for_now()
        assert len(created) == calls
        failing[0] = False
        now[0] = 1030.0 + ingest_batches.RETRY_AFTER_FAILURE_S + 0.1
        back = await runs.run_for_now()
        await runs.close()
        return first, second, down, still_down, back

    first, second, down, still_down, back = asyncio.run(scenario())
    assert first == ["run-100"] * 5
    assert second == "run-101"
    assert down is None and still_down is None
    assert back == "run-103"
