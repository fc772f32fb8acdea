"""Helpers for the command-API tests: the real API as a subprocess, an SSE reader thread.

(No tests here; the module name keeps it with the files of issue #6.)
"""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

from camfleet import db
from camfleet.agent.sse import SseParser
from camfleet.localsvc import free_port
from tests.helpers import wait_healthy

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-key-for-command-api-0123456789"


class ApiProcess:
    """`camfleet api` on a free loopback port, against the test's database."""

    def __init__(self, database_url: str, storage_dir: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "STORAGE_URL": storage_dir.as_uri(),
            "CAMFLEET_SECRET_KEY": SECRET,
            "CAMFLEET_SSE_PING_SECONDS": "0.3",
            "CAMFLEET_ALLOW_DEVICE_ID_ONLY": "true",
            "PYTHONPATH": str(ROOT),
            **env,
        }
        self.proc: subprocess.Popen | None = None
        self.log = storage_dir.parent / f"api-{self.port}.log"

    def start(self) -> ApiProcess:
        cmd = [sys.executable, "-m", "camfleet.cli", "api", "--port", str(self.port)]
        cmd += ["--log-level", "warning"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        wait_healthy(self.url, self.proc, self.log)
        return self

    def stop(self, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> ApiProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class SseReader:
    """Reads a command stream on a thread; `events` is a queue of parsed data objects."""

    def __init__(self, base_url: str, device_id: str, headers: dict | None = None) -> None:
        self.url = f"{base_url}/v1/devices/{device_id}/commands"
        self.headers = headers or {}
        self.events: queue.Queue = queue.Queue()
        self.status: int | None = None
        self.body: bytes = b""
        self._stop = threading.Event()
        self._response = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        parser = SseParser()
        try:
            with (
                httpx.Client(timeout=httpx.Timeout(5, read=None)) as client,
                client.stream("GET", self.url, headers=self.headers) as resp,
            ):
                self._response = resp
                self.status = resp.status_code
                if resp.status_code != 200:
                    self.body = resp.read()
                    self.events.put(
                        {"event": "_refused", "status": resp.status_code, "body": self.body[:500]}
                    )
                    return
                for line in resp.iter_lines():
                    if self._stop.is_set():
                        return
                    event = parser.feed_line(line)
                    if event is not None:
                        self.events.put(event)
        except Exception as exc:  # the stream ended (server stopped or we closed it)
            self.events.put({"event": "_closed", "error": type(exc).__name__})
            return
        self.events.put({"event": "_closed"})

    def next(self, timeout: float = 5.0, skip_pings: bool = True) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no event within {timeout} s from {self.url}")
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if skip_pings and event.get("event") == "ping":
                continue
            return event

    def next_command(self, timeout: float = 5.0) -> dict:
        while True:
            event = self.next(timeout)
            if "cmd" in event:
                return event
            if event.get("event", "").startswith("_"):
                raise AssertionError(f"stream ended: {event}")

    def close(self) -> None:
        self._stop.set()
        if self._response is not None:
            try:
                self._response.close()
            except Exception:
                pass
        self._thread.join(5)


def jpeg_bytes(size=(64, 48), color=(120, 80, 40), pattern=True) -> bytes:
    img = Image.new("RGB", size, color)
    if pattern:
        px = img.load()
        for x in range(size[0]):
            for y in range(size[1]):
                if (x // 4 + y // 4) % 2:
                    px[x, y] = (240, 240, 240)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


def capture_body(device_id: str, trigger_id: str | None, image: bytes | None = None) -> dict:
    return {
        "device_id": device_id,
        "trigger_id": trigger_id,
        "image_base64": base64.b64encode(image or jpeg_bytes()).decode(),
        "captured_at": "2026-11-09T14:05:30.123Z",
        "trigger_label": "scheduled_interval",
        "metadata": {"device_version": "2.0.0", "trigger_type": "scheduled"},
    }


def add_device(dsn: str, device_id: str, config: dict | None = None, status="active") -> None:
    with db.transaction(dsn) as conn:
        db.queries.triggers_create_device(
            conn, device_id=device_id, kind="visant", friendly_name=device_id, config=config or {}
        )
        if status != "active":
            with conn.cursor() as cur:
                cur.execute(
                    "UPDATE devices SET status = %s WHERE device_id = %s", (status, device_id)
                )


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def fetch(dsn: str, sql: str, *args):
    with db.transaction(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


def dumps(obj) -> str:
    return json.dumps(obj)
