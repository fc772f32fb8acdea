"""What several test files share: `camfleet api` as a child process, ready when its
/health answers; polling for a condition; reading rows. (No tests here.)"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

# A child importing FastAPI, asyncpg and boto3 can take this long on a busy 2-core box.
API_START_TIMEOUT_S = 60.0


def wait_healthy(
    base_url: str, proc: subprocess.Popen, log_path: Path, timeout: float = API_START_TIMEOUT_S
) -> None:
    """Poll GET {base_url}/health until it answers 200 (the API's readiness signal).

    Raises RuntimeError with the log's tail when the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            state = "exited" if proc.poll() is not None else "did not start"
            raise RuntimeError(f"camfleet api {state}:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)


@contextlib.contextmanager
def api_process(
    cmd: list[str], port: int, env: dict[str, str], log_path: Path, **popen
) -> Iterator[str]:
    """Run `cmd` (a `camfleet api ... --port PORT`) logging to `log_path`; yields its base
    URL once healthy, and terminates it (then kills it) on the way out."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, **popen)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, log_path)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_until(predicate, what: str, timeout: float = 60.0, step: float = 0.05):
    """`predicate()`'s first truthy value, polled every `step`; fails naming `what` after
    `timeout` (generous: the machine may be loaded, and a poll costs nothing when fast)."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)
    return value


def wait_for(predicate, timeout: float = 15.0, step: float = 0.1):
    """`predicate()`'s first truthy value, polled every `step`; after `timeout` its last
    (falsy) value, for `assert wait_for(...), details` (wait_until raises instead)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(step)
    return predicate()


def rows(dsn: str, sql: str, *args) -> list[tuple]:
    """Every row of one query, on a connection of its own."""
    from camfleet import db

    with db.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


def assembler_env(mosquitto, database_url: str, tmp_path: Path, name: str) -> dict[str, str]:
    """Environment of a `camfleet assembler` child with no Prefect server: the session's
    PREFECT_* left out, a fresh PREFECT_HOME, objects under tmp_path/o, a client id of
    its own (a persistent MQTT session must not be shared between tests)."""
    import os
    import uuid

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        MQTT_HOST=mosquitto.host,
        MQTT_PORT=str(mosquitto.port),
        DATABASE_URL=database_url,
        STORAGE_URL=f"file://{tmp_path / 'o'}",
        MQTT_CLIENT_ID=f"{name}-{uuid.uuid4().hex[:6]}",
        PYTHONUNBUFFERED="1",
        PREFECT_HOME=str(tmp_path / "prefect-home"),
    )
    return env
