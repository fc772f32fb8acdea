"""Fault injection for MQTT ingest (issue #9): nothing a device got ACK_OK for is lost.

While simulated ESP32 devices keep sending through a real `camfleet assembler` process,
Mosquitto is killed (SIGKILL) and restarted, then PostgreSQL, then the assembler itself
(SIGKILL). After each recovery the invariants are checked:

- every image a device got ACK_OK for has its `captures` row (stored) and its object,
  whose bytes hash to the row's sha256 and equal what the device sent;
- no duplicate rows, no second object for one (device, image);
- no orphaned temporary upload files (`.upload-*` of the local store): counted and
  printed; not asserted yet, because a SIGKILL mid-store does leave them (see
  docs/reliability.md, open findings).

Run with `make faults` (or `.venv/bin/pytest tests/test_faults.py -m slow -s`); it prints
the table pasted into docs/reliability.md. Private Mosquitto and PostgreSQL instances
(camfleet.localsvc) are used so the session's shared ones are never killed; PostgreSQL
runs with fsync on, because a killed fsync-off cluster may lose committed rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
import uuid
import warnings
from collections import Counter
from pathlib import Path

import pytest

from blocks.mqtt import MqttBroker
from camfleet import db
from camfleet.localsvc import MosquittoInstance, PostgresInstance
from camfleet.simulators.esp32 import SimOptions, simulate
from tests.faults_common import ChildProcess, wait_until

pytestmark = pytest.mark.slow

# A small fleet keeps the 2-core machine usable for others; each device has one image
# in flight at a time, so DEVICES is also the most images a fault can catch mid-way.
DEVICES = 4
IMAGES_PER_ROUND = 2
IMAGE_BYTES = 12_000
# Devices wait this long for ACK_OK before resending the whole image, and resend this
# often: enough to ride out the longest outage below (~25 s) without giving up.
ACK_TIMEOUT_S = 3.0
MAX_RESENDS = 15
# How long each dependency stays down: long enough for in-flight images to fail.
DOWN_S = 2.0
# A recovery slower than this is a failure, not a slow machine.
RECOVERY_LIMIT_S = 90.0
WARMUP_ACKS = 6
# A clean shutdown finishes in-flight stores in a second or two; past this, SIGKILL.
STOP_WAIT_S = 20
# Nested deeper than Python's recursion limit inside json.loads, yet ~10 kB: under the
# assembler's 16 KiB message cap.
DEEP_NESTING = 5000


class Observer:
    """Watches the broker: metadata declared and ACK_OK answered, per (device, image)."""

    def __init__(self, broker: MqttBroker):
        self.lock = threading.Lock()
        self.declared: set[tuple[str, str]] = set()
        self.acked: dict[tuple[str, str], float] = {}
        self.c = broker.client(client_id=f"fault-observer-{uuid.uuid4().hex[:6]}")

        def on_connect(c, *a):
            c.subscribe([("ESP32CAM/+/ack", 1), ("ESP32CAM/+/data", 1)])

        self.c.on_connect = on_connect
        self.c.on_message = self._on_message
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()

    def _on_message(self, c, userdata, m):
        dev, kind = m.topic.split("/")[1:3]
        if kind == "data" and b'"chunk_id"' in m.payload:
            return
        try:
            body = json.loads(m.payload)
        except ValueError:
            return
        if not isinstance(body, dict) or not isinstance(body.get("image_name"), str):
            return
        key = (dev, body["image_name"])
        with self.lock:
            if kind == "data":
                self.declared.add(key)
            elif "ACK_OK" in body:
                self.acked.setdefault(key, time.monotonic())

    def in_flight(self) -> int:
        with self.lock:
            return len(self.declared - set(self.acked))

    def acks_after(self, t: float) -> int:
        with self.lock:
            return sum(1 for v in self.acked.values() if v > t)

    def snapshot(self) -> set[tuple[str, str]]:
        with self.lock:
            return set(self.acked)

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


class Fleet:
    """Rounds of simulated devices, a fresh id prefix per round, until stopped."""

    def __init__(self, broker: MqttBroker):
        self.broker = broker
        self.sent: dict[tuple[str, str], bytes] = {}
        self.failed = 0
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        n = 0
        while not self.stop.is_set():
            n += 1
            opts = SimOptions(
                devices=DEVICES,
                images=IMAGES_PER_ROUND,
                image_bytes=IMAGE_BYTES,
                id_prefix=f"FA{n:04X}",
                seed=n,
                ack_timeout=ACK_TIMEOUT_S,
                max_resends=MAX_RESENDS,
            )
            try:
                r = simulate(self.broker, opts)
            except ConnectionError:  # the broker is down right now: try the round again
                time.sleep(0.5)
                continue
            self.sent.update(r.sent)
            self.failed += r.images_failed

    def close(self, timeout=120):
        self.stop.set()
        self.t.join(timeout)


def check_invariants(dsn: str, objects: Path, acked: set, sent: dict) -> dict[str, int]:
    with db.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "select device_id, device_capture_id, ingest_status, storage_path, sha256"
            " from captures where source = 'mqtt'"
        )
        rows = cur.fetchall()
    by_key = Counter((r[0], r[1]) for r in rows)
    row_of = {(r[0], r[1]): r for r in rows}
    lost = []
    for key in acked:
        row = row_of.get(key)
        if row is None or row[2] != "stored" or not row[3]:
            lost.append((key, "no stored row"))
            continue
        path = objects / row[3]
        if not path.is_file():
            lost.append((key, "no object"))
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != row[4]:
            lost.append((key, "object sha256 differs from the row"))
        elif key in sent and hashlib.sha256(sent[key]).hexdigest() != digest:
            lost.append((key, "object differs from what the device sent"))
    per_image = Counter()
    referenced = {r[3] for r in rows if r[3]}
    orphans = 0
    temps = 0
    now = time.time()
    for f in objects.rglob("*"):
        if not f.is_file():
            continue
        if f.name.startswith(".upload-"):
            temps += now - f.stat().st_mtime > 5  # older than any store in progress
            continue
        rel = f.relative_to(objects).as_posix()
        dev = rel.split("/")[1]
        per_image[(dev, f.name.split("-", 1)[1])] += 1
        orphans += rel not in referenced
    duplicated = sum(n - 1 for n in by_key.values() if n > 1)
    duplicated += sum(n - 1 for n in per_image.values() if n > 1)
    if lost:
        print("LOST:", lost[:10])
    return {"lost": len(lost), "duplicated": duplicated, "orphan_objects": orphans, "temps": temps}


@pytest.fixture
def stack(tmp_path):
    with MosquittoInstance() as mq, PostgresInstance() as pg:
        dsn = pg.create_database("faults")
        db.migrate(dsn)
        objects = tmp_path / "objects"
        env = {
            **os.environ,
            "MQTT_HOST": mq.host,
            "MQTT_PORT": str(mq.port),
            "MQTT_CLIENT_ID": "fault-assembler",  # persistent session across restarts
            "DATABASE_URL": dsn,
            "STORAGE_URL": f"file://{objects}",
            "CAMFLEET_DATA_DIR": str(tmp_path / "data"),
            "CAPTURE_TIMEOUT_MS": "5000",
            "RETRANSMIT_DELAY_MS": "800",
            "RETRANSMIT_MAX": "2",
        }
        env.pop("CAMFLEET_MQTT_BLOCK", None)
        env.pop("CAMFLEET_DATABASE_BLOCK", None)
        exe = str(Path(sys.executable).parent / "camfleet")
        asm = ChildProcess(
            [exe, "assembler", "--no-prefect"], env, tmp_path / "assembler.log",
            ready_line="", stop_wait_s=STOP_WAIT_S,
        )  # fmt: skip
        asm.spawn()
        try:
            yield mq, pg, dsn, objects, asm, tmp_path
        finally:
            asm.stop()


def test_kill_broker_database_and_assembler_while_devices_send(stack):
    mq, pg, dsn, objects, asm, tmp_path = stack
    broker = MqttBroker(host=mq.host, port=mq.port)
    obs = Observer(broker)
    fleet = Fleet(broker)
    try:
        assert wait_until(lambda: len(obs.snapshot()) >= WARMUP_ACKS, 60), (
            "no ACKs before any fault: " + (tmp_path / "assembler.log").read_text()[-2000:]
        )

        def kill_mosquitto():
            mq.kill()
            time.sleep(DOWN_S)
            mq.restart()

        def kill_postgres():
            pg.kill()
            time.sleep(DOWN_S)
            pg.restart()

        def kill_assembler():
            asm.kill()
            time.sleep(DOWN_S)
            asm.spawn()

        table = []
        for name, fault in (
            ("Mosquitto SIGKILL", kill_mosquitto),
            ("PostgreSQL SIGKILL", kill_postgres),
            ("assembler SIGKILL", kill_assembler),
        ):
            in_flight = obs.in_flight()
            fault()
            t_up = time.monotonic()
            recovered = wait_until(lambda: obs.acks_after(t_up) > 0, RECOVERY_LIMIT_S)
            recovery = time.monotonic() - t_up
            time.sleep(2 * ACK_TIMEOUT_S)  # let resends of the images caught mid-way land
            inv = check_invariants(dsn, objects, obs.snapshot(), dict(fleet.sent))
            table.append((name, recovery if recovered else None, in_flight, inv))
            assert recovered, f"{name}: no ACK_OK within {RECOVERY_LIMIT_S}s of recovery"

        fleet.close()
        # the images still in flight when the fleet stopped: their devices resend them
        time.sleep(2 * ACK_TIMEOUT_S)
        acked = obs.snapshot()
        final = check_invariants(dsn, objects, acked, dict(fleet.sent))
        table.append(("final (all rounds)", None, obs.in_flight(), final))

        print()
        print(f"devices sent {len(fleet.sent)} images, {len(acked)} ACK_OK, "
              f"{fleet.failed} gave up after {MAX_RESENDS} resends")  # fmt: skip
        print("| fault | recovery (s) | in flight | lost | duplicated | orphan objects "
              "| orphan temp files |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for name, rec, inflight, inv in table:
            rec_s = f"{rec:.1f}" if rec is not None else "-"
            print(f"| {name} | {rec_s} | {inflight} | {inv['lost']} | {inv['duplicated']} "
                  f"| {inv['orphan_objects']} | {inv['temps']} |")  # fmt: skip
        for name, _, _, inv in table:
            assert inv["lost"] == 0, name
            assert inv["duplicated"] == 0, name
        # Orphaned `.upload-*` files are printed, not asserted: a SIGKILL mid-store
        # leaves them in the local store and nothing sweeps them yet (an open finding
        # in docs/reliability.md; camfleet/storage/local.py owns the fix).
        if final["temps"]:
            warnings.warn(f"{final['temps']} orphaned .upload-* temp files", stacklevel=1)
        assert len(acked) >= WARMUP_ACKS + 3
    finally:
        fleet.close(10)
        obs.close()


def test_one_nested_json_message_does_not_stop_ingest(stack):
    mq, pg, dsn, objects, asm, tmp_path = stack
    broker = MqttBroker(host=mq.host, port=mq.port)
    opts = dict(devices=1, images=1, image_bytes=IMAGE_BYTES, ack_timeout=ACK_TIMEOUT_S)
    before = simulate(broker, SimOptions(id_prefix="DE0001", max_resends=5, **opts))
    assert before.images_acked == 1
    evil = broker.client(client_id=f"evil-{uuid.uuid4().hex[:6]}")
    evil.connect(mq.host, mq.port)
    evil.loop_start()
    try:
        nested = b"[" * DEEP_NESTING + b"]" * DEEP_NESTING
        payload = b'{"device_id":' + nested + b"}"
        evil.publish("ESP32CAM/abcd1234/data", payload, qos=1).wait_for_publish(10)
    finally:
        evil.disconnect()
        evil.loop_stop()
    after = simulate(broker, SimOptions(id_prefix="DE0002", max_resends=1, **opts))
    assert after.images_acked == 1, "ingest stopped after one nested-JSON message"
