"""<data dir>/stack.json: how to reach the stack a running `camfleet up` started.

`camfleet up` writes it (mode 0600: it holds the broker's service password) once
everything is up and removes it on stop. Every `camfleet` command reads it as the
lowest-priority settings source (below the environment and .env), so commands in
another terminal find the stack's database, broker, device API and Prefect server with
nothing exported. A file left by a `camfleet up` that died is ignored: it names the
pid (and start time) that wrote it, and that process must still be alive.

Keys are the environment variable names of the settings (DATABASE_URL, MQTT_PORT...).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil

FILE_NAME = "stack.json"


def default_data_dir() -> Path:
    return Path(os.environ.get("CAMFLEET_DATA_DIR") or ".camfleet")


def path(data_dir: Path | None = None) -> Path:
    return (data_dir if data_dir is not None else default_data_dir()) / FILE_NAME


def process_identity() -> dict:
    """This process' pid and start time: together they survive pid reuse."""
    me = psutil.Process()
    return {"pid": me.pid, "pid_started": me.create_time()}


def _alive(facts: dict) -> bool:
    pid = facts.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        started = facts.get("pid_started")
        return started is None or abs(proc.create_time() - float(started)) < 1.0
    except (psutil.Error, TypeError, ValueError):
        return False


def read(data_dir: Path | None = None) -> dict:
    """The running stack's facts, or {} when no `camfleet up` is running for data_dir."""
    try:
        facts = json.loads(path(data_dir).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(facts, dict) or not _alive(facts):
        return {}
    return facts


def settings_values(data_dir: Path | None = None) -> dict[str, str]:
    """The stack's settings, keyed by environment variable name."""
    env = read(data_dir).get("env")
    if not isinstance(env, dict):
        return {}
    return {str(k): str(v) for k, v in env.items()}


def write(data_dir: Path, facts: dict) -> Path:
    """Atomically replace stack.json, readable by its owner only."""
    target = path(data_dir)
    tmp = target.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(facts, f, indent=2)
    os.replace(tmp, target)
    return target


def remove(data_dir: Path) -> None:
    path(data_dir).unlink(missing_ok=True)
