"""prune-flow-runs deletes finished runs older than the retention, and nothing else."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import anyio
import pytest
from prefect import flow

from flows.maintenance import RETENTION_ENV, prune_flow_runs, retention_days
from tests.faults_common import wait_until
from tests.test_serve import _client_call


@flow(name="maintenance-fixture")
def _noop() -> None:
    return None


def test_retention_setting(monkeypatch):
    monkeypatch.setenv(RETENTION_ENV, "3")
    assert retention_days() == 3
    assert retention_days(5) == 5
    for bad in ("0", "-2", "forever", ""):
        monkeypatch.setenv(RETENTION_ENV, bad)
        with pytest.raises(ValueError):
            retention_days()


def test_prune_deletes_only_runs_that_ended_before_the_cutoff(prefect_api_url, monkeypatch):
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Completed, Failed, Running, Scheduled

    from flows.maintenance import prune_before

    old = datetime.now(UTC) - timedelta(days=10)

    async def make(client, states):
        runs = {}
        for name, state in states.items():
            run = await client.create_flow_run(_noop, name=name, state=Scheduled())
            await client.set_flow_run_state(run.id, state, force=True)
            runs[name] = run.id
        return runs

    # The server stamps end times itself, so "old" here means: ended before the cutoff.
    runs = _client_call(
        lambda c: make(
            c,
            {
                "ended-completed": Completed(),
                "ended-failed": Failed(),
                "long-scheduled": Scheduled(scheduled_time=old),  # never ended: kept
                "running": Running(),
            },
        )
    )
    cutoff = datetime.now(UTC) + timedelta(milliseconds=10)
    wait_until(lambda: datetime.now(UTC) > cutoff, 5, 0.01)
    runs |= _client_call(lambda c: make(c, {"ended-after-cutoff": Completed()}))
    assert anyio.run(prune_before, cutoff) >= 2

    async def exists(client):
        present = {}
        for name, run_id in runs.items():
            try:
                await client.read_flow_run(run_id)
                present[name] = True
            except ObjectNotFound:
                present[name] = False
        return present

    assert _client_call(exists) == {
        "ended-completed": False,
        "ended-failed": False,
        "long-scheduled": True,
        "running": True,
        "ended-after-cutoff": True,
    }

    monkeypatch.setenv(RETENTION_ENV, "7")
    summary = asyncio.run(prune_flow_runs())  # the flow: retention from the environment
    assert summary["retention_days"] == 7 and summary["deleted"] == 0


def test_old_result_files_are_deleted(tmp_path):
    import os

    from flows.maintenance import prune_local_results

    old, new = tmp_path / "old-result", tmp_path / "sub" / "new-result"
    new.parent.mkdir()
    for path in (old, new):
        path.write_bytes(b"{}")
    ten_days_ago = (datetime.now(UTC) - timedelta(days=10)).timestamp()
    os.utime(old, (ten_days_ago, ten_days_ago))
    assert prune_local_results(datetime.now(UTC) - timedelta(days=7), tmp_path) == 1
    assert not old.exists() and new.exists()
    assert prune_local_results(datetime.now(UTC), tmp_path / "missing") == 0
