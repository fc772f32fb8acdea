"""`camfleet up`'s deployments come from prefect.yaml, and a stop leaves nothing stuck.

The fast tests read prefect.yaml and build the served deployments without a server. The
restart test serves two deployments against a real Prefect server, kills the serve
process (and its flow runs) with SIGKILL mid-run, starts it again, and checks that the
interrupted runs end Crashed or run again; then it stops it with SIGINT (Ctrl-C) and
checks it exits cleanly with no run left Pending or Running. The slow test stops it
with Ctrl-C three times while Lifelog windows are being submitted and checks that,
after the next start, no run is stuck and every item is verified.
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
    env = _serve_env(prefect_api_url, database_url, tmp_path)
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


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_three_sigints_mid_submission_leave_no_run_stuck_and_no_item_unverified(
    prefect_api_url, database_url, tmp_path
):
    """Ctrl-C three times while Lifelog windows are being submitted, then start again:
    every window run ends, none is left Pending/Running or overdue, every item verified.

    Slow (three stops and starts of a serve process); the single Ctrl-C is covered by
    test_restart_leaves_no_run_stuck_and_sigint_stops_cleanly."""
    import time

    from fastapi.testclient import TestClient

    from camfleet import db
    from camfleet.storage.local import LocalStore
    from services.api.app import create_app
    from services.api.ingest_batches import PrefectRuns
    from services.api.ratelimit import RateLimits
    from tests.test_devices_api import SECRET, ingest, make_user_key, pair_and_activate, upload

    env = _serve_env(prefect_api_url, database_url, tmp_path)
    server = Serve(env, tmp_path / "serve.log", "lifelog-ingest-processing")
    store = LocalStore(tmp_path / "objects", public_url="http://testserver", secret=SECRET)
    # Windows an hour in the past: each one's run is due as soon as it is created.
    window_s, now = 7, [time.time() - 3600]
    runs = PrefectRuns(window_s=window_s).window_runs(lambda: now[0], create_timeout_s=120)
    app = create_app(
        database_url=database_url,
        secret_key=SECRET,
        store=store,
        processing_runs=runs,
        rate_limits=RateLimits(),
    )
    run_ids: set[str] = set()
    seq = 0
    try:
        server.start()  # creates the deployment the API's windows run
        with TestClient(app) as client:
            _, token = pair_and_activate(client, make_user_key(database_url))
            for stop in range(3):
                submitted = []
                for _ in range(3):  # three windows: more than the deployment's limit of 2
                    seq += 1
                    now[0] += window_s
                    target = upload(client, token, seq, filename=f"stop{stop}_{seq:06d}.jpg")
                    r = ingest(client, token, target["object_key"], seq)
                    assert r.status_code == 200 and r.json()["status"] == "queued", r.text
                    submitted.append(r.json()["task_id"])
                run_ids.update(submitted)

                def taken():
                    states = {_state(i).type.value for i in submitted}
                    return states & {"PENDING", "RUNNING", "COMPLETED"}

                assert wait_until(taken, 120, 0.05), "the serve process took no window run"
                server.signal_group(signal.SIGINT)  # Ctrl-C while it submits and runs
                assert server.p.wait(60) == 0, server.log.read_text()[-3000:]
                server.start()
        log = server.log.read_text()
        assert "was never awaited" not in log and "CancelledError" not in log

        def caught_up():
            states = [_state(i) for i in run_ids]
            if not all(s.is_final() for s in states):
                return None
            with db.transaction(database_url) as conn, conn.cursor() as cur:
                cur.execute("select count(*) from captures where sha256 is null")
                if cur.fetchone()[0]:
                    return None
            return _stuck_runs() == []

        assert wait_until(caught_up, 240, 0.5), (
            {i: _state(i).type.value for i in run_ids},
            _stuck_runs(),
            server.log.read_text()[-3000:],
        )
        # a run the stop cancelled (or whose process the Ctrl-C reached first) ended;
        # its items were adopted by a later window's run, counted below
        ended = {_state(i).type.value for i in run_ids}
        assert "COMPLETED" in ended and ended <= {"COMPLETED", "CANCELLED", "CRASHED"}, ended
        with db.transaction(database_url) as conn, conn.cursor() as cur:
            cur.execute(
                "select count(*), count(sha256) from captures where ingest_status = 'stored'"
            )
            assert cur.fetchone() == (seq, seq)
    finally:
        server.stop()


def _serve_env(prefect_api_url: str, database_url: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_API_URL=prefect_api_url,
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        DATABASE_URL=database_url,
        STORAGE_URL=(tmp_path / "objects").as_uri(),
        CAMFLEET_DATA_DIR=str(tmp_path / "data"),
    )
    return env


def _stuck_runs() -> list[str]:
    """Runs of the Lifelog deployment Pending, Running or Cancelling, or Scheduled and
    more than a minute overdue: what a stop must not leave behind."""
    from datetime import UTC, datetime, timedelta

    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    async def read(client):
        return await client.read_flow_runs(
            deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=["lifelog-ingest-processing"])
            ),
            limit=200,
        )

    overdue = datetime.now(UTC) - timedelta(minutes=1)
    return [
        f"{r.id} {r.state.type.value}"
        for r in _client_call(read)
        if r.state.type.value in {"PENDING", "RUNNING", "CANCELLING"}
        or (r.state.type.value == "SCHEDULED" and r.expected_start_time < overdue)
    ]
