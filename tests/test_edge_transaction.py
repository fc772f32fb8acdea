"""The edge batch-upload transaction end to end, against real Mosquitto, moto's S3
server and PostgreSQL: the device side (camfleet.edge) and the signer (services/signer).

moto's S3 server does not check presigned-POST signatures or policy conditions, so
the tests that forge requests prove camfleet itself refuses them (the signer decides
keys and verifies what it finds), not the store.

A file name used again never costs an image: a new image under a delivered name gets
a key and a `captures` row of its own (also when the grant is resumed by a restarted
signer), and the same image sent again is stored once.

The last section proves the signer's cheap paths keep the same guarantees: its
read-back over presigned GETs hashes exactly what boto3 reads (and refuses an
over-limit object without reading it), survives a store restart, reads each object of
a batch once, records a batch in one transaction, and keeps its database connections
without being stuck on dead ones after PostgreSQL restarts.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import time
import uuid
from contextlib import closing
from pathlib import Path

import httpx
import psycopg2
import pytest

from blocks.mqtt import MqttBroker
from camfleet import db
from camfleet.edge.config import EdgeConfig
from camfleet.edge.link import EdgeLink
from camfleet.edge.upload import post_file
from camfleet.edge.uploader import (
    EdgeUploader,
    await_verifications,
    request_urls,
    run_batch,
    upload_files,
)
from camfleet.localsvc import MosquittoInstance, PostgresInstance, S3Instance, free_port
from camfleet.protocol import edge_batch as eb
from camfleet.storage.fast_s3 import ObjectReader
from camfleet.storage.s3 import S3Store
from services.signer import CHECK_FIRST_S, CHECK_WORKERS, Signer
from tests.helpers import wait_until

# ---- helpers ---------------------------------------------------------------------------


def broker_block(m: MosquittoInstance) -> MqttBroker:
    return MqttBroker(
        host=m.host,
        port=m.port,
        tls=bool(m.tls),
        ca_certs=str(m.ca_file) if m.ca_file else None,
        certfile=str(m.client_cert) if m.client_cert else None,
        keyfile=str(m.client_key) if m.client_key else None,
        username=m.username,
        password=m.password,
    )


def make_store(s3, bucket) -> S3Store:
    return S3Store(
        bucket,
        endpoint_url=s3.endpoint_url,
        region=s3.region,
        access_key_id=s3.access_key,
        secret_access_key=s3.secret_key,
    )


def write_images(repo: Path, count: int, size: int = 4096, prefix: str = "img") -> dict:
    repo.mkdir(parents=True, exist_ok=True)
    out = {}
    old = time.time() - 60
    for i in range(count):
        name = f"{prefix}_{i:04d}.jpg"
        data = b"\xff\xd8" + os.urandom(size - 4) + b"\xff\xd9"
        (repo / name).write_bytes(data)
        os.utime(repo / name, (old + i, old + i))  # oldest first = by index
        out[name] = hashlib.sha256(data).hexdigest()
    return out


def device(tmp_path: Path, broker: MqttBroker, serial: str | None = None, **kw) -> EdgeConfig:
    return EdgeConfig(
        serial=serial or f"ENTO-{uuid.uuid4().hex[:8]}",
        buffer_dir=tmp_path / "bufferStorage",
        repo_dir=tmp_path / "cameraImageRepo",
        broker_host=broker.host,
        broker_port=broker.port,
        tls=broker.tls,
        **kw,
    )


def captures(dsn: str, serial: str) -> dict[str, tuple]:
    with closing(psycopg2.connect(dsn)) as conn, conn, conn.cursor() as cur:
        cur.execute(
            "select device_capture_id, sha256, storage_path, source, image_bytes "
            "from captures where device_id = %s",
            (serial,),
        )
        return {row[0]: row[1:] for row in cur.fetchall()}


def errors(dsn: str, serial: str) -> list[tuple]:
    with closing(psycopg2.connect(dsn)) as conn, conn, conn.cursor() as cur:
        cur.execute(
            "select error_code, message, details from device_errors where device_id = %s",
            (serial,),
        )
        return cur.fetchall()


class Listener:
    """A raw MQTT client, standing in for a device or watching topics."""

    def __init__(self, m: MosquittoInstance, topics: list[str]):
        self.q: queue.Queue = queue.Queue()
        self.c = broker_block(m).client()
        subscribed = __import__("threading").Event()
        self.c.on_connect = lambda c, *a: c.subscribe([(t, 1) for t in topics])
        self.c.on_subscribe = lambda *a: subscribed.set()
        self.c.on_message = lambda c, u, msg: self.q.put((msg.topic, msg.payload))
        self.c.connect(m.host, m.port)
        self.c.loop_start()
        assert subscribed.wait(5)

    def publish(self, topic: str, payload) -> None:
        self.c.publish(topic, payload if isinstance(payload, bytes) else json.dumps(payload), 1)

    def get(self, timeout: float = 5.0):
        return self.q.get(timeout=timeout)

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def store(s3, bucket):
    return make_store(s3, bucket)


@pytest.fixture
def signer(store, database_url, mosquitto):
    s = Signer(
        store,
        database_url,
        broker_block(mosquitto),
        client_id=f"signer-{uuid.uuid4().hex[:8]}",
        settle_s=0.3,
    )
    s.start()
    assert s.wait_connected(5)
    yield s
    s.stop()


# ---- the happy paths ---------------------------------------------------------------------


def test_batch_of_five_moves_uploads_verifies_and_deletes(
    tmp_path, signer, store, mosquitto, database_url
):
    broker = broker_block(mosquitto)
    cfg = device(tmp_path, broker)
    shas = write_images(cfg.repo_dir, 5)
    summaries = EdgeUploader(cfg, broker, min_age_s=0).drain()
    assert [s["deleted"] for s in summaries] == [5]
    assert list(cfg.repo_dir.iterdir()) == [] and list(cfg.buffer_dir.iterdir()) == []
    rows = captures(database_url, cfg.serial)
    assert set(rows) == set(shas)
    for name, (sha, path, source, size) in rows.items():
        assert sha == shas[name] and source == "edge" and size == 4096
        assert path == f"edge/{cfg.serial}/{name}"
        assert hashlib.sha256(store.get(path)).hexdigest() == sha


def test_more_than_five_files_take_several_batches(tmp_path, signer, mosquitto, database_url):
    broker = broker_block(mosquitto)
    cfg = device(tmp_path, broker)
    shas = write_images(cfg.repo_dir, 12)
    summaries = EdgeUploader(cfg, broker, min_age_s=0).drain()
    assert [s["files"] for s in summaries] == [5, 5, 2]
    assert sum(s["deleted"] for s in summaries) == 12
    assert set(captures(database_url, cfg.serial)) == set(shas)
    assert list(cfg.buffer_dir.iterdir()) == []


def objects(store, serial: str) -> list[str]:
    return sorted(o.key for o in store.list(f"edge/{serial}/"))


def grants(dsn: str, serial: str) -> dict[str, tuple]:
    with closing(psycopg2.connect(dsn)) as conn, conn, conn.cursor() as cur:
        cur.execute(
            "select file_name, status, checked from edge_upload_grants where device_id = %s",
            (serial,),
        )
        return {row[0]: row[1:] for row in cur.fetchall()}


def urls_expired(dsn: str, serial: str) -> bool:
    """Every grant of `serial` is past its URL's expiry (by the database's clock)."""
    with closing(psycopg2.connect(dsn)) as conn, conn, conn.cursor() as cur:
        cur.execute(
            "select count(*) > 0 and bool_and(expires_at < now()) from edge_upload_grants"
            " where device_id = %s",
            (serial,),
        )
        return bool(cur.fetchone()[0])


# ---- deployed seed firmware ----------------------------------------------------------------


def test_seed_firmware_device_works_unchanged(tmp_path, signer, store, mosquitto, database_url):
    """Names only, QoS 0 URL subscription, ast.literal_eval, verification subscribed late."""
    from camfleet.edge.seed_device import run_seed_batch

    serial = f"ENTO-{uuid.uuid4().hex[:6]}"
    buffer = tmp_path / "bufferStorage"
    shas = write_images(buffer, 5, prefix="seed")
    deleted = run_seed_batch(broker_block(mosquitto), serial, buffer, sorted(shas), tmp_path)
    assert sorted(deleted) == sorted(shas)
    assert list(buffer.iterdir()) == []
    rows = captures(database_url, serial)
    # The signer computed each SHA-256 from the stored object (the device sent none).
    assert {n: r[0] for n, r in rows.items()} == shas
    assert {g[1] for g in grants(database_url, serial).values()} == {False}
    saved = json.loads((tmp_path / "signedUrls.json").read_text())
    assert [f["filename"] for f in saved["files"]] == sorted(shas)


def test_seed_answer_waits_for_a_subscriber_that_connects_late(signer, mosquitto, database_url):
    """The seed publishes its request and subscribes for the answer at the same time."""
    serial = f"ENTO-{uuid.uuid4().hex[:6]}"
    pub = Listener(mosquitto, [f"unused/{serial}"])
    pub.publish(
        f"cameraDevice/generateURL/{serial}",
        {"device-serialID": serial, "bucket-name": "x", "files": ["a.jpg"]},
    )
    # The subscriber connects only once the signer has granted (and so answered): late,
    # as a seed device whose own TLS connection is still being set up.
    wait_until(lambda: grants(database_url, serial), "the signer's grant")
    sub = Listener(mosquitto, [f"cameraDevice/getURL/{serial}"])
    try:
        answer = json.loads(sub.get(timeout=5)[1])
        assert [f["filename"] for f in answer["files"]] == ["a.jpg"]
    finally:
        sub.close()
        pub.close()


# ---- forged and bad input ---------------------------------------------------------------------


def test_forged_requests_are_refused(tmp_path, signer, store, mosquitto, database_url):
    a, b = f"ENTO-A{uuid.uuid4().hex[:6]}", f"ENTO-B{uuid.uuid4().hex[:6]}"
    dev = Listener(mosquitto, [f"cameraDevice/getURL/{a}", f"cameraDevice/fileUploaded/{a}"])
    try:
        # Another device's serial in the payload: refused as a whole, answered empty.
        dev.publish(
            f"cameraDevice/generateURL/{a}",
            {"device-serialID": b, "bucket-name": "x", "files": ["x.jpg"]},
        )
        topic, payload = dev.get()
        answer = json.loads(payload)
        assert topic.endswith(a) and answer["files"] == [] and "does not match" in answer["error"]

        # Names with path components: each refused, the good one granted under A's prefix.
        names = ["ok.jpg", f"../{b}/x.jpg", f"{b}/x.jpg", "..", "a\x00.jpg"]
        dev.publish(
            f"cameraDevice/generateURL/{a}",
            {"device-serialID": a, "bucket-name": "x", "files": names},
        )
        answer = json.loads(dev.get()[1])
        assert [f["filename"] for f in answer["files"]] == ["ok.jpg"]
        grant = answer["files"][0]
        assert grant["key"] == grant["url"]["fields"]["key"] == f"edge/{a}/ok.jpg"
        assert len(answer["rejected"]) == 4

        # moto does not enforce the POST policy, so a device can store under another
        # key; camfleet never verifies or records what it did not grant.
        fields = dict(grant["url"]["fields"], key=f"edge/{b}/evil.jpg")
        r = httpx.post(grant["url"]["url"], data=fields, files={"file": ("f", b"x" * 10)})
        assert r.status_code < 300
        with pytest.raises(queue.Empty):
            dev.get(timeout=1.0)
        assert captures(database_url, b) == {} and captures(database_url, a) == {}
        assert grants(database_url, b) == {}
        codes = sorted(e[0] for e in errors(database_url, a))
        assert codes == [eb.E_REQUEST] + [eb.E_NAME] * 4
    finally:
        dev.close()


def test_wrong_size_or_checksum_is_never_verified(tmp_path, signer, store, mosquitto, database_url):
    serial = f"ENTO-{uuid.uuid4().hex[:6]}"
    dev = Listener(
        mosquitto, [f"cameraDevice/getURL/{serial}", f"cameraDevice/fileUploaded/{serial}"]
    )
    good, other = b"\xff\xd8" + b"1" * 98, b"\xff\xd8" + b"2" * 98
    sha = hashlib.sha256(good).hexdigest()
    try:
        dev.publish(
            f"cameraDevice/generateURL/{serial}",
            {
                "device-serialID": serial,
                "bucket-name": "x",
                "request-id": "r1",
                "files": ["big.jpg", "swap.jpg"],
                "checksums": {
                    "big.jpg": {"size": 100, "sha256": sha},
                    "swap.jpg": {"size": 100, "sha256": sha},
                },
            },
        )
        answer = json.loads(dev.get()[1])
        posts = {f["filename"]: f["url"] for f in answer["files"]}
        # More bytes than the policy allows (moto accepts them; the signer does not).
        for name, body in (("big.jpg", good * 3), ("swap.jpg", other)):
            post = posts[name]
            httpx.post(post["url"], data=post["fields"], files={"file": (name, body)})
        with pytest.raises(queue.Empty):
            dev.get(timeout=1.5)
        codes = sorted(e[0] for e in errors(database_url, serial))
        assert codes == [eb.E_SIZE, eb.E_CHECKSUM]
        assert store.head(f"edge/{serial}/big.jpg") is None  # over the limit: removed
        assert captures(database_url, serial) == {}
    finally:
        dev.close()


# ---- partial failure and crashes -----------------------------------------------------------


def test_a_missing_verification_leaves_exactly_that_file(
    tmp_path, signer, store, mosquitto, database_url
):
    broker = broker_block(mosquitto)
    cfg = device(tmp_path, broker)
    write_images(cfg.repo_dir, 5)
    up = EdgeUploader(cfg, broker, min_age_s=0)
    batch = up.next_batch()
    # The file changes on the card after it was hashed: the upload will not match.
    victim = batch.files[2].name
    data = (cfg.buffer_dir / victim).read_bytes()
    (cfg.buffer_dir / victim).write_bytes(data[:-1] + b"\x00")
    link = EdgeLink(broker, cfg.serial).connect()
    try:
        summary = run_batch(batch, link, cfg.buffer_dir, verify_timeout=2.0)
    finally:
        link.close()
    up._release(batch)
    assert summary["deleted"] == 4
    assert [p.name for p in cfg.buffer_dir.iterdir()] == [victim]
    # The next run takes that file first, hashes it afresh and gets it verified.
    summaries = up.drain()
    assert [s["deleted"] for s in summaries] == [1]
    assert list(cfg.buffer_dir.iterdir()) == []
    assert len(captures(database_url, cfg.serial)) == 5
    assert len(objects(store, cfg.serial)) == 5


def test_device_crash_mid_batch_loses_nothing_and_uploads_nothing_twice(
    tmp_path, signer, store, mosquitto, database_url
):
    broker = broker_block(mosquitto)
    cfg = device(tmp_path, broker)
    shas = write_images(cfg.repo_dir, 8)
    watcher = Listener(mosquitto, [f"cameraDevice/getURL/{cfg.serial}"])
    try:
        # Crash 1: right after the move (nothing asked yet).
        first = EdgeUploader(cfg, broker, min_age_s=0).next_batch()
        assert len(first.files) == 5 and len(list(cfg.buffer_dir.iterdir())) == 5
        # Crash 2: a second process got URLs, uploaded two files and died before any
        # verification was handled (its MQTT session is simply gone).
        link = EdgeLink(broker, cfg.serial).connect()
        batch = eb.DeviceBatch(cfg.serial, "b", first.files[:4])
        request_urls(batch, link, cfg.buffer_dir)
        for name in [f.name for f in first.files[:2]]:
            post_file(httpx.Client(trust_env=False), batch.uploads[name], cfg.buffer_dir)
        link.close()
        # The signer verifies those two while nobody listens.
        wait_until(lambda: len(captures(database_url, cfg.serial)) == 2, "two verifications")
        while not watcher.q.empty():
            watcher.get()

        # The next run: leftovers first; the two verified ones are answered as
        # "verified" (no second upload), everything ends verified and deleted.
        summaries = EdgeUploader(cfg, broker, min_age_s=0).drain()
        assert sum(s["deleted"] for s in summaries) == 8
        first_answer = json.loads(watcher.get()[1])
        assert sorted(first_answer["verified"]) == sorted(f.name for f in first.files[:2])
        assert {f["filename"] for f in first_answer["files"]} == {f.name for f in first.files[2:5]}
    finally:
        watcher.close()
    assert list(cfg.buffer_dir.iterdir()) == [] and list(cfg.repo_dir.iterdir()) == []
    assert {n: r[0] for n, r in captures(database_url, cfg.serial).items()} == shas
    assert objects(store, cfg.serial) == [f"edge/{cfg.serial}/{n}" for n in sorted(shas)]


def test_broker_down_during_the_wait_recovers(tmp_path, store, database_url):
    with MosquittoInstance() as own:
        broker = broker_block(own)
        cfg = device(tmp_path, broker)
        shas = write_images(cfg.repo_dir, 5)
        with Signer(store, database_url, broker, client_id="signer-bd", settle_s=0.2) as signer:
            assert signer.wait_connected(5)
            up = EdgeUploader(cfg, broker, min_age_s=0)
            batch = up.next_batch()
            link = EdgeLink(broker, cfg.serial).connect()
            try:
                request_urls(batch, link, cfg.buffer_dir)
                own.kill()  # the broker dies before any verification is published
                upload_files(batch, cfg.buffer_dir)
                await_verifications(batch, link, cfg.buffer_dir, verify_timeout=1.0)
                assert len(list(cfg.buffer_dir.iterdir())) == 5  # nothing deleted unverified
                own.restart()
                assert link.wait_connected(15) and signer.wait_connected(15)
            finally:
                link.close()
                up._release(batch)
            # Either the queued verifications or the next run's re-request finish it.
            summaries = up.drain()
    assert list(cfg.buffer_dir.iterdir()) == []
    assert {n: r[0] for n, r in captures(database_url, cfg.serial).items()} == shas
    assert objects(store, cfg.serial) == [f"edge/{cfg.serial}/{n}" for n in sorted(shas)]
    assert sum(s["deleted"] for s in summaries) <= 5


def test_signer_killed_mid_batch_resumes_its_grants(
    tmp_path, s3, bucket, store, mosquitto, database_url, run_cli
):
    """A real `camfleet signer` process, SIGKILLed after granting, before verifying."""
    import signal
    import subprocess
    import sys

    broker = broker_block(mosquitto)
    cfg = device(tmp_path, broker)
    shas = write_images(cfg.repo_dir, 5)
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "STORAGE_URL": f"s3://{bucket}?endpoint_url={s3.endpoint_url}",
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "MQTT_HOST": mosquitto.host,
        "MQTT_PORT": str(mosquitto.port),
    }
    client_id = f"signer-{uuid.uuid4().hex[:6]}"
    health_port = free_port()
    cmd = [sys.executable, "-m", "camfleet.cli", "signer", "--handoff", "none"]
    cmd += ["--client-id", client_id, "--health-port", str(health_port)]

    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{health_port}/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def start():
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout.readline().startswith(b"signer:")
        wait_until(ready, "the signer subscribed (/ready)")
        return proc

    proc = start()
    up = EdgeUploader(cfg, broker, min_age_s=0)
    batch = up.next_batch()
    link = EdgeLink(broker, cfg.serial).connect()
    try:
        request_urls(batch, link, cfg.buffer_dir)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        upload_files(batch, cfg.buffer_dir)
        assert grants(database_url, cfg.serial).keys() == shas.keys()
        proc = start()  # resumes the open grants from edge_upload_grants
        deleted = await_verifications(batch, link, cfg.buffer_dir, verify_timeout=15.0)
    finally:
        link.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    assert deleted == 5 and list(cfg.buffer_dir.iterdir()) == []
    assert {n: r[0] for n, r in captures(database_url, cfg.serial).items()} == shas
    assert {g[0] for g in grants(database_url, cfg.serial).values()} == {"verified"}


def test_expired_urls_are_renewed(tmp_path, store, mosquitto, database_url, s3):
    broker = broker_block(mosquitto)
    cfg = device(tmp_path, broker)
    shas = write_images(cfg.repo_dir, 5)
    with Signer(
        store, database_url, broker, client_id="signer-exp", expires_in=1, grace_s=0
    ) as signer:
        assert signer.wait_connected(5)
        up = EdgeUploader(cfg, broker, min_age_s=0)
        batch = up.next_batch()
        link = EdgeLink(broker, cfg.serial).connect()
        try:
            request_urls(batch, link, cfg.buffer_dir)
            # The URLs expire before the upload: moto would still accept the POSTs, but
            # the signer has closed those grants and verifies nothing.
            wait_until(lambda: urls_expired(database_url, cfg.serial), "the URLs to expire")
            # A URL the store refuses (here: a 4xx for a bucket that does not exist)
            # sends its file back to be requested again.
            name = batch.files[0].name
            u = batch.uploads[name]
            batch.uploads[name] = eb.Upload(name, f"{s3.endpoint_url}/no-such-bucket-x", u.fields)
            upload_files(batch, cfg.buffer_dir)
            assert batch.states[name] is eb.FileState.BUFFERED
            assert batch.count(eb.FileState.UPLOADED) == 4
            await_verifications(batch, link, cfg.buffer_dir, verify_timeout=1.0)
            assert len(list(cfg.buffer_dir.iterdir())) == 5
            assert {g[0] for g in grants(database_url, cfg.serial).values()} == {"expired"}
        finally:
            link.close()
            up._release(batch)
        # The next run asks again, gets fresh URLs and finishes the batch.
        signer.expires_in = 300
        summaries = up.drain()
    assert [s["deleted"] for s in summaries] == [5]
    assert {n: r[0] for n, r in captures(database_url, cfg.serial).items()} == shas
    assert objects(store, cfg.serial) == [f"edge/{cfg.serial}/{n}" for n in sorted(shas)]


def test_a_device_replaying_garbage_gets_bounded_error_rows(signer, mosquitto, database_url):
    from services.signer import MAX_ERRORS_PER_DEVICE_PER_MIN

    serial = f"ENTO-{uuid.uuid4().hex[:6]}"
    dev = Listener(mosquitto, [f"cameraDevice/getURL/{serial}"])
    try:
        sent = MAX_ERRORS_PER_DEVICE_PER_MIN + 15
        for _ in range(sent):
            dev.publish(f"cameraDevice/generateURL/{serial}", b"\x00not json")
        answered = 0
        while True:  # answered until its own queue (8) overflows; the rest dropped
            try:
                assert json.loads(dev.get(timeout=3)[1])["files"] == []
            except queue.Empty:
                break
            answered += 1
    finally:
        dev.close()
    assert 1 <= answered <= sent
    assert answered == sent or signer._inbox.dropped > 0
    # (a minute boundary may split the burst into two windows)
    assert 1 <= len(errors(database_url, serial)) <= 2 * MAX_ERRORS_PER_DEVICE_PER_MIN


def test_a_verified_file_whose_object_is_gone_is_uploaded_again(
    tmp_path, signer, store, mosquitto, database_url
):
    broker = broker_block(mosquitto)
    cfg = device(tmp_path, broker)
    shas = write_images(cfg.repo_dir, 1)
    name = next(iter(shas))
    assert [s["deleted"] for s in EdgeUploader(cfg, broker, min_age_s=0).drain()] == [1]
    # The device missed the verification (its copy is back in the buffer), and the
    # object has since disappeared from the store.
    key = f"edge/{cfg.serial}/{name}"
    (cfg.buffer_dir / name).write_bytes(store.get(key))
    store.delete(key)
    up = EdgeUploader(cfg, broker, min_age_s=0)
    link = EdgeLink(broker, cfg.serial).connect()
    try:
        batch = up.next_batch()
        request_urls(batch, link, cfg.buffer_dir)
        assert batch.states[name] is eb.FileState.UPLOADED  # answered as verified before
        # The read-back finds nothing: no {"file"}, the file stays, the grant fails.
        assert await_verifications(batch, link, cfg.buffer_dir, verify_timeout=2.0) == 0
        assert (cfg.buffer_dir / name).exists()
        assert grants(database_url, cfg.serial)[name][0] == "failed"
    finally:
        link.close()
        up._release(batch)
    # The next request gets a URL for it, and the re-upload is verified.
    assert [s["deleted"] for s in EdgeUploader(cfg, broker, min_age_s=0).drain()] == [1]
    assert hashlib.sha256(store.get(key)).hexdigest() == shas[name]
    assert list(cfg.buffer_dir.iterdir()) == []


# ---- a file name used again ----------------------------------------------------------------
# A camera whose counter or clock restarts writes a new image under a name it delivered
# and deleted before; a device that missed a verification sends the same image again.


def capture_rows(dsn: str, serial: str) -> list[tuple]:
    """(device_capture_id, sha256, storage_path) of the device's captures, by name."""
    with closing(psycopg2.connect(dsn)) as conn, conn, conn.cursor() as cur:
        cur.execute(
            "select device_capture_id, sha256, storage_path from captures"
            " where device_id = %s order by device_capture_id",
            (serial,),
        )
        return cur.fetchall()


def jpeg(version: bytes, size: int = 4000) -> tuple[bytes, str]:
    data = b"\xff\xd8" + version * size + b"\xff\xd9"
    return data, hashlib.sha256(data).hexdigest()


def test_a_reuse_key_stays_in_the_device_prefix_and_keeps_the_extension():
    key = eb.reuse_key("ENTO-0001", "cam_0001.jpg")
    folder, base = key.rsplit("/", 1)
    assert folder == "edge/ENTO-0001" and base.endswith(".jpg")
    assert base.startswith("cam_0001" + eb.REUSE_MARK)
    assert eb.reuse_key("ENTO-0001", "cam_0001.jpg") != key
    # No device can ask for this name, so its key is never a device_key.
    with pytest.raises(eb.BadName):
        eb.check_name(base)
    for bad in ("../x.jpg", "a/b.jpg"):
        with pytest.raises(eb.BadName):
            eb.reuse_key("ENTO-0001", bad)
    with pytest.raises(eb.BadName):
        eb.reuse_key("ENTO/0001", "a.jpg")


def test_a_new_image_under_a_delivered_name_gets_its_own_key_and_row(
    tmp_path, signer, store, mosquitto, database_url
):
    broker = broker_block(mosquitto)
    cfg = device(tmp_path, broker)
    cfg.repo_dir.mkdir(parents=True)
    name = "cam_0001.jpg"
    first, first_sha = jpeg(b"1")
    second, second_sha = jpeg(b"2")
    for data in (first, second):
        (cfg.repo_dir / name).write_bytes(data)
        assert [s["deleted"] for s in EdgeUploader(cfg, broker, min_age_s=0).drain()] == [1]
    rows = capture_rows(database_url, cfg.serial)
    assert rows[0] == (name, first_sha, f"edge/{cfg.serial}/{name}")
    reused_name, sha, key = rows[1]
    assert len(rows) == 2 and sha == second_sha and key == f"edge/{cfg.serial}/{reused_name}"
    assert reused_name.startswith("cam_0001~") and reused_name.endswith(".jpg")
    assert {hashlib.sha256(store.get(r[2])).hexdigest() for r in rows} == {first_sha, second_sha}

    # The device missed the second verification: asked again with its checksum, the
    # file is answered as verified (no upload) and confirmed from its own key.
    (cfg.buffer_dir / name).write_bytes(second)
    up = EdgeUploader(cfg, broker, min_age_s=0)
    batch = up.next_batch()
    link = EdgeLink(broker, cfg.serial).connect()
    try:
        request_urls(batch, link, cfg.buffer_dir)
        assert batch.states[name] is eb.FileState.UPLOADED and batch.uploads == {}
        assert await_verifications(batch, link, cfg.buffer_dir, verify_timeout=10.0) == 1
    finally:
        link.close()
        up._release(batch)
    assert capture_rows(database_url, cfg.serial) == rows
    assert objects(store, cfg.serial) == sorted(r[2] for r in rows)


def test_a_re_sent_image_under_a_delivered_name_is_stored_once(
    tmp_path, signer, store, mosquitto, database_url
):
    """Names only (seed firmware): the signer cannot tell a re-send from a new image
    before the upload, so it grants a key of its own and decides by the bytes."""
    from camfleet.edge.seed_device import run_seed_batch

    serial = f"ENTO-{uuid.uuid4().hex[:6]}"
    buffer = tmp_path / "bufferStorage"
    buffer.mkdir()
    name = "seed_0001.jpg"
    data, sha = jpeg(b"s")
    broker = broker_block(mosquitto)
    key = f"edge/{serial}/{name}"
    for attempt in (1, 2):  # the second time it missed the verification
        (buffer / name).write_bytes(data)
        assert run_seed_batch(broker, serial, buffer, [name], tmp_path) == [name]
        granted = json.loads((tmp_path / "signedUrls.json").read_text())["files"][0]["key"]
        if attempt == 1:
            assert granted == key
        else:  # a delivered name, asked for without a checksum: a key of its own
            assert granted.startswith(f"edge/{serial}/seed_0001~")
        # No second object, no second row: the grant points at the first delivery.
        assert objects(store, serial) == [key]
        assert capture_rows(database_url, serial) == [(name, sha, key)]
    with closing(psycopg2.connect(database_url)) as conn, conn, conn.cursor() as cur:
        cur.execute(
            "select object_key, status from edge_upload_grants where device_id = %s", (serial,)
        )
        assert cur.fetchall() == [(key, "verified")]

    # Different bytes under the name: a new image, stored beside the first.
    other, other_sha = jpeg(b"t")
    (buffer / name).write_bytes(other)
    assert run_seed_batch(broker, serial, buffer, [name], tmp_path) == [name]
    rows = capture_rows(database_url, serial)
    assert rows[0] == (name, sha, key) and rows[1][1] == other_sha and len(rows) == 2
    assert objects(store, serial) == sorted([key, rows[1][2]])
    assert hashlib.sha256(store.get(key)).hexdigest() == sha


def test_a_restarted_signer_resumes_a_grant_for_a_reused_name(
    tmp_path, store, mosquitto, database_url
):
    broker = broker_block(mosquitto)
    cfg = device(tmp_path, broker)
    cfg.repo_dir.mkdir(parents=True)
    name = "cam_0001.jpg"
    first, first_sha = jpeg(b"1")
    second, second_sha = jpeg(b"2")

    def signer():
        return Signer(store, database_url, broker, client_id=f"signer-{uuid.uuid4().hex[:8]}")

    (cfg.repo_dir / name).write_bytes(first)
    with signer() as s:
        assert s.wait_connected(5)
        assert [x["deleted"] for x in EdgeUploader(cfg, broker, min_age_s=0).drain()] == [1]
        (cfg.repo_dir / name).write_bytes(second)
        up = EdgeUploader(cfg, broker, min_age_s=0)
        batch = up.next_batch()
        link = EdgeLink(broker, cfg.serial).connect()
        request_urls(batch, link, cfg.buffer_dir)
    try:  # the signer stopped after granting; the upload lands while it is down
        assert upload_files(batch, cfg.buffer_dir) == 1
        with signer() as s:  # resumes the open grant, with its own key
            assert s.wait_connected(5)
            assert await_verifications(batch, link, cfg.buffer_dir, verify_timeout=15.0) == 1
    finally:
        link.close()
    rows = capture_rows(database_url, cfg.serial)
    assert [r[1] for r in rows] == [first_sha, second_sha]
    assert rows[1][0].startswith("cam_0001~")
    assert hashlib.sha256(store.get(rows[0][2])).hexdigest() == first_sha


# ---- the signer's read-back and its database work ------------------------------------------


def test_read_back_hashes_the_stored_bytes_like_boto3(s3, bucket, store):
    data = os.urandom(70_000)
    expect = (len(data), hashlib.sha256(data).hexdigest())
    prefixed = S3Store(
        bucket,
        prefix="fleet-a",
        endpoint_url=s3.endpoint_url,
        region=s3.region,
        access_key_id=s3.access_key,
        secret_access_key=s3.secret_key,
    )
    for st in (store, prefixed):
        st.put("devices/ENTO-R/a.jpg", data)
        reader = ObjectReader.for_store(st)
        assert reader is not None
        try:
            assert reader.digest("devices/ENTO-R/a.jpg") == expect
            assert st.digest("devices/ENTO-R/a.jpg") == expect  # boto3's answer
            assert reader.digest("devices/ENTO-R/missing.jpg") is None
            # Larger than the grant allows: refused by its size, the body is not read.
            assert reader.digest("devices/ENTO-R/a.jpg", max_bytes=1000) == (len(data), None)
            assert st.digest("devices/ENTO-R/a.jpg", 1000) == (len(data), None)
            for _ in range(3):
                assert reader.digest("devices/ENTO-R/a.jpg", max_bytes=len(data)) == expect
            assert len(reader._connections) == 1  # one kept-alive connection per thread
        finally:
            reader.close()


def test_read_back_reconnects_after_the_store_restarts():
    with S3Instance() as own:
        own.create_bucket("restarts")
        st = S3Store(
            "restarts",
            endpoint_url=own.endpoint_url,
            region=own.region,
            access_key_id=own.access_key,
            secret_access_key=own.secret_key,
        )
        st.put("devices/ENTO-R/a.jpg", b"one")
        reader = ObjectReader.for_store(st)
        try:
            assert reader.digest("devices/ENTO-R/a.jpg")[0] == 3
            # The kept-alive connection dies with the server (moto also forgets its data).
            own.restart()
            own.create_bucket("restarts")
            st.put("devices/ENTO-R/a.jpg", b"two!")
            assert reader.digest("devices/ENTO-R/a.jpg") == (4, hashlib.sha256(b"two!").hexdigest())
        finally:
            reader.close()


class FrozenClock:
    """The signer's clock, moved only by the test."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_a_batch_found_together_is_read_once_and_recorded_in_one_transaction(
    tmp_path, store, s3, mosquitto, database_url
):
    broker = broker_block(mosquitto)
    cfg = device(tmp_path, broker)
    write_images(cfg.repo_dir, 5)
    clock = FrozenClock()
    log_offset = s3.log_path.stat().st_size
    with Signer(store, database_url, broker, client_id=f"signer-{cfg.serial}", clock=clock) as sig:
        assert sig.wait_connected(5)
        up = EdgeUploader(cfg, broker, min_age_s=0)
        batch = up.next_batch()
        link = EdgeLink(broker, cfg.serial).connect()
        try:
            request_urls(batch, link, cfg.buffer_dir)
            # The signer's clock stands still: its first look comes after every upload.
            assert upload_files(batch, cfg.buffer_dir) == 5
            clock.advance(CHECK_FIRST_S)
            deleted = await_verifications(batch, link, cfg.buffer_dir, verify_timeout=15.0)
        finally:
            link.close()
    assert deleted == 5 and list(cfg.buffer_dir.iterdir()) == []
    with closing(psycopg2.connect(database_url)) as conn, conn, conn.cursor() as cur:
        cur.execute("select distinct xmin::text from captures where device_id = %s", (cfg.serial,))
        capture_txns = cur.fetchall()
        cur.execute(
            "select distinct xmin::text from edge_upload_grants where device_id = %s",
            (cfg.serial,),
        )
        grant_txns = cur.fetchall()
    # One transaction made the five captures and closed the five grants.
    assert len(capture_txns) == 1 and grant_txns == capture_txns
    # The probe found the first file, the same job read the others: one GET each, no 404.
    reads: list[tuple[str, str]] = []
    for _ in range(20):  # moto writes its access line just after answering
        with open(s3.log_path, "rb") as f:
            f.seek(log_offset)
            lines = f.read().decode(errors="replace").splitlines()
        reads = [  # "GET /bucket/edge/<serial>/<name>?X-Amz-... HTTP/1.1" 200
            (line.split('"GET ')[1].split("?")[0].rsplit("/", 1)[1], line.split('" ')[1][:3])
            for line in lines
            if '"GET ' in line and f"/edge/{cfg.serial}/" in line
        ]
        if len(reads) >= 5:
            break
        time.sleep(0.1)
    assert sorted(reads) == sorted((f.name, "200") for f in batch.files)


def test_the_signer_keeps_its_database_connections(tmp_path, signer, mosquitto, database_url):
    broker = broker_block(mosquitto)
    cfg = device(tmp_path, broker)
    write_images(cfg.repo_dir, 5, prefix="first")
    assert [s["deleted"] for s in EdgeUploader(cfg, broker, min_age_s=0).drain()] == [5]
    with closing(psycopg2.connect(database_url)) as conn, conn, conn.cursor() as cur:
        cur.execute("select now()")
        between = cur.fetchone()[0]
    write_images(cfg.repo_dir, 5, prefix="second")
    assert [s["deleted"] for s in EdgeUploader(cfg, broker, min_age_s=0).drain()] == [5]
    with closing(psycopg2.connect(database_url)) as conn, conn, conn.cursor() as cur:
        cur.execute(
            "select backend_start from pg_stat_activity "
            "where datname = current_database() and pid <> pg_backend_pid()"
        )
        started = [row[0] for row in cur.fetchall()]
    # Idle connections stay open (at most one per signer thread), and the second
    # batch was served by a connection the first one opened: no backend per transaction.
    assert 1 <= len(started) <= CHECK_WORKERS + 2
    assert min(started) < between


def test_kept_database_connections_are_replaced_after_postgres_restarts(tmp_path, store, mosquitto):
    broker = broker_block(mosquitto)
    cfg = device(tmp_path, broker)
    with PostgresInstance(fast=True) as pg:
        dsn = pg.create_database("edge_restart")
        db.migrate(dsn)
        with Signer(store, dsn, broker, client_id=f"signer-{cfg.serial}") as sig:
            assert sig.wait_connected(5)
            write_images(cfg.repo_dir, 5, prefix="before")
            assert [s["deleted"] for s in EdgeUploader(cfg, broker, min_age_s=0).drain()] == [5]
            # Every connection the signer kept is now dead on the client side too.
            pg.restart()
            write_images(cfg.repo_dir, 5, prefix="after")
            summaries = EdgeUploader(cfg, broker, min_age_s=0).drain()
        # The first request after the restart hit a dead connection and was answered on
        # a fresh one at once: no request left for the device to time out and re-ask.
        assert [s["deleted"] for s in summaries] == [5]
        assert sig.stats.errors == []
        assert len(captures(dsn, cfg.serial)) == 10
