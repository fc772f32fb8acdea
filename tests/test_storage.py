"""Each storage backend stores and reads back objects; S3 presigned uploads work."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from camfleet.keys import BadName, key_within, object_key, sanitize_name
from camfleet.storage import PresignNotSupported, open_store
from camfleet.storage.local import LocalStore
from camfleet.storage.s3 import S3Store
from camfleet.storage.supabase import SupabaseStore
from tests.supabase_storage_server import SupabaseStorageServer

JPEG = b"\xff\xd8" + bytes(range(256)) * 40 + b"\xff\xd9"


def _roundtrip(store, tmp_path):
    info = store.put("devices/AABB/2025/img.jpg", JPEG, "image/jpeg")
    assert info.size == len(JPEG) and info.sha256 == hashlib.sha256(JPEG).hexdigest()
    assert store.get("devices/AABB/2025/img.jpg") == JPEG
    head = store.head("devices/AABB/2025/img.jpg")
    assert head.size == len(JPEG)
    assert store.checksum("devices/AABB/2025/img.jpg") == info.sha256
    assert store.head("devices/AABB/2025/missing.jpg") is None
    big = b"\x00\x01" * 300_000
    assert store.put("events/video.mp4", big, "video/mp4").size == 600_000
    assert store.get("events/video.mp4") == big
    assert [o.key for o in store.list("devices/AABB/2025/")] == ["devices/AABB/2025/img.jpg"]
    store.delete("devices/AABB/2025/img.jpg")
    assert store.head("devices/AABB/2025/img.jpg") is None
    with pytest.raises(KeyError):
        store.get("devices/AABB/2025/img.jpg")
    with pytest.raises(BadName):
        store.put("../escape.jpg", b"x")


def test_local_store_roundtrip(tmp_path):
    store = open_store((tmp_path / "objects").as_uri())
    assert isinstance(store, LocalStore)
    _roundtrip(store, tmp_path)
    # nothing half-written is left behind
    assert not [p for p in (tmp_path / "objects").rglob(".upload-*")]


def test_local_store_presigns_only_through_the_api(tmp_path):
    store = LocalStore(tmp_path)
    with pytest.raises(PresignNotSupported, match="CAMFLEET_PUBLIC_URL"):
        store.presigned_put("devices/a/x.jpg", "image/jpeg")
    signed = LocalStore(tmp_path, "http://127.0.0.1:8000", b"k").presigned_put(
        "devices/a/x.jpg", "image/jpeg", 60, 1000
    )
    assert signed.url.startswith("http://127.0.0.1:8000/storage/upload/devices/a/x.jpg?")


def test_s3_store_roundtrip(s3, bucket, tmp_path):
    url = f"s3://{bucket}/camfleet?endpoint_url={s3.endpoint_url}"
    store = S3Store(bucket, "camfleet", s3.endpoint_url, s3.region, s3.access_key, s3.secret_key)
    assert "s3://" in store.describe() and s3.secret_key not in store.describe()
    _roundtrip(store, tmp_path)
    assert urlparse(url).netloc == bucket


def test_s3_presigned_put_and_post_upload(s3, bucket):
    store = S3Store(bucket, "", s3.endpoint_url, s3.region, s3.access_key, s3.secret_key)
    put = store.presigned_put("devices/D1/a.jpg", "image/jpeg", expires_in=60)
    assert httpx.put(put.url, content=JPEG, headers=put.headers).status_code == 200
    assert store.get("devices/D1/a.jpg") == JPEG

    post = store.presigned_post("devices/D1/b.jpg", max_bytes=100_000, expires_in=60)
    response = httpx.post(post.url, data=post.fields, files={"file": ("b.jpg", JPEG)})
    assert response.status_code in (200, 204)
    assert store.head("devices/D1/b.jpg").size == len(JPEG)


def test_s3_presigned_grants_cover_exactly_one_key(s3, bucket):
    """What a real S3 server enforces, read from the grant itself.

    moto's server (the S3-compatible server available here) does not check presigned
    signatures or POST policy conditions, so a request for another key would pass there;
    AWS and MinIO refuse it because the signature and policy below bind the key.
    """
    store = S3Store(bucket, "", s3.endpoint_url, s3.region, s3.access_key, s3.secret_key)
    put = store.presigned_put("devices/D1/a.jpg", "image/jpeg", expires_in=60)
    parsed = urlparse(put.url)
    query = parse_qs(parsed.query)
    assert parsed.path == f"/{bucket}/devices/D1/a.jpg"
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and query["X-Amz-Expires"] == ["60"]
    assert "X-Amz-Signature" in query  # SigV4 signs the canonical URI, i.e. the key

    post = store.presigned_post("devices/D1/b.jpg", max_bytes=5000, content_type="image/jpeg")
    policy = json.loads(base64.b64decode(post.fields["policy"]))
    assert {"key": "devices/D1/b.jpg"} in policy["conditions"]
    assert ["content-length-range", 1, 5000] in policy["conditions"]
    assert {"Content-Type": "image/jpeg"} in policy["conditions"]


def test_supabase_store_roundtrip(tmp_path):
    with SupabaseStorageServer("service-role-test-key") as server:
        store = SupabaseStore(server.url, "service-role-test-key", "gxp-captures")
        _roundtrip(store, tmp_path)
        signed = store.presigned_put("devices/D1/c.jpg", "image/jpeg")
        assert httpx.put(signed.url, content=JPEG, headers=signed.headers).status_code == 200
        assert store.get("devices/D1/c.jpg") == JPEG
        assert "service-role-test-key" not in store.describe()


def test_open_store_picks_backend_from_url(tmp_path, s3, bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    from camfleet.settings import get_settings

    get_settings.cache_clear()
    try:
        store = open_store(f"s3://{bucket}/pre?endpoint_url={s3.endpoint_url}")
        assert isinstance(store, S3Store) and store.prefix == "pre"
        store.put("x/y.bin", b"123")
        assert store.get("x/y.bin") == b"123"
        with pytest.raises(Exception, match="unknown storage URL scheme"):
            open_store("ftp://nope")
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize(
    "bad", ["../x.jpg", "a/b.jpg", "..", ".hidden", "x\x00.jpg", "", "a\\b", "\u202e.jpg", 7]
)
def test_sanitize_name_refuses_unsafe_names(bad):
    with pytest.raises(BadName):
        sanitize_name(bad)


def test_keys():
    assert sanitize_name("image 123 (1).jpg") == "image_123_1_.jpg"
    assert sanitize_name("café.jpg") == "cafe.jpg"
    assert object_key("devices", "D1", "a.jpg") == "devices/D1/a.jpg"
    with pytest.raises(BadName):
        object_key("devices", "..", "a.jpg")
    assert key_within("devices/D1/a.jpg", "devices/D1")
    assert not key_within("devices/D10/a.jpg", "devices/D1")
    assert not key_within("devices/D1/../D2/a.jpg", "devices/D1")


def test_local_store_writes_through_its_tmp_dir_and_sweeps_stale_leftovers(tmp_path):
    import os
    import time

    from camfleet.storage.local import STALE_TMP_S, TMP_DIR

    store = LocalStore(tmp_path)
    stale = tmp_path / TMP_DIR / ".upload-crashed"
    fresh = tmp_path / TMP_DIR / ".upload-in-progress"
    stale.write_bytes(b"left by a crash between write and rename")
    fresh.write_bytes(b"another process is writing this one")
    old = time.time() - STALE_TMP_S - 60
    os.utime(stale, (old, old))
    store.put("devices/D1/a.jpg", JPEG)
    assert [o.key for o in store.list()] == ["devices/D1/a.jpg"]  # temp dir not listed
    with pytest.raises(ValueError, match="temporary"):
        store.put(f"{TMP_DIR}/x.jpg", b"x")
    LocalStore(tmp_path)  # opening a store sweeps what a crash left long ago
    assert not stale.exists() and fresh.exists()


def test_store_step_does_not_ack_an_image_whose_object_failed(tmp_path, database_url, monkeypatch):
    """The assembler's store step (tasks.mqtt, the default direct ACK path) on a local
    store: the images stored get rows and ACK_OK, the one that could not be stored
    gets E_STORE and no ACK, so its device keeps it and resends."""
    from camfleet import db
    from camfleet.protocol.assembler import FinalizeImage
    from flows.mqtt_ingest import run_batch_direct
    from tasks import mqtt as tm

    store = LocalStore(tmp_path / "objects")
    images = []
    for k, dev in enumerate(("AA0000000001", "AA0000000002", "AA0000000003")):
        data = JPEG + bytes([k])
        sha = hashlib.sha256(data).hexdigest()
        images.append((FinalizeImage(dev, f"i{k}.jpg", f"i{k}.jpg", data, sha, 1, {}), 0.0))
    batch = tm.new_batch(images)
    bad = batch.items[1]
    Path(store.root, bad.key).mkdir(parents=True)  # a directory where its file would go
    published, errors = [], []
    pool = db.Pool(database_url)
    monkeypatch.setattr(tm, "RETRY_DELAYS_S", [0.0] * tm.TASK_RETRIES)  # retry at once
    tm.set_context(
        tm.IngestContext(
            store=store,
            pool=pool,
            publish=lambda topic, payload: published.append(topic),
            on_error=lambda code, item, message, details=None: errors.append((code, item)),
        )
    )
    try:
        asyncio.run(run_batch_direct(batch.batch_id))
    finally:
        tm.set_context(None)
        tm.forget_batch(batch.batch_id)
        pool.close()
    good = [batch.items[0], batch.items[2]]
    assert [i.acked for i in batch.items] == [True, False, True]
    assert sorted(published) == sorted(f"ESP32CAM/{i.image.device_id}/ack" for i in good)
    assert [(code, item.key) for code, item in errors] == [(tm.E_STORE, bad.key)]
    for i in good:
        assert store.get(i.key) == i.image.data
