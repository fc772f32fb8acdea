"""`camfleet up --demo` as a newcomer sees it: flow runs of every pipeline, completed,
listed in the Prefect UI rendered by headless Chromium (Debian's chromium package)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from camfleet.localsvc import free_port

# One flow per pipeline the demo drives: ESP32 MQTT chunks (seed 002), the edge
# signer (seed 000), Lifelog ingest (seed 004), Visant triggers + evaluation (seed 003).
PIPELINE_FLOWS = {
    "mqtt-ingest-record",
    "edge-uploads-received",
    "lifelog-ingest-processing",
    "trigger-scheduler",
    "evaluate-captures",
}
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=15000",
    "--window-size=1400,1000",
]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    raise AssertionError("chromium is not installed: apt-get install chromium (.ci/run does)")


def _runs_in(api_url: str, states: list[str]) -> set[str]:
    """Names of the flows with at least one run in one of `states`."""
    flows = httpx.post(f"{api_url}/flows/filter", json={}, timeout=10).json()
    names = {f["id"]: f["name"] for f in flows}
    runs = httpx.post(
        f"{api_url}/flow_runs/filter",
        json={"flow_runs": {"state": {"type": {"any_": states}}}, "limit": 200},
        timeout=10,
    ).json()
    return {names.get(r["flow_id"]) for r in runs}


def _completed_flows(api_url: str) -> set[str]:
    return _runs_in(api_url, ["COMPLETED"])


# A counter per service that the demo keeps moving (docs/metrics.md).
MOVING = {
    "api": "camfleet_api_requests_total",
    "assembler": "camfleet_assembler_messages_total",
    "signer": "camfleet_signer_requests_total",
}


def _counter(url: str, name: str) -> float:
    """The sum of a counter's series at one scrape of `url`."""
    text = httpx.get(url, timeout=10).text
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def _assert_metrics_move(up_log: Path) -> None:
    """Each service's /metrics, at the URL the banner names, has its counter moving."""
    banner = up_log.read_text()
    urls = dict(re.findall(r"\b(api|assembler|signer) (http://\S+/metrics)", banner))
    assert set(urls) == set(MOVING), banner[-3000:]
    first = {svc: _counter(urls[svc], name) for svc, name in MOVING.items()}
    deadline = time.monotonic() + 180
    moved: set[str] = set()
    while time.monotonic() < deadline and moved != set(MOVING):
        time.sleep(2)
        moved = {svc for svc, name in MOVING.items() if _counter(urls[svc], name) > first[svc]}
    assert moved == set(MOVING), (first, moved)


def _assert_demo_fleet_owned(data_dir: Path) -> None:
    """Every simulated device (all kinds) belongs to the demo user, so its console shows it."""
    import psycopg2

    from camfleet import demo

    dsn = json.loads((data_dir / "stack.json").read_text())["env"]["DATABASE_URL"]
    wanted = set(demo.demo_device_ids())
    deadline = time.monotonic() + 120
    while True:
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute("select device_id, kind, user_id from devices")
            rows = cur.fetchall()
        owned = {d for d, _kind, user in rows if user == demo.DEMO_USER}
        if wanted <= owned or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert wanted <= owned, rows
    assert all(user == demo.DEMO_USER for _d, _kind, user in rows), rows


@pytest.mark.timeout(600)
def test_demo_flow_runs_of_every_pipeline_show_completed_in_the_ui():
    work = Path(tempfile.mkdtemp(prefix="camfleet-ui-"))
    work.chmod(0o755)  # the postgres user must reach the cluster inside
    api_port, prefect_port = free_port(), free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "MQTT_", "CAMFLEET_")) and k != "DATABASE_URL"
    }
    env["CAMFLEET_DATA_DIR"] = str(work / "data")
    # Not the machine's broker port, nor the user's Prefect profiles.
    env["CAMFLEET_MQTT_PORT"] = str(free_port())
    env["PREFECT_HOME"] = str(work / "prefect-home")
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "camfleet.cli",
            "up",
            "--demo",
            "--api-port",
            str(api_port),
            "--prefect-port",
            str(prefect_port),
        ],
        env=env,
        stdout=open(work / "up.log", "w"),
        stderr=subprocess.STDOUT,
    )
    ui = f"http://127.0.0.1:{prefect_port}"
    try:
        seen: set[str] = set()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not PIPELINE_FLOWS <= seen:
            time.sleep(5)
            try:
                seen = _completed_flows(f"{ui}/api")
            except httpx.HTTPError:
                continue
        assert PIPELINE_FLOWS <= seen, (seen, (work / "up.log").read_text()[-3000:])
        assert not _runs_in(f"{ui}/api", ["FAILED", "CRASHED"])
        _assert_metrics_move(work / "up.log")
        _assert_demo_fleet_owned(work / "data")

        dom = subprocess.run(
            [
                _chromium(),
                *CHROMIUM_FLAGS,
                f"--user-data-dir={work / 'chromium'}",
                "--dump-dom",
                f"{ui}/runs",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        for name in PIPELINE_FLOWS:
            assert name in dom, f"{name} not listed on the runs page"
        assert "Completed" in dom  # state badges; the list renders lazily, so not all

        shot = work / "dashboard.png"
        subprocess.run(
            [
                _chromium(),
                *CHROMIUM_FLAGS,
                f"--user-data-dir={work / 'chromium'}",
                f"--screenshot={shot}",
                f"{ui}/dashboard",
            ],
            capture_output=True,
            timeout=120,
        )
        assert shot.read_bytes().startswith(b"\x89PNG")
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=120)
        shutil.rmtree(work, ignore_errors=True)
