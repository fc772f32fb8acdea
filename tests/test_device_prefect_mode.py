"""Device commands and Prefect (issue 19 item 5): a server when one is configured,
otherwise the same steps without Prefect; never Prefect's temporary local server.

The temporary server missed its 20 s start-up deadline on a busy machine and outlived
a killed command. Each command here runs as a user runs it (a subprocess), with an
environment that names no Prefect server (PREFECT_API_URL removed, a fresh
PREFECT_HOME) or the test session's real server. A marker variable in that environment
is inherited by every process the command starts, so after a kill the test finds any
process it left behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from camfleet.commands import prefect_mode
from tests.test_edge_flow import seed_conf, seed_device
from tests.test_edge_transaction import (  # noqa: F401 - fixtures
    captures,
    signer,
    store,
    write_images,
)

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "camfleet.cli"]
MARKER = "CAMFLEET_TEST_DEVICE_RUN"


def no_server_env(tmp_path: Path, marker: str, **extra: str) -> dict[str, str]:
    """The environment of a device that has never been told of a Prefect server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    home = tmp_path / "prefect-home"  # fresh, as on a newly flashed device
    home.mkdir(exist_ok=True)
    env.update(PREFECT_HOME=str(home), PYTHONPATH=str(ROOT), **{MARKER: marker}, **extra)
    return env


def processes_with(marker: str) -> list[str]:
    """Live processes (other than zombies) whose environment carries `marker`."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(MARKER) == marker:
                found.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])[:120]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def run(cmd, env, cwd, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


# ---- the decision (fast, in-process) ----------------------------------------------------


@pytest.fixture
def bare(tmp_path, monkeypatch):
    """No PREFECT_* variable, an empty PREFECT_HOME, a working directory without config."""
    for key in list(os.environ):
        if key.startswith("PREFECT_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_no_server_configured_means_no_prefect(bare):
    assert prefect_mode.api_url() is None
    assert prefect_mode.use_prefect(None) is None
    assert prefect_mode.use_prefect(False) is None
    with pytest.raises(prefect_mode.NoPrefectApi, match="PREFECT_API_URL"):
        prefect_mode.use_prefect(True, "camfleet edge run --prefect")


def test_a_configured_server_is_used_unless_refused(bare, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert prefect_mode.use_prefect(None) == "http://127.0.0.1:4200/api"
    assert prefect_mode.use_prefect(True) == "http://127.0.0.1:4200/api"
    assert prefect_mode.use_prefect(False) is None
    monkeypatch.setenv("PREFECT_API_URL", "")  # set but empty: explicitly none
    assert prefect_mode.use_prefect(None) is None


def test_a_server_named_in_the_prefect_profile_counts(tmp_path):
    """A device configured with `prefect profile` rather than a variable (fresh process:
    Prefect reads its profile once per process)."""
    env = no_server_env(tmp_path, "x")
    Path(env["PREFECT_HOME"], "profiles.toml").write_text(
        'active = "fleet"\n[profiles.fleet]\nPREFECT_API_URL = "http://127.0.0.1:4299/api"\n'
    )
    code = "from camfleet.commands import prefect_mode\nprint(prefect_mode.api_url())"
    out = run([sys.executable, "-c", code], env, tmp_path, 60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "http://127.0.0.1:4299/api"


def test_the_plain_path_decides_without_importing_prefect(tmp_path):
    code = (
        "import sys\nfrom camfleet.commands import prefect_mode\n"
        "assert prefect_mode.use_prefect(None) is None\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] == 'prefect'))"
    )
    out = run([sys.executable, "-c", code], no_server_env(tmp_path, "x"), tmp_path, 60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_reporting_to_forbids_the_temporary_server_and_restores_the_environment(bare):
    with prefect_mode.reporting_to("http://127.0.0.1:4200/api"):
        assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
        assert os.environ["PREFECT_SERVER_EPHEMERAL_ENABLED"] == "false"
    assert "PREFECT_API_URL" not in os.environ
    assert "PREFECT_SERVER_EPHEMERAL_ENABLED" not in os.environ


# ---- commands asked for Prefect with no server: refuse at once, leave nothing -----------


@pytest.mark.parametrize(
    "args",
    [
        ["edge", "run", "--prefect"],
        ["edge", "serve"],
        ["uploader", "once", "--flow"],
        ["uploader", "serve"],
    ],
    ids=lambda a: " ".join(a),
)
def test_prefect_demanded_without_a_server_is_a_clear_usage_error(tmp_path, args):
    conf = seed_conf(tmp_path, "ENTO-NOSRV", SimpleNamespace(host="127.0.0.1"), PORT=1)
    uploader_conf = tmp_path / "config.json"
    uploader_conf.write_text(
        '{"uploader": {"sftp": {"host": "127.0.0.1", "username": "u", "ssh_key_path": "k"},'
        ' "database": {"host": "127.0.0.1"}}}'
    )
    config = conf if args[0] == "edge" else str(uploader_conf)
    marker = uuid.uuid4().hex
    out = run(CLI + args + ["--config", config], no_server_env(tmp_path, marker), tmp_path, 60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "none is configured" in out.stderr and "PREFECT_API_URL" in out.stderr
    assert "ephemeral" not in (out.stdout + out.stderr).lower()
    assert processes_with(marker) == []


# ---- the device path itself, end to end ---------------------------------------------------


def test_edge_run_with_no_server_uploads_everything_and_leaves_no_process(
    tmp_path,
    signer,  # noqa: F811
    mosquitto,
    database_url,
):
    serial, conf, shas = seed_device(tmp_path, mosquitto, 6)
    marker = uuid.uuid4().hex
    out = run(
        CLI + ["edge", "run", "--config", conf, "--min-age", "0"],
        no_server_env(tmp_path, marker),
        tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 batches: 6/6 files verified and deleted" in out.stdout
    assert "ephemeral" not in (out.stdout + out.stderr).lower()
    assert set(captures(database_url, serial)) == set(shas)
    assert processes_with(marker) == []
    # Nothing Prefect-shaped was created in the device's Prefect home either.
    assert list((tmp_path / "prefect-home").iterdir()) == []


def test_a_killed_edge_run_leaves_no_process_behind(
    tmp_path,
    signer,  # noqa: F811
    mosquitto,
    database_url,
):
    """SIGKILL mid-run: with the temporary server, its uvicorn outlived the command."""
    serial, conf, _ = seed_device(tmp_path, mosquitto, 30)
    buffer = tmp_path / "bufferStorage"
    buffer.mkdir()
    marker = uuid.uuid4().hex
    proc = subprocess.Popen(
        CLI + ["edge", "run", "--config", conf, "--min-age", "0"],
        env=no_server_env(tmp_path, marker),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not any(buffer.iterdir()) and proc.poll() is None:
            assert time.monotonic() < deadline, "the device never started a batch"
            time.sleep(0.02)
        assert processes_with(marker)  # the probe sees the running command
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert processes_with(marker) == []


def test_edge_run_reports_to_the_configured_server(
    tmp_path,
    prefect_api_url,
    signer,  # noqa: F811
    mosquitto,
    database_url,
):
    """PREFECT_API_URL set: the same command is a flow run on that server (no flag)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    serial, conf, shas = seed_device(tmp_path, mosquitto, 3)
    marker = uuid.uuid4().hex
    env = no_server_env(tmp_path, marker, PREFECT_API_URL=prefect_api_url)
    out = run(CLI + ["edge", "run", "--config", conf, "--min-age", "0"], env, tmp_path, 180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 batches: 3/3 files verified and deleted" in out.stdout
    assert set(captures(database_url, serial)) == set(shas)

    async def runs_of_this_device():
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["edge-batch-upload"]))
            )
        return [r for r in runs if r.parameters.get("config_path") == conf]

    (flow_run,) = asyncio.run(runs_of_this_device())
    assert flow_run.state.is_completed()
    assert processes_with(marker) == []


@pytest.mark.slow  # waits for the 1-minute load average to climb to 8 (a minute or two)
def test_edge_run_with_no_server_works_on_a_machine_loaded_to_8(
    tmp_path,
    signer,  # noqa: F811
    mosquitto,
    database_url,
):
    """What timed out with the temporary server on a busy machine: the same run under a
    load average of at least 8 (busy loops at the lowest priority beside the test)."""
    serial, conf, shas = seed_device(tmp_path, mosquitto, 6)
    spin = "import os\nos.nice(19)\nwhile True: pass"
    busy = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(8)]
    try:
        deadline = time.monotonic() + 600
        while os.getloadavg()[0] < 8:
            assert time.monotonic() < deadline, f"load stayed at {os.getloadavg()[0]:.1f}"
            time.sleep(1)
        marker = uuid.uuid4().hex
        out = run(
            CLI + ["edge", "run", "--config", conf, "--min-age", "0"],
            no_server_env(tmp_path, marker),
            tmp_path,
            timeout=600,
        )
        load = os.getloadavg()[0]
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "6/6 files verified and deleted" in out.stdout, f"load {load:.1f}"
    assert set(captures(database_url, serial)) == set(shas)
    assert processes_with(marker) == []
