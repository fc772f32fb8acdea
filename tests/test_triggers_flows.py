"""Trigger flows on a real Prefect server, the real API and the real `camfleet agent`."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from PIL import Image

from camfleet.settings import get_settings
from flows.evaluation import evaluate_captures
from flows.triggers import manual_trigger, trigger_scheduler
from tests.test_api_commands_helpers import ROOT, ApiProcess, add_device, fetch, wait_for


@pytest.fixture
def db_env(database_url, monkeypatch, tmp_path):
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("STORAGE_URL", (tmp_path / "objects").as_uri())
    get_settings.cache_clear()
    yield database_url
    get_settings.cache_clear()


def test_scheduler_flow_dispatches_a_window_in_batches_without_doubling(prefect_api_url, db_env):
    for i in range(3):
        add_device(db_env, f"S{i}", {"trigger": {"enabled": True, "interval_seconds": 10}})
    add_device(db_env, "CRON1", {"trigger": {"enabled": True, "cron": "* * * * *"}})
    add_device(db_env, "BAD1", {"trigger": {"enabled": True, "interval_seconds": 0}})
    add_device(db_env, "OFF1", {"trigger": {"enabled": False, "interval_seconds": 10}})

    state = trigger_scheduler(window_seconds=60, return_state=True)
    assert state.is_completed()
    first = state.result()
    assert first["planned"] == first["created"] == 3 * 6 + 1
    assert first["refused_configs"] == 1 and first["devices"] == 4

    second = trigger_scheduler(window_seconds=60)
    assert second["created"] < second["planned"]  # the overlap was skipped, not doubled
    rows = fetch(
        db_env,
        "SELECT count(*), count(DISTINCT (device_id, scheduled_at)), count(DISTINCT flow_run_id),"
        " min(status), max(status) FROM scheduled_triggers",
    )[0]
    assert rows[0] == rows[1] == first["created"] + second["created"]
    # each row names the flow run that created it
    assert rows[2] == 1 + (second["created"] > 0) and rows[3] == rows[4] == "pending"
    assert not fetch(db_env, "SELECT 1 FROM scheduled_triggers WHERE device_id IN ('BAD1','OFF1')")


def test_manual_trigger_flow_fails_visibly_when_not_executed(prefect_api_url, db_env):
    add_device(db_env, "NOBODY")
    state = manual_trigger(device_id="NOBODY", timeout_seconds=1, return_state=True)
    assert state.is_failed()
    assert "not executed" in state.message or "NOBODY" in str(state.message)
    [(status, reason, run_id)] = fetch(
        db_env, "SELECT status, failed_reason, flow_run_id FROM scheduled_triggers"
    )
    assert status == "failed" and "not executed" in reason and run_id


def test_agent_executes_manual_triggers_across_an_api_restart_then_evaluation(
    prefect_api_url, db_env, tmp_path
):
    add_device(db_env, "AGENT1")
    image = tmp_path / "frame.png"
    Image.effect_mandelbrot((320, 240), (-2, -1.5, 1, 1.5), 60).convert("RGB").save(image)
    api = ApiProcess(db_env, tmp_path / "objects").start()
    frames = tmp_path / "frames"
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "camfleet.cli",
            "agent",
            "--api-url",
            api.url,
            "--device-id",
            "AGENT1",
            "--camera-source",
            str(image),
            "--reconnect-delay",
            "0.2",
            "--max-reconnect-delay",
            "1",
            "--stream-timeout",
            "5",
            "--save-frames",
            "--save-frames-dir",
            str(frames),
            "--max-captures",
            "2",
        ],
        cwd=ROOT,
        env=api.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: fetch(db_env, "SELECT 1 FROM device_connections"), timeout=20)
        first = manual_trigger(device_id="AGENT1", timeout_seconds=20)
        assert first["status"] == "executed" and first["capture_id"]

        api.stop()  # the API restarts; the agent reconnects with backoff
        api.start()
        wait_for(lambda: fetch(db_env, "SELECT 1 FROM device_connections"), timeout=20)
        second = manual_trigger(device_id="AGENT1", timeout_seconds=20)
        assert second["status"] == "executed"
        out, _ = agent.communicate(timeout=20)
        assert agent.returncode == 0, out
        assert "2 uploads" in out and "connects" in out
        assert len(list(frames.iterdir())) == 2
    finally:
        if agent.poll() is None:
            agent.kill()
        api.stop()

    result = evaluate_captures(batch_size=10)
    assert result["completed"] == 2
    rows = fetch(db_env, "SELECT evaluation_status, evaluation_result->>'width' FROM captures")
    assert rows == [("completed", "320"), ("completed", "320")]

    out = subprocess.run(
        [sys.executable, "-m", "camfleet.cli", "triggers", "summary", "--device-id", "AGENT1"],
        cwd=ROOT,
        env=api.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "CLOUD-TRIGGERED CAMERA TEST RESULTS" in out
    for line in ("Total Captures: 2", "Evaluation Completed: 2", "Manual: 2", "Executed: 2"):
        assert line in out, out
    assert "[OK] 2 triggers marked as executed" in out
    assert "[OK] All captures are being evaluated" in out


def test_prefect_deployment_run_manual_trigger_fails_visibly(prefect_api_url, db_env, tmp_path):
    """`prefect deployment run 'manual-trigger/manual-trigger' -p device_id=...` from the CLI."""
    import os
    import signal

    add_device(db_env, "CLI1")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "serve.log", "w")
    served = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from flows.triggers import manual_trigger\n"
            "manual_trigger.serve(name='manual-trigger')",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        prefect = str(ROOT / ".venv" / "bin" / "prefect")
        args = [prefect, "deployment", "run", "manual-trigger/manual-trigger"]
        args += ["-p", "device_id=CLI1", "-p", "timeout_seconds=1", "--watch"]
        args += ["--watch-timeout", "90"]
        deadline = time.monotonic() + 60
        while True:  # the deployment exists once serve() registered it
            run = subprocess.run(
                args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
            )
            if "not found" not in (run.stdout + run.stderr).lower() or time.monotonic() > deadline:
                break
            time.sleep(1)
        out = run.stdout + run.stderr
        assert run.returncode != 0, out
        assert "Failed" in out or "FAILED" in out, out
        [(status, reason)] = fetch(db_env, "SELECT status, failed_reason FROM scheduled_triggers")
        assert status == "failed" and "not executed" in reason
    finally:
        os.killpg(served.pid, signal.SIGTERM)
        served.wait(20)
        log.close()
