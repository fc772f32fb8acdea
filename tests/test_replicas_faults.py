"""Issue 15's fault test: 3 assemblers and 3 signers on one broker, each SIGKILLed in turn
while 100 simulated ESP32-CAMs and 20 edge devices work.

One private Mosquitto, one fresh database, real processes:

- 3 `camfleet assembler --partitions P --replica-id ID` replicas (device partitions
  leased in PostgreSQL, services/assembler/partitions.py; the harness of
  tests/test_assembler_replicas.py), fed by 100 simulated ESP32-CAMs that send rounds of
  one uniquely named image each and resend an unACKed image as the firmware does;
- 3 `camfleet signer --share-group G --lease-s S` replicas (grant leases,
  services/signer/leases.py; the harness of tests/test_signer_replicas.py), serving 20
  edge devices draining their cameras into moto's S3.

Each replica is SIGKILLed in turn (assembler, signer, assembler, ...), while both fleets
work. A kill's failover ends when the survivors serve what the victim served: every
partition held and subscribed between the two survivors (assembler); no open grant left
leased to the victim (signer). The victim is then restarted under its own id, and the
next kill waits for it to be serving again: every kill finds 3 replicas.

At the end, nothing lost, nothing twice: every ESP32 image ACKed, one `captures` row
and one object per image with its bytes, no image ACKed by two replicas at once; every
edge file delivered, one row, one object key, one verification message; no error rows
(no device gave up: the simulators resend until served).
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import pytest

from blocks.mqtt import MqttBroker
from camfleet.localsvc import MosquittoInstance
from camfleet.simulators.esp32 import SimOptions, SimResult, simulate
from camfleet.storage.local import TMP_DIR
from tests.faults_edge_support import Bucket, Camera, Watcher, device_fleet, service_env
from tests.test_assembler_replicas import (
    ACK_TIMEOUT_S,
    AckMonitor,
    Replica,
    balanced,
    register,
    rows,
    wait_for,
)
from tests.test_signer_replicas import (
    IMAGE_BYTES,
    VerificationCounter,
    assert_each_image_verified_once,
    grants,
    replica,
)

ASSEMBLERS = SIGNERS = 3
ESP32_DEVICES = 100
EDGE_DEVICES = 20
ESP32_PREFIX = "FA1700"
# Generous bounds for a loaded 2-core machine (polls, not timing assertions).
FAILOVER_LIMIT_S = 120.0
DRAIN_LIMIT_S = 300.0


class Esp32Rounds:
    """100 ESP32-CAMs sending rounds of one image each (uniquely named, as the firmware
    numbers its files from boot) until stopped; their results merged."""

    def __init__(self, broker: MqttBroker) -> None:
        self.broker = broker
        self.total = SimResult()
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="esp32-rounds", daemon=True)

    def start(self) -> Esp32Rounds:
        self._thread.start()
        return self

    def _run(self) -> None:
        opts = SimOptions(
            devices=ESP32_DEVICES, images=1, pictures=True, id_prefix=ESP32_PREFIX,
            ack_timeout=ACK_TIMEOUT_S, max_resends=30, clients=4,
        )  # fmt: skip
        while not self._stop.is_set():
            r = simulate(self.broker, opts)
            t = self.total
            t.images_sent += r.images_sent
            t.images_acked += r.images_acked
            t.images_failed += r.images_failed
            t.resends += r.resends
            t.nacks += r.nacks
            t.sent.update(r.sent)
            self.rounds += 1

    def stop(self) -> SimResult:
        """Ends after the round in flight (every image of it ACKed or given up)."""
        self._stop.set()
        self._thread.join(DRAIN_LIMIT_S)
        assert not self._thread.is_alive(), "the ESP32 round never ended"
        return self.total


def esp32_captures(dsn: str) -> list[tuple]:
    return rows(
        dsn,
        "select device_id, device_capture_id, ingest_status, sha256, storage_path"
        " from captures where source <> 'edge'",
    )


def objects_under(root: Path) -> list[Path]:
    """The stored objects (not a killed writer's temporary file, swept later)."""
    files = root.rglob("*") if root.exists() else []
    return [p for p in files if p.is_file() and TMP_DIR not in p.relative_to(root).parts]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_each_replica_sigkilled_in_turn_loses_nothing_and_duplicates_nothing(
    tmp_path, database_url, s3, bucket
):
    objects = tmp_path / "objects"
    (tmp_path / "restarted").mkdir()
    register(database_url, ESP32_PREFIX, ESP32_DEVICES)
    table: list[tuple] = []  # (kind, victim, failover s, back s)
    with MosquittoInstance() as mq, ExitStack() as stack:
        broker = MqttBroker(host=mq.host, port=mq.port)
        # -- 3 assemblers --------------------------------------------------------------
        assemblers: list[Replica] = []
        stack.callback(lambda: [r.stop() for r in assemblers])
        for i in range(ASSEMBLERS):
            assemblers.append(
                Replica(f"a{i + 1}", broker, database_url, f"file://{objects}", tmp_path)
            )
        # -- 3 signers, 20 edge devices ------------------------------------------------
        store = Bucket(s3.client(), bucket)
        store.enable_versioning()  # a second upload of one file shows as a second version
        env = service_env(mq, database_url, s3, bucket, tmp_path / "data")
        signers = {
            f"signer-{i + 1}-{uuid.uuid4().hex[:4]}": None for i in range(SIGNERS)
        }  # client id -> process
        for cid in signers:
            signers[cid] = replica(env, tmp_path / f"{cid}.log", cid)
            stack.callback(signers[cid].stop)
        for p in signers.values():
            p.spawn()
        for p in signers.values():
            p.wait_ready()
        root = tmp_path / "devices"
        serials = [f"ENTO-F{i:02d}{uuid.uuid4().hex[:4]}" for i in range(EDGE_DEVICES)]
        devices = device_fleet(env, tmp_path / "devices.log", root, serials, mq.host, mq.port)
        stack.callback(devices.stop)
        camera = Camera(root, tmp_path / "camera", serials, IMAGE_BYTES, period_s=2.0)
        stack.callback(camera.stop)
        watcher = Watcher(root, camera)
        stack.callback(watcher.close)
        counter = VerificationCounter(mq.host, mq.port)
        stack.callback(counter.close)

        def logs() -> str:
            procs = [devices, *signers.values()]
            return "\n---\n".join(p.tail(1500) for p in procs)

        ready = wait_for(lambda: balanced(assemblers, devices=ESP32_DEVICES), timeout=180)
        assert ready, [r.health() for r in assemblers]
        acks = AckMonitor(broker)
        stack.callback(acks.close)
        # -- both fleets at work -------------------------------------------------------
        devices.start()
        camera.start()
        esp32 = Esp32Rounds(broker).start()
        stack.callback(esp32._stop.set)  # noqa: SLF001 - a failed test's rounds end too
        assert wait_for(lambda: len(esp32_captures(database_url)) >= ESP32_DEVICES // 2, 180)
        assert wait_for(lambda: watcher.count() >= EDGE_DEVICES, 180), logs()

        def kill_assembler(k: int) -> None:
            victim = assemblers[k]
            survivors = [r for r in assemblers if r is not victim]
            assert victim.health().get("partitions", {}).get("owned"), "victim served nothing"
            t0 = time.monotonic()
            victim.kill()
            assert wait_for(
                lambda: balanced(survivors, devices=ESP32_DEVICES), FAILOVER_LIMIT_S, 0.1
            ), [r.health() for r in survivors]
            failover = time.monotonic() - t0
            victim.stop()  # closes its log
            again = Replica(
                victim.name, broker, database_url, f"file://{objects}", tmp_path / "restarted"
            )
            assemblers[k] = again
            t1 = time.monotonic()
            assert wait_for(
                lambda: balanced(assemblers, devices=ESP32_DEVICES), FAILOVER_LIMIT_S, 0.2
            ), [r.health() for r in assemblers]
            table.append(("assembler", victim.name, failover, time.monotonic() - t1))

        def kill_signer(cid: str) -> None:
            def victim_open() -> set:
                return {(g[0], g[1]) for g in grants(database_url) if g[2:] == ("granted", cid)}

            # Mid-batch: the victim holds open grants (URLs out, uploads on their way).
            assert wait_for(victim_open, 120, 0.02), f"{cid} never held an open grant"
            t0 = time.monotonic()
            signers[cid].kill()
            assert wait_for(lambda: not victim_open(), FAILOVER_LIMIT_S, 0.1), logs()
            failover = time.monotonic() - t0
            t1 = time.monotonic()
            signers[cid].start()  # under its own client id, as a supervisor restarts it
            table.append(("signer", cid, failover, time.monotonic() - t1))

        for k, cid in enumerate(signers):
            kill_assembler(k)
            kill_signer(cid)
        # -- drain: the ESP32 round in flight ends, the cameras stop, devices empty ------
        result = esp32.stop()
        camera.stop()
        assert wait_for(lambda: not watcher.present(), DRAIN_LIMIT_S, 0.2), logs()
        devices.stop()

        # -- ESP32: every image ACKed, stored once, ACKed by one replica at a time ---------
        total = len(result.sent)
        assert result.images_failed == 0 and result.images_acked == total > 0
        assert wait_for(lambda: set(acks.acks) == set(result.sent), 60)
        acked_twice = sum(acks.acks.values()) - total
        assert acked_twice <= result.resends, "an image was ACKed by two replicas at once"
        got = esp32_captures(database_url)
        keys = [(d, c) for d, c, *_ in got]
        assert len(keys) == len(set(keys)), "a capture row was written twice"
        stored = {(d, c): sha for d, c, status, sha, _ in got if status == "stored"}
        want = {k: hashlib.sha256(v).hexdigest() for k, v in result.sent.items()}
        assert stored == want, "every ESP32 image is stored once with its bytes, nothing else"
        files = objects_under(objects)
        assert len(files) == total, f"{len(files)} objects for {total} images"
        assert {hashlib.sha256(p.read_bytes()).hexdigest() for p in files} == set(want.values())
        # -- edge: every file delivered and verified once (tests/test_signer_replicas) ----
        assert_each_image_verified_once(database_url, store, camera, watcher, counter, logs)
        edge_files = len(camera.snapshot())
        # -- error rows only where a device gave up: none did --------------------------
        errors = rows(database_url, "select device_id, error_code, message from device_errors")
        assert errors == [], errors[:10]

    print()
    print(f"{'kill':<10} {'replica':<18} {'failover s':>10} {'back s':>7}")
    for kind, name, failover, back in table:
        print(f"{kind:<10} {name:<18} {failover:>10.1f} {back:>7.1f}")
    print(
        f"ESP32: {total} images in {esp32.rounds} rounds of {ESP32_DEVICES} devices, "
        f"{result.resends} resends, {acked_twice} repeated ACKs (after a resend); "
        f"edge: {edge_files} files from {EDGE_DEVICES} devices; lost 0, duplicated 0"
    )
    assert len(table) == ASSEMBLERS + SIGNERS


# ---- the demo's replicas ---------------------------------------------------------------


def test_demo_runs_two_replicas_of_each_unless_told_otherwise():
    from camfleet.commands.up import replica_counts

    assert replica_counts(demo=True, assemblers=None, signers=None) == (2, 2)
    assert replica_counts(demo=False, assemblers=None, signers=None) == (1, 1)
    assert replica_counts(demo=True, assemblers=3, signers=1) == (3, 1)  # flags override


def test_demo_esp32_cams_announced_first_are_served_on_their_first_send(tmp_path, database_url):
    """Two assembler replicas already running (as `camfleet up --demo` starts them, before
    the demo registers anything): the demo announces its ESP32-CAMs, and their first
    images are ACKed without a resend. Unannounced, a new device's first image reaches
    no replica (tests/test_assembler_replicas.py: learnt from its status, subscribed
    after)."""
    from camfleet import demo

    with MosquittoInstance() as mq:
        broker = MqttBroker(host=mq.host, port=mq.port)
        replicas = [
            Replica(f"d{i}", broker, database_url, f"file://{tmp_path / 'o'}", tmp_path)
            for i in (1, 2)
        ]
        try:
            assert wait_for(lambda: balanced(replicas)), [r.health() for r in replicas]
            demo.announce_esp32_devices(database_url, broker)

            def subscribed():
                subs = [r.health().get("partitions", {}) for r in replicas]
                return sum(s.get("device_subscriptions", 0) for s in subs) == demo.ESP32_DEVICES

            assert wait_for(subscribed, 60), [r.health() for r in replicas]
            opts = SimOptions(
                devices=demo.ESP32_DEVICES, images=1, id_prefix=demo.ESP32_PREFIX,
                pictures=True, ack_timeout=ACK_TIMEOUT_S, max_resends=5,
            )  # fmt: skip
            result = simulate(broker, opts)
        finally:
            for r in replicas:
                r.stop()
    assert result.images_acked == demo.ESP32_DEVICES and result.images_failed == 0
    assert result.resends == 0, "a demo device's first image waited for its resend"
    registered = rows(database_url, "select device_id from devices where device_id like %s",
                      f"{demo.ESP32_PREFIX}%")  # fmt: skip
    assert len(registered) == demo.ESP32_DEVICES
