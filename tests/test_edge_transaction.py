"""The edge batch-upload transaction end to end, against real Mosquitto, moto's S3
server and PostgreSQL: the device side (camfleet.edge) and the signer (services/signer).

moto's S3 server does not check presigned-POST signatures or policy conditions, so
the tests that forge requests prove camfleet itself refuses them (the signer decides
keys and verifies what it finds), not the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import time
import uuid
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import psycopg2
import pytest

from blocks.mqtt import MqttBroker
from camfleet.edge.config import EdgeConfig
from camfleet.edge.link import EdgeLink
from camfleet.edge.uploader import EdgeUploader, run_batch
from camfleet.localsvc import MosquittoInstance
from camfleet.protocol import edge_batch as eb
from camfleet.storage.s3 import S3Store
from services.signer import Signer

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
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "select device_capture_id, sha256, storage_path, source, image_bytes "
            "from captures where device_id = %s",
            (serial,),
        )
        return {row[0]: row[1:] for row in cur.fetchall()}


def errors(dsn: str, serial: str) -> list[tuple]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
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
        assert path == f"devices/{cfg.serial}/{name}"
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
