"""The edge signer under hostile or unusual devices, against real Mosquitto, moto's S3
server and PostgreSQL (issue 12's signer items, issue 19 items 1-3, issue 13 item 10).

- One serial cannot fill the signer: per-device grant caps (3008), a per-device rate
  limit (3007, only for that device), per-device request queues served round-robin;
  a real device is still answered and verified.
- A grant nobody watches ends `expired` (the sweep).
- Ready means subscribed (`/ready` after the SUBACK); a dead worker makes `/live` fail
  and the process exit non-zero.
- Any file name a camera writes (spaces, colons, accents) is uploaded, verified and
  deleted, by a seed device and by camfleet's device, under a safe key in `edge/`.
- A request with more names than one answer holds is answered in parts; a seed device
  that reads only the first answer is never left waiting.
- `bucket-name` is honoured within an allow-list and refused (3009) outside it.
- camfleet's device works against a seed-style cloud (Python-literal answers, no
  request-id).
- `camfleet signer` without a Prefect API answers and verifies with no Prefect server.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import closing

import httpx
import psutil
import psycopg2
import pytest

from camfleet.edge.seed_device import run_seed_batch
from camfleet.edge.uploader import EdgeUploader
from camfleet.localsvc import free_port
from camfleet.protocol import edge_batch as eb
from services.signer import Signer, WorkerDied
from services.signer.health import HealthServer
from services.signer.limits import FairInbox, RateLimiter
from tests.faults_common import wait_until
from tests.test_edge_transaction import (
    Listener,
    broker_block,
    captures,
    device,
    errors,
    make_store,
    write_images,
)

ODD_NAMES = [
    "IMG 0001.jpg",
    "2026-12-03T02:41:07+00:00.jpg",
    "Éclosion été.jpg",
    "日本 写真.jpg",
    ".trap 7.jpg",
]


def start_signer(store, dsn, mosquitto, **kw) -> Signer:
    kw.setdefault("settle_s", 0.3)
    s = Signer(store, dsn, broker_block(mosquitto), client_id=f"s-{uuid.uuid4().hex[:8]}", **kw)
    s.start()
    assert s.wait_connected(10)
    return s


@pytest.fixture
def store(s3, bucket):
    return make_store(s3, bucket)


def grant_rows(dsn: str, serial: str) -> dict[str, tuple]:
    with closing(psycopg2.connect(dsn)) as conn, conn, conn.cursor() as cur:
        cur.execute(
            "select file_name, status, object_key, bucket, failed_reason "
            "from edge_upload_grants where device_id = %s",
            (serial,),
        )
        return {row[0]: row[1:] for row in cur.fetchall()}


def ask(dev: Listener, serial: str, names: list[str], **extra) -> dict:
    body = {"device-serialID": serial, "bucket-name": "x", "files": names, **extra}
    dev.publish(f"cameraDevice/generateURL/{serial}", body)
    return json.loads(dev.get(timeout=10)[1])


# ---- fairness -----------------------------------------------------------------------------


def test_fair_inbox_serves_devices_round_robin_and_bounds_each():
    inbox = FairInbox(per_device=3, max_items=100, max_bytes=1000)
    assert all(inbox.put("A", ("A", b"a")) for _ in range(3))
    assert not inbox.put("A", ("A", b"a"))  # A's own queue is full; B is unaffected
    assert inbox.put("B", ("B", b"b")) and inbox.put("C", ("C", b"c"))
    order = [inbox.get(0)[0] for _ in range(5)]
    assert order == ["A", "B", "C", "A", "A"] and inbox.get(0) is None
    assert not inbox.put("D", ("D", b"x" * 1001)) and inbox.dropped == 2  # byte budget


def test_rate_limit_is_per_device():
    now = [0.0]
    limiter = RateLimiter(rate_per_s=1.0, burst=2, clock=lambda: now[0], max_devices=2)
    assert [limiter.allow("A") for _ in range(3)] == [True, True, False]
    assert limiter.allow("B")
    now[0] += 1.0
    assert limiter.allow("A") and not limiter.allow("A")


def test_one_serial_cannot_fill_the_signer(tmp_path, store, mosquitto, database_url):
    """A flood of names-only requests is capped per device; a real device still works."""
    signer = start_signer(store, database_url, mosquitto, max_pending=150)
    flooder = f"FLOOD-{uuid.uuid4().hex[:6]}"
    dev = Listener(mosquitto, [f"cameraDevice/getURL/{flooder}"])
    try:
        granted, capped = 0, 0
        for r in range(5):  # 250 names: the old signer granted every one
            answer = ask(dev, flooder, [f"r{r}_{i:03d}.jpg" for i in range(50)])
            granted += len(answer["files"])
            capped += sum("too many open" in x["reason"] for x in answer["rejected"])
        assert granted == 100 and capped == 150  # MAX_OPEN_GRANTS_PER_DEVICE
        assert eb.E_CAPACITY in {e[0] for e in errors(database_url, flooder)}

        broker = broker_block(mosquitto)
        cfg = device(tmp_path, broker)
        shas = write_images(cfg.repo_dir, 5)
        summaries = EdgeUploader(cfg, broker, min_age_s=0).drain()
        assert sum(s["deleted"] for s in summaries) == 5
        assert set(captures(database_url, cfg.serial)) == set(shas)
    finally:
        dev.close()
        signer.stop()


def test_a_device_over_its_rate_limit_is_refused_alone(tmp_path, store, mosquitto, database_url):
    signer = start_signer(
        store, database_url, mosquitto, rate_limiter=RateLimiter(rate_per_s=0.01, burst=2)
    )
    noisy = f"NOISY-{uuid.uuid4().hex[:6]}"
    dev = Listener(mosquitto, [f"cameraDevice/getURL/{noisy}"])
    try:
        answers = [ask(dev, noisy, ["a.jpg"], **{"request-id": f"r{i}"}) for i in range(4)]
        assert [len(a["files"]) for a in answers[:2]] == [1, 1]
        for a in answers[2:]:
            assert a["files"] == [] and a["error-code"] == eb.E_RATE
            assert a["request-id"].startswith("r")  # lanes of the device can tell
            assert ast.literal_eval(json.dumps(a)) == a  # the seed can parse it
        assert eb.E_RATE in {e[0] for e in errors(database_url, noisy)}
        # Another device is not limited by it.
        broker = broker_block(mosquitto)
        cfg = device(tmp_path, broker)
        write_images(cfg.repo_dir, 2)
        assert sum(s["deleted"] for s in EdgeUploader(cfg, broker, min_age_s=0).drain()) == 2
    finally:
        dev.close()
        signer.stop()


def test_a_grant_nobody_watches_ends_expired(store, mosquitto, database_url):
    serial = f"ENTO-{uuid.uuid4().hex[:6]}"
    with closing(psycopg2.connect(database_url)) as conn, conn, conn.cursor() as cur:
        cur.execute("insert into devices (device_id, kind) values (%s, 'edge')", (serial,))
        cur.execute(
            "insert into edge_upload_grants (device_id, file_name, object_key, max_bytes, "
            "expires_at) values (%s, 'lost.jpg', %s, 10, now() - interval '1 hour')",
            (serial, f"edge/{serial}/lost.jpg"),
        )
    signer = start_signer(store, database_url, mosquitto)
    try:
        status, _, _, reason = grant_rows(database_url, serial)["lost.jpg"]
        assert status == "expired" and "before the URL expired" in reason
        assert signer.stats.swept == 1
    finally:
        signer.stop()


# ---- health ---------------------------------------------------------------------------------


def _get(port: int, path: str) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5).status_code
    except httpx.HTTPError:
        return 0


def test_health_ready_after_subscribe_and_a_dead_worker_fails_live(store, mosquitto, database_url):
    signer = Signer(
        store, database_url, broker_block(mosquitto), client_id=f"s-{uuid.uuid4().hex[:8]}"
    )
    health = HealthServer(0, signer.live, signer.ready, signer.health).start()
    outcome: list[BaseException | None] = []

    def serve():
        try:
            signer.run_forever()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    try:
        assert _get(health.port, "/ready") == 503  # not started, not subscribed
        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        assert wait_until(lambda: _get(health.port, "/ready") == 200, 30)
        assert signer.wait_connected(0) and _get(health.port, "/live") == 200

        def boom(now):
            raise RuntimeError("bug")

        signer.watch.publishing.due = boom  # a bug in the worker loop, outside every handler
        thread.join(30)
        assert not thread.is_alive() and isinstance(outcome[0], WorkerDied)
        assert _get(health.port, "/live") == 503 and _get(health.port, "/ready") == 503
    finally:
        health.stop()
        if not outcome:
            signer._stop.set()


def signer_env(database_url, s3, bucket, mosquitto, tmp_path) -> dict:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") or k == "PREFECT_HOME"
    }
    env.update(
        DATABASE_URL=database_url,
        STORAGE_URL=f"s3://{bucket}?endpoint_url={s3.endpoint_url}",
        AWS_ACCESS_KEY_ID=s3.access_key,
        AWS_SECRET_ACCESS_KEY=s3.secret_key,
        MQTT_HOST=mosquitto.host,
        MQTT_PORT=str(mosquitto.port),
        PREFECT_HOME=str(tmp_path / "prefect-home"),  # a fresh home: no profile, no API
    )
    return env


def test_the_signer_command_without_prefect_signs_at_once_and_starts_no_server(
    tmp_path, s3, bucket, mosquitto, database_url
):
    """No Prefect API configured (the docs' first run): `camfleet signer` says so once,
    is ready as soon as it is subscribed, answers and verifies a seed device, and starts
    no temporary Prefect server (no child process at all)."""
    port = free_port()
    env = signer_env(database_url, s3, bucket, mosquitto, tmp_path)
    cmd = [sys.executable, "-m", "camfleet.cli", "signer", "--health-port", str(port)]
    cmd += ["--client-id", f"s-{uuid.uuid4().hex[:6]}"]
    log = open(tmp_path / "signer.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: _get(port, "/ready") == 200 or proc.poll() is not None, 60)
        assert proc.poll() is None, (tmp_path / "signer.log").read_text()
        serial = f"ENTO-{uuid.uuid4().hex[:6]}"
        buffer = tmp_path / "bufferStorage"
        names = write_images(buffer, 3, prefix="seed")
        deleted = run_seed_batch(broker_block(mosquitto), serial, buffer, sorted(names), tmp_path)
        assert sorted(deleted) == sorted(names)
        assert psutil.Process(proc.pid).children(recursive=True) == []
        output = (tmp_path / "signer.log").read_text()
        assert output.count("no Prefect API configured") == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()
    assert proc.returncode == 0


# ---- file names, parts, buckets --------------------------------------------------------------


def test_a_seed_device_uploads_names_with_spaces_colons_and_accents(
    tmp_path, store, mosquitto, database_url
):
    signer = start_signer(store, database_url, mosquitto)
    try:
        serial = f"ENTO-{uuid.uuid4().hex[:6]}"
        buffer = tmp_path / "bufferStorage"
        buffer.mkdir()
        shas = {}
        for i, name in enumerate(ODD_NAMES):
            data = b"\xff\xd8" + os.urandom(3000) + bytes([i]) + b"\xff\xd9"
            (buffer / name).write_bytes(data)
            shas[name] = hashlib.sha256(data).hexdigest()
        deleted = run_seed_batch(broker_block(mosquitto), serial, buffer, ODD_NAMES, tmp_path)
        assert sorted(deleted) == sorted(ODD_NAMES) and list(buffer.iterdir()) == []
        rows = grant_rows(database_url, serial)
        assert set(rows) == set(ODD_NAMES)  # the device's own names kept
        for name, (status, key, _, _) in rows.items():
            assert status == "verified" and key == eb.device_key(serial, name)
            assert key.startswith(f"edge/{serial}/") and "~" in key and key.isascii()
        with closing(psycopg2.connect(database_url)) as conn, conn, conn.cursor() as cur:
            cur.execute(
                "select metadata ->> 'device_file_name', sha256 from captures where device_id = %s",
                (serial,),
            )
            assert dict(cur.fetchall()) == shas
    finally:
        signer.stop()


def test_camfleet_device_uploads_names_a_camera_writes(tmp_path, store, mosquitto, database_url):
    signer = start_signer(store, database_url, mosquitto)
    try:
        broker = broker_block(mosquitto)
        cfg = device(tmp_path, broker)
        cfg.repo_dir.mkdir(parents=True)
        old = time.time() - 60
        visible = [n for n in ODD_NAMES if not n.startswith(".")]  # dot files: partial writes
        for name in visible:
            (cfg.repo_dir / name).write_bytes(os.urandom(2000))
            os.utime(cfg.repo_dir / name, (old, old))
        summaries = EdgeUploader(cfg, broker, min_age_s=0).drain()
        assert sum(s["deleted"] for s in summaries) == len(visible)
        assert list(cfg.buffer_dir.iterdir()) == [] and list(cfg.repo_dir.iterdir()) == []
        assert len(captures(database_url, cfg.serial)) == len(visible)
    finally:
        signer.stop()


def test_more_names_than_one_answer_holds_never_leave_a_seed_device_waiting(
    tmp_path, store, mosquitto, database_url
):
    """120 names: answered in parts of 50; the seed reads the first, deletes those, and
    its next runs take the rest (the old signer refused the request whole)."""
    signer = start_signer(store, database_url, mosquitto)
    try:
        serial = f"ENTO-{uuid.uuid4().hex[:6]}"
        buffer = tmp_path / "bufferStorage"
        names = sorted(write_images(buffer, 120, size=600, prefix="bulk"))
        broker = broker_block(mosquitto)
        runs = []
        for _ in range(4):
            left = sorted(p.name for p in buffer.iterdir())
            if not left:
                break
            runs.append(len(run_seed_batch(broker, serial, buffer, left, tmp_path)))
        assert runs[0] == eb.MAX_REQUEST_FILES and sum(runs) == 120
        assert list(buffer.iterdir()) == []
        assert set(captures(database_url, serial)) == set(names)
    finally:
        signer.stop()


def test_bucket_name_is_honoured_within_the_allow_list(
    tmp_path, s3, bucket, store, mosquitto, database_url
):
    other = s3.create_bucket(f"allowed-{uuid.uuid4().hex[:12]}")
    signer = start_signer(store, database_url, mosquitto, buckets=[other])
    try:
        broker = broker_block(mosquitto)
        cfg = device(tmp_path, broker, bucket_name=other)
        write_images(cfg.repo_dir, 3)
        assert sum(s["deleted"] for s in EdgeUploader(cfg, broker, min_age_s=0).drain()) == 3
        rows = grant_rows(database_url, cfg.serial)
        assert {r[2] for r in rows.values()} == {other}
        keys = sorted(o.key for o in make_store(s3, other).list(f"edge/{cfg.serial}/"))
        assert keys == sorted(r[1] for r in rows.values())
        assert list(store.list(f"edge/{cfg.serial}/")) == []  # none in the own bucket

        serial = f"ENTO-{uuid.uuid4().hex[:6]}"
        dev = Listener(mosquitto, [f"cameraDevice/getURL/{serial}"])
        try:
            answer = ask(dev, serial, ["a.jpg"], **{"bucket-name": "not-listed"})
            assert answer["files"] == [] and answer["error-code"] == eb.E_BUCKET
            assert "not allowed" in answer["error"]
            answer = ask(dev, serial, ["a.jpg"], **{"bucket-name": bucket})  # its own
            assert len(answer["files"]) == 1
        finally:
            dev.close()
    finally:
        signer.stop()


# ---- camfleet's device against a seed-style cloud ---------------------------------------------


def test_camfleet_device_works_with_a_seed_style_cloud(tmp_path, store, mosquitto):
    """The seed's cloud sends Python literals and no request-id; files are verified
    and deleted (before: 0 of 3)."""
    broker = broker_block(mosquitto)
    cfg = device(tmp_path, broker)
    write_images(cfg.repo_dir, 3)
    serial = cfg.serial
    cloud = Listener(mosquitto, [f"cameraDevice/generateURL/{serial}"])
    stop = threading.Event()

    def seed_cloud():
        while not stop.is_set():
            try:
                _, payload = cloud.get(timeout=0.2)
            except queue.Empty:
                continue
            request = json.loads(payload)
            files = []
            for name in request["files"]:
                key = f"edge/{serial}/{name}"
                post = store.presigned_post(key, max_bytes=10_000_000, expires_in=300)
                files.append({"filename": name, "url": {"url": post.url, "fields": post.fields}})
            cloud.publish(f"cameraDevice/getURL/{serial}", repr({"files": files}).encode())
            for name in request["files"]:  # verified once stored, as a Python literal
                wait_until(lambda n=name: store.head(f"edge/{serial}/{n}"), 10, 0.05)
                cloud.publish(f"cameraDevice/fileUploaded/{serial}", repr({"file": name}).encode())

    worker = threading.Thread(target=seed_cloud, daemon=True)
    worker.start()
    try:
        summaries = EdgeUploader(cfg, broker, min_age_s=0).drain()
        assert sum(s["deleted"] for s in summaries) == 3
        assert list(cfg.buffer_dir.iterdir()) == []
    finally:
        stop.set()
        worker.join(10)
        cloud.close()


def test_handoff_keeps_handing_off_while_the_database_refuses_the_run_stamp():
    """The hand-off thread stamps each run's id on its captures; with PostgreSQL gone
    that write fails. The thread must go on handing off the next batches (before, it
    died silently and the signer stayed "live" with no hand-off), and say so."""
    from camfleet import db
    from services.signer.handoff import Handoff

    down = db.Pool(f"postgresql://camfleet@127.0.0.1:{free_port()}/gone?connect_timeout=2", 1)
    runs: list[list[dict]] = []
    handoff = Handoff(lambda batch: runs.append(batch) or f"run-{len(runs)}", down)
    handoff.start()
    try:
        handoff.add([{"record_id": "cap-1"}])
        assert wait_until(lambda: handoff.stamp_failed == 1, 60), "first batch not handed off"
        handoff.add([{"record_id": "cap-2"}])
        assert wait_until(lambda: len(runs) == 2, 60), "the hand-off thread stopped"
        assert wait_until(lambda: handoff.stamp_failed == 2, 30)
        assert handoff.alive()
    finally:
        handoff.stop()
        down.close()
