"""`camfleet edge run` and `camfleet edge serve` as a user runs them (subprocesses)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid

from tests.test_edge_flow import seed_device
from tests.test_edge_transaction import (  # noqa: F401 - fixtures
    broker_block,
    captures,
    signer,
    store,
    write_images,
)


def test_edge_run_without_prefect(tmp_path, signer, mosquitto, database_url, run_cli):  # noqa: F811
    serial, conf, shas = seed_device(tmp_path, mosquitto, 6)
    out = run_cli(
        [sys.executable, "-m", "camfleet.cli", "edge", "run", "--config", conf]
        + ["--no-prefect", "--min-age", "0"],
        timeout=120,
    )
    assert "2 batches: 6/6 files verified and deleted" in out.stdout
    assert set(captures(database_url, serial)) == set(shas)


def test_edge_serve_is_a_scheduled_deployment_that_runs(
    tmp_path,
    prefect_api_url,
    signer,  # noqa: F811
    mosquitto,
    database_url,
):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    serial, conf, shas = seed_device(tmp_path, mosquitto, 3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "camfleet.cli", "edge", "serve", "--config", conf]
        + ["--interval", "3600"],
        env={**os.environ, "PREFECT_API_URL": prefect_api_url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    name = f"edge-batch-upload/edge-{serial}"
    try:

        async def deployment():
            async with get_client() as client:
                for _ in range(120):
                    try:
                        return await client.read_deployment_by_name(name)
                    except Exception:
                        await asyncio.sleep(0.5)
            raise AssertionError("the served deployment never appeared")

        dep = asyncio.run(deployment())
        assert [s.schedule.interval.total_seconds() for s in dep.schedules] == [3600]
        # The served process runs it (min age 0 so the fresh test images qualify).
        run = run_deployment(name, parameters={"min_age_s": 0}, timeout=120, poll_interval=1)
        assert run.state.is_completed(), run.state
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    deadline = time.monotonic() + 5
    while set(captures(database_url, serial)) != set(shas) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert set(captures(database_url, serial)) == set(shas)
    assert list((tmp_path / "bufferStorage").iterdir()) == []


def test_device_process_killed_at_random_points_loses_nothing(
    tmp_path,
    signer,  # noqa: F811
    store,  # noqa: F811
    mosquitto,
    database_url,
    run_cli,
):
    """SIGKILL `camfleet edge run` mid-transaction, several times, then let it finish."""
    serial, conf, shas = seed_device(tmp_path, mosquitto, 40)
    cmd = [sys.executable, "-m", "camfleet.cli", "edge", "run", "--config", conf]
    cmd += ["--no-prefect", "--min-age", "0"]
    buffer = tmp_path / "bufferStorage"
    buffer.mkdir()
    for delay in (0.0, 0.1, 0.25):  # after the first move: mid-request, -upload, -verify
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not any(buffer.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        on_device = {
            p.name for d in ("cameraImageRepo", "bufferStorage") for p in (tmp_path / d).iterdir()
        }
        # Every file is either still on the device or verified in the cloud.
        assert on_device | set(captures(database_url, serial)) == set(shas)
    run_cli(cmd, timeout=120)
    assert {n: r[0] for n, r in captures(database_url, serial).items()} == shas
    keys = sorted(o.key for o in store.list(f"edge/{serial}/"))
    assert keys == [f"edge/{serial}/{n}" for n in sorted(shas)]  # one object per file
    assert list((tmp_path / "bufferStorage").iterdir()) == []


def test_local_storage_uploads_through_the_device_api(tmp_path, mosquitto, database_url, run_cli):
    """`camfleet up`'s default: no S3; presigned POSTs go to the device API's signed route."""
    import httpx

    from camfleet.edge.config import EdgeConfig
    from camfleet.edge.uploader import EdgeUploader
    from camfleet.localsvc import free_port
    from camfleet.storage.local import LocalStore
    from services.signer import Signer

    secret, port, root = "edge-test-secret-key-0123456789abcdef", free_port(), tmp_path / "objects"
    public = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "CAMFLEET_SECRET_KEY": secret,
        "STORAGE_URL": root.as_uri(),
        "CAMFLEET_PUBLIC_URL": public,
    }
    api = subprocess.Popen(
        [sys.executable, "-m", "camfleet.cli", "api", "--port", str(port), "--no-access-log"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{public}/health", trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "device API did not start"
            time.sleep(0.2)
        store = LocalStore(root, public_url=public, secret=secret.encode())
        broker = broker_block(mosquitto)
        cfg = EdgeConfig(
            serial=f"ENTO-{uuid.uuid4().hex[:6]}",
            buffer_dir=tmp_path / "bufferStorage",
            repo_dir=tmp_path / "cameraImageRepo",
            broker_host=broker.host,
            broker_port=broker.port,
            tls=False,
        )
        shas = write_images(cfg.repo_dir, 6)
        with Signer(store, database_url, broker, client_id=f"s-{uuid.uuid4().hex[:6]}") as s:
            assert s.wait_connected(5)
            summaries = EdgeUploader(cfg, broker, min_age_s=0).drain()
    finally:
        api.terminate()
        api.wait(15)
    assert sum(x["deleted"] for x in summaries) == 6
    assert {n: r[0] for n, r in captures(database_url, cfg.serial).items()} == shas
    assert sorted(p.name for p in (root / "edge" / cfg.serial).iterdir()) == sorted(shas)
