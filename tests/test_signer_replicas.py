"""Signer replicas (issue 15): several `camfleet signer` instances serve one fleet.

Three `camfleet signer --share-group` processes share the device requests through
Mosquitto's shared subscription and the verification work through grant leases in
`edge_upload_grants` (services/signer/leases.py). Twenty simulated edge devices (a
child process running camfleet's `EdgeUploader` per device, tests/faults_edge_support)
drain their cameras through them. What is checked:

- every image is delivered: its `captures` row and its object hold the camera's bytes,
  one row and one object key per image (`check_invariants`, as the fault suite);
- every image is verified exactly once: one `{"file": name}` message per image on the
  devices' verification topics (a listener counts them all), one verified grant;
- the work is shared: each replica verified some of the grants;
- one replica SIGKILLed mid-batch: the grants it held are taken over by the others once
  its lease expired, and the invariants above still hold.

Smaller checks on the database alone: a lease held by a live instance is never claimed,
an expired or released one is; the shared rate limit counts one device's requests
across instances.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from collections import Counter
from contextlib import closing, contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg2
import pytest

from camfleet import db
from camfleet.localsvc import MosquittoInstance
from camfleet.protocol import edge_batch as eb
from services.signer.leases import Leases
from services.signer.limits import SharedRateLimiter
from tests.faults_common import ChildProcess, wait_until
from tests.faults_edge_support import (
    Bucket,
    Camera,
    Watcher,
    check_invariants,
    device_fleet,
    service_env,
)

SIGNERS = 3
DEVICES = 20
IMAGE_BYTES = 8_000
GROUP = "camfleet-signer"
# Short leases so a killed replica's grants are claimed within seconds (default 15 s).
LEASE_S = 3.0
# Generous: a loaded 2-core machine runs 3 signers, 20 devices, S3, broker, PostgreSQL.
DELIVER_LIMIT_S = 180.0
VERIFY_TOPIC = "cameraDevice/fileUploaded/+"


class VerificationCounter:
    """Counts every `{"file": name}` message the signers publish, per (serial, name)."""

    def __init__(self, host: str, port: int) -> None:
        self.seen: Counter = Counter()
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"counter-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv311,
        )
        self.client.on_connect = lambda c, *a: c.subscribe(VERIFY_TOPIC, qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "verification listener not subscribed"

    def _on_message(self, client, userdata, message) -> None:
        serial = message.topic.rsplit("/", 1)[1]
        name = json.loads(message.payload)["file"]
        with self._lock:
            self.seen[(serial, name)] += 1

    def counts(self) -> Counter:
        with self._lock:
            return Counter(self.seen)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def replica(env: dict, log: Path, client_id: str) -> ChildProcess:
    exe = str(Path(sys.executable).parent / "camfleet")
    argv = [exe, "signer", "--handoff", "none", "--client-id", client_id]
    argv += ["--share-group", GROUP, "--lease-s", str(LEASE_S)]
    return ChildProcess(argv, env, log, "signer: answering")


@contextmanager
def replicas_stack(tmp_path, dsn, s3, bucket_name):
    """3 signer replicas, 20 devices (one child process), camera, watcher, listener,
    on a private broker (its log is copied to tmp_path/mosquitto.log)."""
    with MosquittoInstance() as mq:
        try:
            with _stack(tmp_path, mq, dsn, s3, bucket_name) as stack:
                yield stack
        finally:
            (tmp_path / "mosquitto.log").write_bytes(mq.log_path.read_bytes())
            _dump(dsn, tmp_path / "tables.txt")


def _dump(dsn: str, path: Path) -> None:
    """Grants and error rows as the test left them, beside the logs (for a post-mortem)."""
    with closing(psycopg2.connect(dsn)) as conn, conn, conn.cursor() as cur, open(path, "w") as f:
        for table, order in (("edge_upload_grants", "granted_at"), ("device_errors", "1")):
            cur.execute(f"select * from {table} order by {order}")  # noqa: S608 - constants
            f.write(f"== {table}: {[d[0] for d in cur.description]}\n")
            f.writelines(f"{row}\n" for row in cur.fetchall())


@contextmanager
def _stack(tmp_path, mq, dsn, s3, bucket_name):
    bucket = Bucket(s3.client(), bucket_name)
    bucket.enable_versioning()  # a second upload of one file shows as a second version
    root = tmp_path / "devices"
    serials = [f"ENTO-R{i:02d}{uuid.uuid4().hex[:4]}" for i in range(DEVICES)]
    env = service_env(mq, dsn, s3, bucket_name, tmp_path / "data")
    signers = {
        f"signer-{i}-{uuid.uuid4().hex[:4]}": None for i in range(SIGNERS)
    }  # client id -> process
    for cid in signers:
        signers[cid] = replica(env, tmp_path / f"{cid}.log", cid)
    devices = device_fleet(env, tmp_path / "devices.log", root, serials, mq.host, mq.port)
    camera = Camera(root, tmp_path / "camera", serials, IMAGE_BYTES, period_s=2.0)
    watcher = Watcher(root, camera)
    counter = VerificationCounter(mq.host, mq.port)
    try:
        for p in signers.values():
            p.spawn()  # they import in parallel
        for p in signers.values():
            p.wait_ready()
        yield signers, devices, camera, watcher, counter, bucket
    finally:
        camera.stop()
        devices.stop()
        for p in signers.values():
            p.stop()
        watcher.close()
        counter.close()


def grants(dsn: str) -> list[tuple]:
    with closing(psycopg2.connect(dsn)) as conn, conn, conn.cursor() as cur:
        cur.execute("select device_id, file_name, status, leased_by from edge_upload_grants")
        return cur.fetchall()


def assert_each_image_verified_once(dsn, bucket, camera, watcher, counter, logs) -> Counter:
    check = check_invariants(dsn, bucket, camera, watcher, final=True)
    assert check.lost == [], check.lost[:5]
    assert check.duplicated == 0
    assert check.stray == 0
    assert check.not_delivered == 0
    assert check.delivered == check.images > 0
    assert check.open_grants == 0
    images = set(camera.snapshot())
    # Every verification message reached the listener before the device deleted the
    # file; one per image, none for anything else.
    assert wait_until(lambda: set(counter.counts()) >= images, 30), logs()
    seen = counter.counts()
    twice = {k: n for k, n in seen.items() if n > 1}
    assert twice == {}, f"verified more than once: {list(twice.items())[:5]}"
    assert set(seen) == images
    rows = grants(dsn)
    assert len(rows) == len(images)
    assert {r[2] for r in rows} == {"verified"}
    return Counter(r[3] for r in rows)  # verified grants per replica


def test_three_replicas_verify_every_file_of_twenty_devices_once(
    tmp_path, database_url, s3, bucket
):
    with replicas_stack(tmp_path, database_url, s3, bucket) as stack:
        signers, devices, camera, watcher, counter, store = stack
        for _ in range(3):  # 60 images waiting before the devices start
            camera.shoot()
        devices.start()

        def logs() -> str:
            return "\n---\n".join(p.tail(1500) for p in [devices, *signers.values()])

        assert wait_until(lambda: not watcher.present(), DELIVER_LIMIT_S, 0.2), logs()
        devices.stop()
        per_replica = assert_each_image_verified_once(
            database_url, store, camera, watcher, counter, logs
        )
    # The shared subscription spread the requests: every replica verified some files.
    assert set(per_replica) == set(signers), per_replica
    # Replicas hold clean sessions (c1): the broker would otherwise keep queueing a
    # dead replica's share of the requests for it instead of routing them to the others.
    log = (tmp_path / "mosquitto.log").read_text()
    for cid in signers:
        assert f"as {cid} (p2, c1," in log, f"{cid} did not connect with a clean session"


@pytest.mark.slow
def test_a_replica_killed_mid_batch_loses_nothing_and_verifies_nothing_twice(
    tmp_path, database_url, s3, bucket
):
    with replicas_stack(tmp_path, database_url, s3, bucket) as stack:
        signers, devices, camera, watcher, counter, store = stack
        devices.start()
        camera.start()

        def logs() -> str:
            return "\n---\n".join(p.tail(1500) for p in [devices, *signers.values()])

        assert wait_until(lambda: watcher.count() >= DEVICES, 120), logs()
        victim = next(iter(signers))

        def victim_open() -> set:
            return {(r[0], r[1]) for r in grants(database_url) if r[2:] == ("granted", victim)}

        # Mid-batch: the victim holds open grants (URLs out, uploads on their way).
        held = wait_until(victim_open, 60, 0.02)
        assert held, "the victim never held an open grant"
        signers[victim].kill()
        print(f"{time.strftime('%H:%M:%S')} SIGKILLed {victim} holding {len(held)} grants")
        held |= victim_open()  # granted before it died, committed after our look
        # The survivors claim them once the lease expires and verify the uploads.
        assert wait_until(lambda: not victim_open(), 60, 0.2), logs()
        # Keep the fleet working for a while on two replicas, then drain.
        time.sleep(LEASE_S)
        camera.stop()
        assert wait_until(lambda: not watcher.present(), DELIVER_LIMIT_S, 0.2), logs()
        devices.stop()
        per_replica = assert_each_image_verified_once(
            database_url, store, camera, watcher, counter, logs
        )
        final = {(r[0], r[1]): r for r in grants(database_url)}
        taken_over = [final[k] for k in held if k in final]
        assert taken_over and all(r[2] == "verified" and r[3] != victim for r in taken_over)
    survivors = set(signers) - {victim}
    assert survivors <= set(per_replica), per_replica


# ---- the database side alone ---------------------------------------------------------------


def _grant(dsn: str, serial: str, name: str, leases: Leases) -> None:
    """One grant issued and leased by `leases`' instance, as the signer issues them."""
    grant = eb.Grant(
        serial=serial,
        name=name,
        key=f"edge/{serial}/{name}",
        max_bytes=10,
        expires_at=time.time() + 300,
        request_id="r1",
        declared_size=10,
        declared_sha256="0" * 64,
    )
    with db.transaction(dsn) as conn:
        leases.issue(conn, serial, True, [grant])


def test_a_live_lease_is_never_claimed_an_expired_or_released_one_is(database_url):
    a, b = Leases("signer-a", lease_s=1.0), Leases("signer-b", lease_s=30.0)
    _grant(database_url, "ENTO-L1", "x.jpg", a)
    with db.transaction(database_url) as conn:
        assert b.claim(conn, 100) == []  # A is alive (its lease runs)
        assert a.held(conn, "ENTO-L1", ["x.jpg"]) == {"x.jpg"}
    # A stops renewing (killed): once its lease expired, B takes the grant over.
    claimed = wait_until(lambda: _claim(database_url, b), 10)
    assert [r[:2] for r in claimed] == [("ENTO-L1", "x.jpg")]
    with db.transaction(database_url) as conn:
        assert a.held(conn, "ENTO-L1", ["x.jpg"]) == set()  # A may no longer record it
        assert b.held(conn, "ENTO-L1", ["x.jpg"]) == {"x.jpg"}
        assert a.renew(conn) == 0
        assert b.renew(conn) == 1
        # A restarted under its own id does not take back what B holds.
        assert a.claim(conn, 100, own=True) == []
        assert b.release(conn) == 1  # B stops cleanly
    assert [r[:2] for r in _claim(database_url, a)] == [("ENTO-L1", "x.jpg")]


def _claim(dsn: str, leases: Leases) -> list[tuple]:
    with db.transaction(dsn) as conn:
        return leases.claim(conn, 100)


def test_the_shared_rate_limit_counts_a_device_across_instances(database_url):
    one = SharedRateLimiter(database_url, rate_per_s=0.1, burst=3)
    two = SharedRateLimiter(database_url, rate_per_s=0.1, burst=3)
    try:
        answers = [one.allow("ENTO-RL"), two.allow("ENTO-RL"), one.allow("ENTO-RL")]
        assert answers == [True, True, True]
        assert not two.allow("ENTO-RL")  # the 4th request within the window, anywhere
        assert one.allow("ENTO-OTHER")  # only that device
    finally:
        one.close()
        two.close()


def test_up_starts_each_signer_replica_in_the_share_group_with_its_own_client_id():
    from camfleet.commands.up import SERVICES, signer_replicas

    health: dict[str, int] = {}
    metrics: dict[str, int] = {}
    assert signer_replicas(SERVICES, 1, health, metrics) == SERVICES  # one signer: as before
    planned = signer_replicas(SERVICES, 3, health, metrics)
    replicas = [(name, args) for name, _, args in planned if name.startswith("signer")]
    assert [name for name, _ in replicas] == ["signer", "signer-2", "signer-3"]
    ids = []
    for _, args in replicas:
        assert args[0] == "signer"
        assert args[args.index("--share-group") + 1] == "camfleet-signer"
        ids.append(args[args.index("--client-id") + 1])
    assert len(set(ids)) == 3
    # The first keeps the signer's health and metrics ports; two processes on one port
    # would not both start. The others get ports of their own: health ports `up` waits
    # on before it says the stack is up, metrics ports its banner lists for scraping.
    first = replicas[0][1]
    assert first[first.index("--metrics-port") + 1] == "{m_signer}"
    assert first[first.index("--health-port") + 1] == "{h_signer}"
    for flag, ports in (("--health-port", health), ("--metrics-port", metrics)):
        given = [a[a.index(flag) + 1] for _, a in replicas[1:]]
        assert ports == {"signer-2": int(given[0]), "signer-3": int(given[1])}
    assert [n for n, _, _ in planned if not n.startswith("signer")] == ["assembler", "api"]
