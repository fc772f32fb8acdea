"""<data dir>/stack.json feeds every command's settings while its `camfleet up` lives,
and never after: a file left by a dead (or pid-reused) process is ignored."""

from __future__ import annotations

import subprocess
import sys

from camfleet import stackfile
from camfleet.settings import Settings


def test_settings_come_from_a_running_stack_below_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CAMFLEET_DATA_DIR", str(tmp_path))
    for var in ("MQTT_PORT", "MQTT_USERNAME", "DATABASE_URL", "CAMFLEET_API_PORT"):
        monkeypatch.delenv(var, raising=False)
    facts = {
        **stackfile.process_identity(),
        "env": {"MQTT_PORT": "21999", "MQTT_USERNAME": "camfleet", "CAMFLEET_API_PORT": "28123"},
    }
    written = stackfile.write(tmp_path, facts)
    assert written.stat().st_mode & 0o777 == 0o600  # it holds the broker's password
    settings = Settings()
    assert (settings.mqtt_port, settings.mqtt_username, settings.api_port) == (
        21999,
        "camfleet",
        28123,
    )
    monkeypatch.setenv("MQTT_PORT", "1999")  # what the user exports wins
    assert Settings().mqtt_port == 1999


def test_a_stack_file_of_a_dead_or_reused_pid_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("CAMFLEET_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("MQTT_PORT", raising=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stackfile.write(tmp_path, {"pid": int(dead.stdout), "env": {"MQTT_PORT": "21999"}})
    assert stackfile.read(tmp_path) == {} and Settings().mqtt_port == 1883
    reused = {**stackfile.process_identity(), "env": {"MQTT_PORT": "21999"}}
    reused["pid_started"] -= 3600  # this pid, but a process started an hour earlier
    stackfile.write(tmp_path, reused)
    assert stackfile.read(tmp_path) == {} and Settings().mqtt_port == 1883
