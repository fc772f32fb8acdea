"""Ready means subscribed (issue 12, item 6): a device that publishes the moment a
service reports ready is never lost.

The race is made wide and deterministic: the service reaches the broker through a slow
uplink (a TCP proxy that holds what the service sends for UPLINK_DELAY_S), so its
SUBSCRIBE lands UPLINK_DELAY_S after the CONNACK came back.  A service that said
"ready" on the CONNACK would then miss what a device publishes at once (nothing
subscribed yet, and a new client id has no session to queue it in); one that waits for
the SUBACK hears it.  The device talks to the broker directly.

Both services run as their real commands: `camfleet assembler --health-port`
(/healthz) and `camfleet signer --health-port` (/ready).
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest

from camfleet.localsvc import free_port
from tests.test_edge_signer_isolation import signer_env
from tests.test_edge_transaction import Listener
from tests.test_mqtt_ingest import Device, broker_block, jpeg, rows
from tests.test_mqtt_isolation import send_image

# Long against the few milliseconds between a probe seeing "ready" and the device's
# publish, even on a loaded machine; short against the test's own run time.
UPLINK_DELAY_S = 2.0


class SlowUplink:
    """127.0.0.1:port -> the broker; client-to-broker bytes are held `delay` seconds
    (order kept), broker-to-client bytes pass at once."""

    def __init__(self, host: str, port: int, delay: float):
        self.target = (host, port)
        self.delay = delay
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            held: queue.SimpleQueue = queue.SimpleQueue()
            threading.Thread(target=self._read, args=(client, held), daemon=True).start()
            threading.Thread(target=self._release, args=(held, upstream), daemon=True).start()
            threading.Thread(target=self._pass, args=(upstream, client), daemon=True).start()

    def _read(self, src: socket.socket, held: queue.SimpleQueue) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            held.put((time.monotonic() + self.delay, data))
            if not data:
                return

    def _release(self, held: queue.SimpleQueue, dst: socket.socket) -> None:
        while True:
            due, data = held.get()
            # the injected latency itself: wait until this piece is due (or we close)
            if self.closed.wait(max(0.0, due - time.monotonic())) or not data:
                _close(dst)
                return
            try:
                dst.sendall(data)
            except OSError:
                return

    def _pass(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
            except OSError:
                break
        _close(dst)

    def close(self) -> None:
        self.closed.set()
        _close(self.server)
        for s in self.sockets:
            _close(s)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0  # not listening yet


def first_ready(url: str, proc: subprocess.Popen, timeout: float = 90) -> list[int]:
    """Probe `url` until it answers 200; returns every status seen (for the test to
    check that "not ready" was reported first)."""
    seen: list[int] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        seen.append(http_status(url))
        if seen[-1] == 200:
            return seen
        time.sleep(0.01)  # a supervisor's tight probe
    raise AssertionError(f"never ready (exit {proc.poll()}); statuses {sorted(set(seen))}")


@pytest.fixture
def uplink(mosquitto):
    proxy = SlowUplink(mosquitto.host, mosquitto.port, UPLINK_DELAY_S)
    yield proxy
    proxy.close()


def start(cmd: list[str], env: dict, log_path) -> tuple[subprocess.Popen, object]:
    log = open(log_path, "wb")  # noqa: SIM115 (closed by stop)
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log


def stop(proc: subprocess.Popen, log) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    log.close()


def test_assembler_hears_a_device_that_publishes_the_moment_it_is_ready(
    mosquitto, uplink, database_url, tmp_path
):
    device = Device(broker_block(mosquitto), "5EADF0000001")  # subscribed to its ACKs first
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        MQTT_HOST="127.0.0.1",
        MQTT_PORT=str(uplink.port),
        DATABASE_URL=database_url,
        STORAGE_URL=f"file://{tmp_path / 'objects'}",
        MQTT_CLIENT_ID=f"ready-{uuid.uuid4().hex[:8]}",  # new: no session queues for it
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PYTHONUNBUFFERED="1",
    )
    cmd = [sys.executable, "-m", "camfleet.cli", "assembler", "--health-port", str(port)]
    proc, log = start(cmd, env, tmp_path / "assembler.log")
    try:
        seen = first_ready(f"http://127.0.0.1:{port}/healthz", proc)
        data = jpeg(3000, 7)
        send_image(device, "first.jpg", data)  # at once: no grace period
        assert 503 in seen  # it said "not ready" while its SUBSCRIBE was on the way
        ack = device.next_ack(timeout=60)
        assert ack["image_name"] == "first.jpg" and "ACK_OK" in ack
        assert rows(
            database_url,
            "select ingest_status from captures where device_id = %s",
            device.dev,
        ) == [("stored",)]
    finally:
        device.close()
        stop(proc, log)
    assert proc.returncode == 0, (tmp_path / "assembler.log").read_text()


def test_signer_answers_a_request_sent_the_moment_it_is_ready(
    mosquitto, uplink, s3, bucket, database_url, tmp_path
):
    serial = f"RDY-{uuid.uuid4().hex[:8]}"
    device = Listener(mosquitto, [f"cameraDevice/getURL/{serial}"])
    port = free_port()
    env = signer_env(database_url, s3, bucket, mosquitto, tmp_path)
    env["MQTT_PORT"] = str(uplink.port)
    cmd = [sys.executable, "-m", "camfleet.cli", "signer", "--health-port", str(port)]
    cmd += ["--client-id", f"ready-{uuid.uuid4().hex[:8]}"]
    proc, log = start(cmd, env, tmp_path / "signer.log")
    try:
        seen = first_ready(f"http://127.0.0.1:{port}/ready", proc)
        body = {"device-serialID": serial, "bucket-name": bucket, "files": ["a.jpg"]}
        device.publish(f"cameraDevice/generateURL/{serial}", body)  # at once
        assert 503 in seen
        topic, payload = device.get(timeout=60)
        answer = json.loads(payload)
        assert [f["filename"] for f in answer["files"]] == ["a.jpg"]
    finally:
        device.close()
        stop(proc, log)
    assert proc.returncode == 0, (tmp_path / "signer.log").read_text()
