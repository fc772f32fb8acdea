"""`camfleet up` brings the local stack up on embedded defaults and Ctrl-C stops it all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from camfleet.localsvc import free_port


def _stack_processes(data_dir) -> list[psutil.Process]:
    """Every process whose command line or working directory points into data_dir."""
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        try:
            text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["cwd"] or "")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if str(data_dir) in text and proc.pid != os.getpid():
            found.append(proc)
    return found


@pytest.fixture
def tmp_path():
    """A work dir the `postgres` user can traverse (pytest's own tmp dirs are 0700)."""
    import shutil
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp(prefix="camfleet-up-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _clean_env(tmp_path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "MQTT_", "CAMFLEET_")) and k not in ("DATABASE_URL",)
    }
    env["CAMFLEET_DATA_DIR"] = str(tmp_path / "data")
    return env


def test_up_check_migrates_a_local_database_and_prints_status(tmp_path, run_cli):
    result = run_cli(["camfleet", "up", "--check"], env=_clean_env(tmp_path), timeout=180)
    assert "local cluster in" in result.stdout and "0001_schema" in result.stdout
    assert "camfleet status" in result.stdout
    # a second run reuses the cluster: nothing left to migrate
    again = run_cli(["camfleet", "up", "--check"], env=_clean_env(tmp_path), timeout=180)
    assert "schema up to date" in again.stdout
    assert not _stack_processes(tmp_path / "data")


@pytest.mark.timeout(400)
def test_up_serves_everything_and_ctrl_c_leaves_nothing(tmp_path):
    api_port, prefect_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "camfleet.cli",
            "up",
            "--api-port",
            str(api_port),
            "--prefect-port",
            str(prefect_port),
        ],
        env=_clean_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:
            lines.append(line)
            if "camfleet is up" in line or time.monotonic() > deadline:
                break
        output = "".join(lines)
        assert "camfleet is up" in output, output
        assert f"http://127.0.0.1:{prefect_port}" in output
        assert "secret" not in output.lower()
        assert httpx.get(f"http://127.0.0.1:{prefect_port}/api/health", timeout=10).json()
        # the device API answers once its process is up
        for _ in range(120):
            try:
                if httpx.get(f"http://127.0.0.1:{api_port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            raise AssertionError(f"device API never answered:\n{output}")
        assert len(_stack_processes(tmp_path / "data")) >= 3
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    assert "stopped." in rest
    time.sleep(1)
    assert not _stack_processes(tmp_path / "data"), [p.info for p in _stack_processes(tmp_path)]
