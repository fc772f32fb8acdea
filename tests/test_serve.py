"""`camfleet up`'s deployments come from prefect.yaml, and a stop leaves nothing stuck.

The fast tests read prefect.yaml and build the served deployments without a server. The
restart test serves two deployments against a real Prefect server, kills the serve
process (and its flow runs) with SIGKILL mid-run, starts it again, and checks that the
interrupted runs end Crashed or run again; then it stops it with SIGINT (Ctrl-C) and
checks it exits cleanly with no run left Pending or Running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
import yaml

from deployments import serve
from tests.faults_common import wait_until
from tests.test_api_commands_helpers import add_device

ROOT = Path(__file__).resolve().parent.parent
STARTED = "recovered after the previous stop"


def test_served_deployments_are_prefect_yaml_minus_device_side():
    raw = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    device_side = {d["name"] for d in raw if "device-side" in (d.get("tags") or [])}
    assert device_side == {"edge-batch-upload"}
    defs = serve.served_definitions()
    assert {d["name"] for d in defs} == {d["name"] for d in raw} - device_side
    built = {d.name: d for d in serve.build(defs)}
    for d in defs:
        deployment = built[d["name"]]
        assert deployment.parameters == (d.get("parameters") or {})
        # the same schedules, active or paused as written
        expected = [
            ("cron", s["cron"], s.get("active", True))
            if "cron" in s
            else ("interval", float(s["interval"]), s.get("active", True))
            for s in d.get("schedules") or []
        ]
        got = [
            ("cron", s.schedule.cron, s.active)
            if hasattr(s.schedule, "cron")
            else ("interval", s.schedule.interval.total_seconds(), s.active)
            for s in deployment.schedules or []
        ]
        assert got == expected, d["name"]
        limit = d.get("concurrency_limit")
        if isinstance(limit, dict):
            assert deployment.concurrency_limit == limit["limit"]
            assert (
                deployment.concurrency_options.collision_strategy.value
                == (limit["collision_strategy"])
            )


def test_routine_deployments_cannot_overlap_and_leave_room_for_ad_hoc_runs():
    defs = {d["name"]: d for d in serve.served_definitions()}
    for name in ("trigger-scheduler", "evaluate-captures", "event-upload", "expire-triggers"):
        assert defs[name]["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    routine = sum(serve.limit_of(d) for d in defs.values())
    assert serve.runner_limit(list(defs.values())) >= routine + 2
    assert "resume-after-restart" in defs["lifelog-ingest-processing"]["tags"]


def test_prefect_yaml_needs_no_pwd_trick():
    assert "$PWD" not in (ROOT / "prefect.yaml").read_text()


# --- against a real Prefect server -----------------------------------------------------


class Serve:
    def __init__(self, env: dict[str, str], log: Path, only: str):
        self.env, self.log, self.only = env, log, only
        self.p: subprocess.Popen | None = None

    def start(self) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as out:
            self.p = subprocess.Popen(  # noqa: S603 - our own module
                [sys.executable, "-m", "deployments.serve", "--only", self.only],
                env=self.env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its flow-run children share its group
            )

        def ready():
            assert self.p.poll() is None, self.log.read_text()[-3000:]
            with open(self.log, "rb") as f:
                f.seek(offset)
                return STARTED.encode() in f.read()

        assert wait_until(ready, 120, 0.1), self.log.read_text()[-3000:]

    def signal_group(self, sig: int) -> None:
        os.killpg(self.p.pid, sig)

    def stop(self) -> None:
        if self.p and self.p.poll() is None:
            self.signal_group(signal.SIGKILL)
            self.p.wait(10)


def _client_call(fn):
    from prefect import get_client

    async def go():
        async with get_client() as client:
            return await fn(client)

    return anyio.run(go)


def _state(run_id):
    async def read(client):
        return (await client.read_flow_run(run_id)).state

    return _client_call(read)


def _wait_state(run_id, types: set[str], timeout: float = 180):
    def reached():
        state = _state(run_id)
        return state if state.type.value in types else None

    state = wait_until(reached, timeout, 0.5)
    assert state is not None, f"run {run_id} still {_state(run_id).type.value}"
    return state


@pytest.mark.timeout(600)
def test_restart_leaves_no_run_stuck_and_sigint_stops_cleanly(
    prefect_api_url, database_url, tmp_path
):
    from prefect.deployments import run_deployment
    from prefect.states import Pending

    add_device(database_url, "SLOW")  # never executes its trigger: the run waits
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_API_URL=prefect_api_url,
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        DATABASE_URL=database_url,
        STORAGE_URL=(tmp_path / "objects").as_uri(),
        CAMFLEET_DATA_DIR=str(tmp_path / "data"),
    )
    server = Serve(env, tmp_path / "serve.log", "manual-trigger,lifelog-ingest-processing")
    try:
        server.start()
        waiting = run_deployment(
            "manual-trigger/manual-trigger",
            parameters={"device_id": "SLOW", "timeout_seconds": 300},
            timeout=0,
        )
        _wait_state(waiting.id, {"RUNNING"})
        # a Lifelog window's run caught while being submitted
        window = run_deployment(
            "lifelog-ingest-processing/lifelog-ingest-processing",
            timeout=0,
            scheduled_time=_far_future(),
        )

        async def make_pending(client):
            await client.set_flow_run_state(window.id, Pending(), force=True)

        _client_call(make_pending)

        server.signal_group(signal.SIGKILL)  # serve and its flow runs die at once
        server.p.wait(10)
        assert _state(waiting.id).type.value == "RUNNING"
        assert _state(window.id).type.value == "PENDING"

        server.start()
        crashed = _wait_state(waiting.id, {"CRASHED"})
        assert "camfleet stopped" in crashed.message
        _wait_state(window.id, {"COMPLETED"})  # rescheduled and run: its items matter

        # Ctrl-C (SIGINT to the whole group) while a run is in progress
        another = run_deployment(
            "manual-trigger/manual-trigger",
            parameters={"device_id": "SLOW", "timeout_seconds": 300},
            timeout=0,
        )
        _wait_state(another.id, {"RUNNING"})
        server.signal_group(signal.SIGINT)
        assert server.p.wait(60) == 0, server.log.read_text()[-3000:]
        log = server.log.read_text()
        assert "was never awaited" not in log and "CancelledError" not in log
        final = _wait_state(another.id, {"CANCELLED", "CRASHED", "FAILED"}, timeout=60)
        assert final.is_final()
    finally:
        server.stop()


def _far_future():
    from datetime import UTC, datetime, timedelta

    return datetime.now(UTC) + timedelta(days=1)


def test_missed_routine_runs_are_dropped_not_replayed(prefect_api_url):
    """Fast: the recovery alone, on runs the server's scheduler made for the past hour."""
    from datetime import UTC, datetime, timedelta

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    from deployments.recovery import recover_interrupted_runs
    from flows.maintenance import prune_flow_runs
    from flows.triggers import expire_triggers

    every_minute = {"name": "routine", "schedules": [{"interval": 60}]}
    daily = {"name": "daily", "schedules": [{"cron": "0 * * * *"}]}
    routine_id = expire_triggers.to_deployment(name="missed-routine", interval=60).apply()
    daily_id = prune_flow_runs.to_deployment(name="missed-daily", cron="0 * * * *").apply()
    start = datetime.now(UTC) - timedelta(hours=1)

    async def backfill(client):
        for deployment_id in (routine_id, daily_id):
            response = await client._client.post(
                f"/deployments/{deployment_id}/schedule",
                json={"start_time": start.isoformat(), "end_time": datetime.now(UTC).isoformat()},
            )
            response.raise_for_status()
        return await recover_interrupted_runs(
            {routine_id: every_minute, daily_id: daily}, "resume-after-restart", client
        )

    counts = _client_call(backfill)
    assert counts["missed_deleted"] >= 55  # an hour of every-minute runs

    async def left(client):
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[routine_id, daily_id])
            )
        )
        late = datetime.now(UTC) - timedelta(minutes=1)
        return {
            deployment_id: sum(
                1 for r in runs if r.deployment_id == deployment_id and r.expected_start_time < late
            )
            for deployment_id in (routine_id, daily_id)
        }

    remaining = _client_call(left)
    assert remaining[routine_id] == 0 and remaining[daily_id] >= 1  # the cron one runs
