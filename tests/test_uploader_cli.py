"""`camfleet uploader ...` and `camfleet simulate events` as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from camfleet.uploader.simulate import local_config

CAMFLEET = [sys.executable, "-m", "camfleet.cli"]


@pytest.fixture
def config_path(tmp_path: Path, sshd, database_url) -> Path:
    base = tmp_path / f"site-{uuid.uuid4().hex[:8]}"
    base.mkdir()
    path = base / "config.json"
    path.write_text(json.dumps(local_config(sshd, database_url, base, scan_interval_seconds=45)))
    return path


def test_simulate_then_once_uploads_and_reports(run_cli, config_path):
    cfg = json.loads(config_path.read_text())["uploader"]
    out = run_cli([*CAMFLEET, "simulate", "events", "--dir", cfg["pending_dir"], "--count", "3"])
    assert "wrote 3 events" in out.stdout
    out = run_cli([*CAMFLEET, "uploader", "once", "--config", str(config_path)])
    assert out.stdout.strip().splitlines()[-1] == "3 uploaded"
    assert len(list(Path(cfg["uploaded_dir"]).iterdir())) == 6
    assert "password" not in out.stdout + out.stderr


def test_once_exits_non_zero_and_says_why_when_events_fail(run_cli, config_path, tmp_path):
    config = json.loads(config_path.read_text())
    config["uploader"]["sftp"]["known_hosts_path"] = str(tmp_path / "empty_known_hosts")
    (tmp_path / "empty_known_hosts").write_text("")
    config_path.write_text(json.dumps(config))
    run_cli(
        [
            *CAMFLEET,
            "simulate",
            "events",
            "--dir",
            config["uploader"]["pending_dir"],
            "--count",
            "1",
        ]
    )
    out = run_cli(
        [*CAMFLEET, "uploader", "once", "--config", str(config_path), "--json"], check=False
    )
    assert out.returncode == 1
    report = json.loads(out.stdout)
    assert report["counts"] == {"failed": 1}
    assert "HostKeyRejected" in report["events"][0]["reason"]
    assert "is unknown" in report["events"][0]["reason"]


def test_missing_config_is_a_usage_error(run_cli, tmp_path):
    out = run_cli(
        [*CAMFLEET, "uploader", "once", "--config", str(tmp_path / "nope.json")], check=False
    )
    assert out.returncode == 2 and "no config file" in out.stderr


def test_deployment_runs_on_the_configs_scan_interval(config_path):
    from deployments.event_upload import deployment

    dep = deployment(str(config_path))
    assert dep.name == "event-upload"
    assert dep.schedules[0].schedule.interval == timedelta(seconds=45)
    assert dep.parameters["config_path"] == str(config_path.resolve())


@pytest.mark.slow  # a served process and a flow-run subprocess: ~30 s on 2 busy cores
def test_served_deployment_runs_ad_hoc_with_prefect_deployment_run(
    prefect_api_url, run_cli, config_path
):
    cfg = json.loads(config_path.read_text())["uploader"]
    run_cli([*CAMFLEET, "simulate", "events", "--dir", cfg["pending_dir"], "--count", "2"])
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}
    served = subprocess.Popen(
        [*CAMFLEET, "uploader", "serve", "--config", str(config_path), "--interval", "3600"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:  # the deployment exists once `serve` has registered it
            out = run_cli(
                ["prefect", "deployment", "run", "event-upload/event-upload"], env=env, check=False
            )
            if out.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert out.returncode == 0, out.stdout + out.stderr
        uploaded = Path(cfg["uploaded_dir"])
        while time.monotonic() < deadline:
            if uploaded.exists() and len(list(uploaded.iterdir())) == 4:
                break
            time.sleep(0.5)
        assert sorted(p.name for p in uploaded.iterdir()) == [
            "evt000000.json",
            "evt000000.mp4",
            "evt000001.json",
            "evt000001.mp4",
        ]
    finally:
        os.killpg(served.pid, signal.SIGINT)
        try:
            served.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(served.pid, signal.SIGKILL)
            served.wait(10)
