"""`camfleet up` brings the local stack up on embedded defaults and Ctrl-C stops it all."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest

from camfleet.localsvc import free_port
from tests.faults_common import wait_until


@pytest.fixture
def run_cli(run_cli):
    """The shared run_cli adds `env` to os.environ, where the session's Prefect fixture
    has exported PREFECT_API_URL; `camfleet up` must see exactly what _clean_env gives."""
    from unittest import mock

    def run(args, *, env=None, **kwargs):
        with mock.patch.dict(os.environ, env or {}, clear=env is not None):
            return run_cli(args, env=env, **kwargs)

    return run


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
    # Never the machine's 1883/4200/8000, nor the user's Prefect profiles: `up`
    # activates a `camfleet` profile in PREFECT_HOME.
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["CAMFLEET_MQTT_PORT"] = str(free_port())
    env["CAMFLEET_PREFECT_PORT"] = str(free_port())
    env["CAMFLEET_API_PORT"] = str(free_port())
    return env


def test_up_check_migrates_a_local_database_and_prints_status(tmp_path, run_cli):
    result = run_cli(["camfleet", "up", "--check"], env=_clean_env(tmp_path), timeout=180)
    assert "local cluster in" in result.stdout and "0001_schema" in result.stdout
    assert "camfleet status" in result.stdout
    # a second run reuses the cluster: nothing left to migrate
    again = run_cli(["camfleet", "up", "--check"], env=_clean_env(tmp_path), timeout=180)
    assert "schema up to date" in again.stdout
    assert not _stack_processes(tmp_path / "data")


def _hold_ports(n: int) -> list[socket.socket]:
    """Listening sockets on n free loopback ports, as another program would hold them."""
    held = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", free_port()))
        s.listen()
        held.append(s)
    return held


def test_busy_ports_stop_up_before_anything_starts_naming_what_to_change(tmp_path, run_cli):
    held = _hold_ports(3)
    try:
        env = _clean_env(tmp_path)
        for var, sock in zip(
            ("CAMFLEET_MQTT_PORT", "CAMFLEET_PREFECT_PORT", "CAMFLEET_API_PORT"), held, strict=True
        ):
            env[var] = str(sock.getsockname()[1])
        result = run_cli(["camfleet", "up"], env=env, timeout=120, check=False)
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 3, result.stderr
        for line, (var, sock) in zip(
            lines,
            zip(("CAMFLEET_MQTT_PORT", "CAMFLEET_PREFECT_PORT", "CAMFLEET_API_PORT"), held),
            strict=True,
        ):
            assert f"127.0.0.1:{sock.getsockname()[1]}" in line and var in line, line
        assert "PREFECT_API_URL" in lines[1]  # how to use a Prefect server already running
        assert "Traceback" not in result.stdout + result.stderr
        # nothing was started: not even the data directory exists
        assert not (tmp_path / "data").exists()
    finally:
        for sock in held:
            sock.close()


# ---- a new user following the README's quick start literally ----------------------

ROOT = Path(__file__).resolve().parent.parent


def _fresh_clone(where: Path) -> Path:
    """The repository's files as a fresh clone has them (no .camfleet), sharing .venv.

    pyproject.toml is dated back so `make` sees the shared virtualenv as installed.
    """
    clone = where / "camfleet"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        src = ROOT / name
        if src.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, clone / name)
    (clone / ".venv").symlink_to(ROOT / ".venv")
    os.utime(clone / "pyproject.toml", (0, 0))
    return clone


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("### Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.split("  #", 1)[0].strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float) -> str:
    lines = []
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if needle in line or time.monotonic() > deadline:
            break
    return "".join(lines)


def _flow_run_state(api_url: str, run_id: str) -> str:
    return httpx.get(f"{api_url}/flow_runs/{run_id}", timeout=10).json()["state"]["type"]


@pytest.mark.timeout(600)
def test_readme_quick_start_works_on_a_fresh_clone(tmp_path):
    """Terminal 1 runs the README's first command; terminal 2 the rest, nothing exported.

    The ports come from the README's CAMFLEET_*_PORT variables (free ones: this machine
    may run its own broker on 1883). Terminal 2 gets only what a new shell would have.
    """
    clone = _fresh_clone(tmp_path)
    first, *others = _quick_start_commands()
    assert first.startswith("make ")
    shell_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "MQTT_", "CAMFLEET_")) and k != "DATABASE_URL"
    }
    shell_env["PREFECT_HOME"] = str(tmp_path / "home" / ".prefect")  # the user's ~/.prefect
    ports = {
        "CAMFLEET_MQTT_PORT": free_port(),
        "CAMFLEET_PREFECT_PORT": free_port(),
        "CAMFLEET_API_PORT": free_port(),
    }
    terminal1 = subprocess.Popen(
        ["bash", "-c", first],
        cwd=clone,
        env={**shell_env, **{k: str(v) for k, v in ports.items()}},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # Ctrl-C goes to the terminal's whole process group
    )
    stopped = ""
    try:
        banner = _wait_for_line(terminal1, "camfleet is up", 300)
        assert "camfleet is up" in banner, banner
        assert f"mqtt://127.0.0.1:{ports['CAMFLEET_MQTT_PORT']}" in banner
        assert f"http://127.0.0.1:{ports['CAMFLEET_API_PORT']}" in banner
        prefect_api = f"http://127.0.0.1:{ports['CAMFLEET_PREFECT_PORT']}/api"
        for command in others:  # the banner tells the same commands
            assert command.replace(".venv/bin/", "").split(" --")[0] in banner.replace(
                ".venv/bin/", ""
            ), command
        outputs = {}
        for command in others:
            result = subprocess.run(
                ["bash", "-c", command],
                cwd=clone,
                env=shell_env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert result.returncode == 0, (command, result.stdout, result.stderr)
            assert "Traceback" not in result.stderr, (command, result.stderr)
            outputs[command] = result.stdout
        esp32 = next(out for cmd, out in outputs.items() if "simulate esp32" in cmd)
        assert "images_failed: 0" in esp32 and "images_acked: 2" in esp32, esp32
        run_out = next(out for cmd, out in outputs.items() if "deployment run" in cmd)
        assert prefect_api.removesuffix("/api") in run_out, run_out
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", run_out).group(1)
        listing = next(out for cmd, out in outputs.items() if "flow-run ls" in cmd)
        assert "Flow Runs" in listing, listing
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            state = _flow_run_state(prefect_api, run_id)
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(2)
        assert state == "COMPLETED", state
    finally:
        os.killpg(terminal1.pid, signal.SIGINT)
        stopped, _ = terminal1.communicate(timeout=180)
    assert "stopped." in stopped, stopped[-3000:]
    assert not (clone / ".camfleet" / "stack.json").exists()
    profiles = (tmp_path / "home" / ".prefect" / "profiles.toml").read_text()
    assert 'active = "camfleet"' not in profiles  # the user's profile is back
    # up has returned; processes it stopped may take a moment to be reaped
    assert wait_until(lambda: not _stack_processes(clone / ".camfleet"), 30), _stack_processes(
        clone / ".camfleet"
    )
