"""`camfleet up --demo`: simulated devices of every kind, so captures flow within a minute.

One process that drives the real simulators (as subprocesses of the `camfleet` CLI)
against the stack `camfleet up` started:

- ESP32-CAMs sending chunked JPEGs over MQTT (seed 002) to the assembler;
- an entomologist edge box batch-uploading through the signer (seed 000);
  (both send real pictures showing device and time, each under a new name, so every
  round is a new capture and evaluation has real images to decode);
- Lifelog cameras pairing, uploading and ingesting (seed 004);
- a Visant camera holding an SSE stream, executing scheduled triggers (seed 003).
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

log = logging.getLogger("camfleet.demo")

ESP32_EVERY_S = 20
EDGE_EVERY_S = 30
VISANT_TRIGGER_INTERVAL_S = 15
LIFELOG_INTERVAL_S = 10
DEMO_USER = "demo-operator"
ESP32_PREFIX = "DE0A00"
ESP32_DEVICES = 3
EDGE_SERIAL = "ENTO-DEMO-0001"


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "camfleet.cli", *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=300,
    )


def _spawn(*args: str, log_path: Path, secrets: dict[str, str] | None = None) -> subprocess.Popen:
    """A simulator process; tokens go in its environment, never its (world-readable) argv."""
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "camfleet.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(secrets or {})},
        )


def _demo_jpeg(path: Path) -> Path:
    """A small scene with texture, so evaluation has something to score."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (640, 480), (70, 110, 150))
    draw = ImageDraw.Draw(image)
    for i in range(0, 640, 40):
        draw.rectangle([i, 300 - i // 4, i + 30, 480], fill=(30 + i // 4, 140, 60))
    draw.ellipse([480, 40, 580, 140], fill=(250, 220, 90))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85)
    path.write_bytes(buf.getvalue())
    return path


def _wait_for_api(api_url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"device API at {api_url} did not come up")


def _pair_device(api_url: str, user_key: str, name: str, kind: str) -> tuple[str, str]:
    auth = {"Authorization": f"Bearer {user_key}"}
    body = {"name": name, "kind": kind}
    pair = httpx.post(f"{api_url}/devices/pair", json=body, headers=auth, timeout=10)
    pair.raise_for_status()
    activate = httpx.post(
        f"{api_url}/devices/activate",
        json={"pairing_code": pair.json()["pairing_code"]},
        timeout=10,
    )
    activate.raise_for_status()
    body = activate.json()
    return body["device_id"], body["device_token"]


def demo_device_ids() -> list[str]:
    """The ids the demo's ESP32 and edge simulators register under (by MQTT / the signer)."""
    from camfleet.simulators.esp32 import device_id

    return [device_id(ESP32_PREFIX, i) for i in range(ESP32_DEVICES)] + [EDGE_SERIAL]


def claim_demo_devices(dsn: str, user_id: str, device_ids: list[str]) -> set[str]:
    """Give the demo's ownerless devices to the demo user, so they show in its console.

    MQTT and edge ingest register devices without an owner (`camfleet devices assign`
    gives them one); the demo does the same for its own ids once they exist. Returns
    the listed ids that have an owner now (devices already owned are never moved), so
    the caller stops asking about them.
    """
    from camfleet import db

    with db.transaction(dsn) as conn:
        rows = db.queries.devices_claim_unowned(conn, user_id=user_id, device_ids=device_ids)
        return {row[0] for row in rows}  # a lazy cursor: read before the connection closes


def announce_esp32_devices(dsn: str | None, broker=None) -> None:
    """Register the demo's ESP32-CAMs and have each say it is alive, before they send.

    With assembler replicas (`camfleet up --demo` runs 2), a replica subscribes to the
    data of the registered devices of the partitions it leases, and to a new device's
    data once its status arrives: an image sent right after a new device's first status
    would reach no replica and wait for the device's resend. Registered here (read by a
    replica at start and every KNOWN_REFRESH_S) and announced over MQTT (learnt at
    once), the devices' first images are served on their first send. Best effort: a
    replica that starts later reads them from the database.
    """
    ids = [d for d in demo_device_ids() if d != EDGE_SERIAL]
    if dsn:
        from camfleet import db

        with db.transaction(dsn) as conn:
            for device in ids:
                db.queries.ingest_ensure_device(conn, device_id=device)
    if broker is None:
        from blocks.mqtt import MqttBroker

        broker = MqttBroker.from_env()
    client = broker.client(client_id=f"camfleet-demo-{os.getpid()}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        sent = [
            client.publish(
                f"ESP32CAM/{device}/status",
                json.dumps({"device_id": device, "status": "Alive", "pendingImg": 0}),
                qos=1,
            )
            for device in ids
        ]
        for info in sent:
            info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def _database_url() -> str | None:
    from camfleet.settings import get_settings

    url = get_settings().database_url
    return url.get_secret_value() if url is not None else None


def run(api_url: str, work_dir: Path) -> None:
    work_dir.mkdir(parents=True, exist_ok=True)
    logs = work_dir / "logs"
    logs.mkdir(exist_ok=True)
    _wait_for_api(api_url)
    try:
        announce_esp32_devices(_database_url())
    except Exception as exc:  # noqa: BLE001 - the first images then wait for a resend
        log.warning("could not announce the demo's ESP32-CAMs: %s", type(exc).__name__)
    state_path = work_dir / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if "user_key" not in state:
        state["user_key"] = _cli("users", "create-key", DEMO_USER, "--label", "demo").stdout.strip()
    if "visant" not in state:
        state["visant"] = _pair_device(api_url, state["user_key"], "demo-visant-cam", "visant")
    fd = os.open(state_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f)

    visant_id, visant_token = state["visant"]
    _cli("triggers", "configure", visant_id, "--interval-seconds", str(VISANT_TRIGGER_INTERVAL_S))
    image = _demo_jpeg(work_dir / "scene.jpg")
    children = [
        _spawn(
            "agent",
            "--api-url",
            api_url,
            "--device-id",
            visant_id,
            "--camera-source",
            str(image),
            "--reconnect-delay",
            "2",
            log_path=logs / "visant-agent.log",
            secrets={"CAMFLEET_DEVICE_TOKEN": visant_token},
        ),
        _spawn(
            "simulate",
            "lifelog",
            "--api",
            api_url,
            "--devices",
            "2",
            "--photos",
            "100000",
            "--interval",
            str(LIFELOG_INTERVAL_S),
            "--image",
            str(image),
            "--state-dir",
            str(work_dir / "lifelog"),
            log_path=logs / "lifelog.log",
            secrets={"CAMFLEET_USER_KEY": state["user_key"]},
        ),
    ]
    next_esp32 = next_edge = 0.0
    dsn, unclaimed = _database_url(), set(demo_device_ids())
    try:
        while True:
            now = time.monotonic()
            if unclaimed and dsn:
                try:
                    unclaimed -= claim_demo_devices(dsn, DEMO_USER, sorted(unclaimed))
                except Exception as exc:  # noqa: BLE001 - the demo keeps running; retried
                    log.warning("could not assign demo devices yet: %s", type(exc).__name__)
            if now >= next_esp32:
                children.append(
                    _spawn(
                        "simulate",
                        "esp32",
                        "--devices",
                        str(ESP32_DEVICES),
                        "--images",
                        "1",
                        "--id-prefix",
                        ESP32_PREFIX,
                        "--pictures",  # real JPEGs, a new name each round
                        log_path=logs / "esp32.log",
                    )
                )
                next_esp32 = now + ESP32_EVERY_S
            if now >= next_edge:
                children.append(
                    _spawn(
                        "simulate",
                        "edge",
                        "--serial",
                        EDGE_SERIAL,
                        "--files",
                        "5",
                        "--workdir",
                        str(work_dir / "edge"),
                        "--pictures",
                        log_path=logs / "edge.log",
                    )
                )
                next_edge = now + EDGE_EVERY_S
            children = [c for c in children if c.poll() is None]
            time.sleep(1)
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()


def main() -> None:
    from camfleet.settings import get_settings

    logging.basicConfig(level=logging.INFO)
    settings = get_settings()
    api_url = settings.public_url or f"http://{settings.api_host}:{settings.api_port}"
    run(api_url, settings.data_dir.resolve() / "demo")


if __name__ == "__main__":
    main()
