"""Device pairing, tokens, upload URLs and ingest against a real PostgreSQL (in-process app).

The app runs in-process through Starlette's TestClient (lifespan included, so the
asyncpg pool is the real one); storage is the local directory backend, whose signed
upload route (routes_storage) is exercised too. The real-process + curl + S3 flow is
tests/test_devices_flow.py.
"""

from __future__ import annotations

import hashlib
import logging
import uuid

import psycopg2
import pytest
from fastapi.testclient import TestClient

from camfleet import db, tokens
from camfleet.storage.local import LocalStore
from services.api.app import create_app
from services.api.ratelimit import RateLimits

SECRET = b"test-server-secret-0123456789abcdef"
JPEG = b"\xff\xd8\xff\xe0" + b"camfleet-test-jpeg" * 64 + b"\xff\xd9"


def make_user_key(dsn: str, user_id: str = "alice") -> str:
    key = tokens.new_user_key()
    with db.transaction(dsn) as conn:
        db.queries.devices_create_user(conn, user_id=user_id, name=user_id)
        db.queries.devices_create_user_key(
            conn, user_id=user_id, key_hash=tokens.hash_user_key(SECRET, key), label="test"
        )
    return key


def device_api(database_url: str, root, **limits: str):
    """The device API in-process on a local store under `root`, with these rate limits
    (the rest default), and no Prefect (tests/test_devices_processing.py has that)."""
    return create_app(
        database_url=database_url,
        secret_key=SECRET,
        processing_runs=None,
        store=LocalStore(root, public_url="http://testserver", secret=SECRET),
        rate_limits=RateLimits(**limits),
    )


@pytest.fixture
def client(database_url, tmp_path):
    app = device_api(database_url, tmp_path / "objects", device="1000/second", user="1000/second")
    store = app.state.store
    with TestClient(app) as c:
        c.store = store
        c.dsn = database_url
        yield c


def pair_and_activate(client, user_key: str, name="esp32-proto") -> tuple[str, str]:
    r = client.post(
        "/devices/pair", json={"name": name}, headers={"Authorization": f"Bearer {user_key}"}
    )
    assert r.status_code == 200, r.text
    paired = r.json()
    r = client.post("/devices/activate", json={"pairing_code": paired["pairing_code"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["device_id"] == paired["device_id"]
    assert body["device_token"].startswith("devtok_")
    return body["device_id"], body["device_token"]


def upload(client, token: str, seq: int, filename="2025-12-26T10-15-30Z_000123.jpg") -> dict:
    r = client.post(
        "/devices/upload-url",
        json={"filename": filename, "content_type": "image/jpeg", "seq": seq},
        headers={"X-Device-Token": token},
    )
    assert r.status_code == 200, r.text
    target = r.json()
    r = client.put(target["upload_path"], content=JPEG, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 201, r.text
    return target


def ingest(client, token: str, key: str, seq: int):
    return client.post(
        "/devices/ingest",
        json={
            "object_key": key,
            "captured_at": "2025-12-26T10:15:30Z",
            "seq": seq,
            "content_type": "image/jpeg",
            "ntp_synced": True,
        },
        headers={"X-Device-Token": token},
    )


def test_pair_activate_upload_ingest_and_duplicate(client):
    key = make_user_key(client.dsn)
    device_id, token = pair_and_activate(client, key)

    target = upload(client, token, 123)
    assert target["object_key"].startswith(f"devices/{device_id}/")
    assert target["object_key"].endswith("/123-2025-12-26T10-15-30Z_000123.jpg")
    assert target["upload_url"].startswith("http://testserver/storage/upload/")
    assert (target["upload_host"], target["upload_port"]) == ("testserver", 80)
    assert client.store.get(target["object_key"]) == JPEG

    r = ingest(client, token, target["object_key"], 123)
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["status"] == "queued" and first["item_id"]
    # No Prefect API here, so no flow run: the seed's clients still get a task id, the
    # same one for the same item until a run adopts it.
    assert uuid.UUID(first["task_id"])
    r = ingest(client, token, target["object_key"], 123)
    assert r.json() == {
        "status": "duplicate",
        "item_id": first["item_id"],
        "task_id": first["task_id"],
    }

    with db.transaction(client.dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "select source, seq, storage_path, image_bytes, captured_at is not null,"
            " metadata from captures where device_id = %s",
            (device_id,),
        )
        assert cur.fetchall() == [
            ("lifelog", 123, target["object_key"], len(JPEG), True, {"ntp_synced": True})
        ]


def test_wrong_missing_and_revoked_tokens_get_401(client):
    key = make_user_key(client.dsn)
    device_id, token = pair_and_activate(client, key)
    body = {"filename": "a.jpg", "content_type": "image/jpeg", "seq": 1}
    assert client.post("/devices/upload-url", json=body).status_code == 401
    for bad in ("devtok_" + "x" * 43, "nottoken", "devtok_" + "y" * 500):
        r = client.post("/devices/upload-url", json=body, headers={"X-Device-Token": bad})
        assert r.status_code == 401, bad
        assert "reason" in r.json()["detail"]
    ok = {"X-Device-Token": token}
    assert client.post("/devices/upload-url", json=body, headers=ok).status_code == 200

    r = client.post(f"/devices/{device_id}/revoke", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    r = client.post("/devices/upload-url", json=body, headers=ok)
    assert r.status_code == 401
    assert r.json()["detail"]["reason"] == "unknown or revoked device token"
    # another user cannot revoke or rotate it, nor see it
    other = make_user_key(client.dsn, "mallory")
    r = client.post(f"/devices/{device_id}/rotate", headers={"Authorization": f"Bearer {other}"})
    assert r.status_code == 404
    # rotating never lifts a revocation (issue 13, item 14): an operator reinstates
    r = client.post(f"/devices/{device_id}/rotate", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 409 and r.json()["detail"]["error"] == "device_revoked"
    assert client.post("/devices/upload-url", json=body, headers=ok).status_code == 401
    with db.transaction(client.dsn) as conn:
        db.queries.devices_reinstate(conn, device_id=device_id)  # camfleet devices reinstate
    # the owner rotates: a fresh token works again, the old one stays dead
    r = client.post(f"/devices/{device_id}/rotate", headers={"Authorization": f"Bearer {key}"})
    new = r.json()["device_token"]
    assert client.post("/devices/upload-url", json=body, headers=ok).status_code == 401
    r = client.post("/devices/upload-url", json=body, headers={"X-Device-Token": new})
    assert r.status_code == 200


def test_device_rotates_its_own_token(client):
    device_id, token = pair_and_activate(client, make_user_key(client.dsn))
    r = client.post("/devices/rotate-token", headers={"X-Device-Token": token})
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    new = r.json()["device_token"]
    assert new != token
    body = {"filename": "a.jpg", "seq": 1}
    assert (
        client.post("/devices/upload-url", json=body, headers={"X-Device-Token": token}).status_code
        == 401
    )
    assert (
        client.post("/devices/upload-url", json=body, headers={"X-Device-Token": new}).status_code
        == 200
    )


def test_user_key_required_for_pairing(client):
    assert client.post("/devices/pair", json={}).status_code == 401
    r = client.post("/devices/pair", json={}, headers={"Authorization": "Bearer cfuk_nope"})
    assert r.status_code == 401
    r = client.post("/devices/pair", json={}, headers={"Authorization": "Basic abc"})
    assert r.status_code == 401


def test_pairing_records_the_kind_the_request_names(client):
    """A Visant camera paired through /devices/pair is a visant device (the console, the
    trigger scheduler and `camfleet devices` go by kind); a seed-004 body, which names no
    kind, still pairs a Lifelog camera; a kind that never holds a device token is refused."""
    key = make_user_key(client.dsn)
    auth = {"Authorization": f"Bearer {key}"}
    kinds = {}
    for body in ({"name": "cam-v", "kind": "visant"}, {"name": "cam-l"}):
        paired = client.post("/devices/pair", json=body, headers=auth)
        assert paired.status_code == 200, paired.text
        code = paired.json()["pairing_code"]
        assert client.post("/devices/activate", json={"pairing_code": code}).status_code == 200
    for d in client.get("/devices", headers=auth).json():
        kinds[d["friendly_name"]] = d["kind"]
    assert kinds == {"cam-v": "visant", "cam-l": "lifelog"}
    for kind in ("esp32", "edge", "sftp", "bogus"):
        r = client.post("/devices/pair", json={"name": "x", "kind": kind}, headers=auth)
        assert r.status_code == 422, (kind, r.text)


def test_pairing_code_is_single_use_and_expires(client):
    key = make_user_key(client.dsn)
    auth = {"Authorization": f"Bearer {key}"}
    code = client.post("/devices/pair", json={}, headers=auth).json()["pairing_code"]
    assert client.post("/devices/activate", json={"pairing_code": code}).status_code == 200
    r = client.post("/devices/activate", json={"pairing_code": code})
    assert r.status_code == 409 and r.json()["detail"]["error"] == "pairing_code_used"

    paired = client.post("/devices/pair", json={}, headers=auth).json()
    with db.transaction(client.dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "update device_pairings set expires_at = now() - interval '1 second'"
            " where device_id = %s",
            (paired["device_id"],),
        )
    r = client.post("/devices/activate", json={"pairing_code": paired["pairing_code"]})
    assert r.status_code == 410 and r.json()["detail"]["error"] == "pairing_code_expired"

    r = client.post("/devices/activate", json={"pairing_code": "00000000"})
    assert r.status_code == 400 and r.json()["detail"]["error"] == "invalid_pairing_code"


def test_failed_activations_are_limited_per_address(database_url, tmp_path):
    app = device_api(database_url, tmp_path, activate_fail="3/minute")
    with TestClient(app) as c:
        for _ in range(3):
            assert c.post("/devices/activate", json={"pairing_code": "ZZZZZZZZ"}).status_code == 400
        # the right code no longer helps a client that has been guessing
        key = make_user_key(database_url)
        code = c.post("/devices/pair", json={}, headers={"Authorization": f"Bearer {key}"}).json()[
            "pairing_code"
        ]
        r = c.post("/devices/activate", json={"pairing_code": code})
        assert r.status_code == 429
        assert int(r.headers["Retry-After"]) >= 1
        assert "rate limit" in r.json()["detail"]["reason"]


def test_device_rate_limit_answers_429_with_retry_after(database_url, tmp_path):
    app = device_api(database_url, tmp_path, device="5/minute")
    with TestClient(app) as c:
        _, token = pair_and_activate(c, make_user_key(database_url))
        body = {"filename": "a.jpg", "seq": 1}
        codes = [
            c.post("/devices/upload-url", json=body, headers={"X-Device-Token": token}).status_code
            for _ in range(7)
        ]
        assert codes == [200] * 5 + [429] * 2
        r = c.post("/devices/upload-url", json=body, headers={"X-Device-Token": token})
        assert 1 <= int(r.headers["Retry-After"]) <= 60


def test_user_rate_limit_spans_the_users_devices(database_url, tmp_path):
    app = device_api(database_url, tmp_path, user="6/minute", pair="100/minute")
    with TestClient(app) as c:
        key = make_user_key(database_url)
        # pairing + activating two devices costs 2 user hits (pair); 4 remain
        _, t1 = pair_and_activate(c, key)
        _, t2 = pair_and_activate(c, key)
        body = {"filename": "a.jpg", "seq": 1}
        codes = [
            c.post("/devices/upload-url", json=body, headers={"X-Device-Token": t}).status_code
            for t in (t1, t2, t1, t2, t1)
        ]
        assert codes == [200, 200, 200, 200, 429]


@pytest.mark.parametrize(
    "body, status, error",
    [
        ({"filename": "../../etc/passwd.jpg", "seq": 1}, 400, "bad_filename"),
        ({"filename": "a/../b.jpg", "seq": 1}, 400, "bad_filename"),
        ({"filename": ".hidden.jpg", "seq": 1}, 400, "bad_filename"),
        ({"filename": "x.exe", "content_type": "application/x-msdownload"}, 415, None),
        ({"filename": "big.jpg", "seq": 1, "size": 50 * 1024 * 1024}, 413, "too_large"),
        ({"filename": "a.jpg", "seq": -1}, 422, None),
        ({"filename": 12, "seq": 1}, 422, None),
    ],
)
def test_upload_url_refuses_bad_input(client, body, status, error):
    _, token = pair_and_activate(client, make_user_key(client.dsn))
    r = client.post("/devices/upload-url", json=body, headers={"X-Device-Token": token})
    assert r.status_code == status, r.text
    if error:
        assert r.json()["detail"]["error"] == error


def test_ingest_refuses_keys_outside_prefix_and_missing_objects(client):
    key = make_user_key(client.dsn)
    device_a, token_a = pair_and_activate(client, key)
    device_b, token_b = pair_and_activate(client, key)
    target_b = upload(client, token_b, 1)
    # A's token with B's key: refused before storage is consulted
    r = ingest(client, token_a, target_b["object_key"], 1)
    assert r.status_code == 403 and r.json()["detail"]["error"] == "key_outside_prefix"
    for bad in (
        f"devices/{device_a}/../{device_b}/x.jpg",
        f"devices/{device_a}",
        f"devices/{device_a}/",
        "devices/x.jpg",
        f"/devices/{device_a}/x.jpg",
        f"devices/{device_a}//x.jpg",
    ):
        r = ingest(client, token_a, bad, 2)
        assert r.status_code == 403, bad
    r = ingest(client, token_a, f"devices/{device_a}/2025/12/26/9-never-uploaded.jpg", 9)
    assert r.status_code == 404 and r.json()["detail"]["error"] == "object_not_found"
    # a different seq for an already ingested object is a conflict, not a second row
    assert ingest(client, token_b, target_b["object_key"], 1).json()["status"] == "queued"
    r = ingest(client, token_b, target_b["object_key"], 2)
    assert r.status_code == 409


def test_signed_local_upload_checks_signature_size_and_expiry(client):
    store: LocalStore = client.store
    key = "devices/d1/2025/01/01/1-a.jpg"
    signed = store.presigned_put(key, "image/jpeg", expires_in=60, max_bytes=100)
    path = signed.url.removeprefix("http://testserver")
    ct = signed.headers
    other = path.replace("1-a.jpg", "1-b.jpg")
    assert client.put(other, content=b"x", headers=ct).status_code == 403
    assert client.put(path.replace("sig=", "sig=0"), content=b"x", headers=ct).status_code == 403
    assert client.put(path, content=b"x" * 101, headers=signed.headers).status_code == 413
    assert store.head(key) is None

    def chunks():  # no Content-Length: the limit is enforced while streaming
        for _ in range(20):
            yield b"y" * 10

    assert client.put(path, content=chunks(), headers=signed.headers).status_code == 413
    assert store.head(key) is None
    r = client.put(path, content=b"z" * 100, headers=signed.headers)
    assert r.status_code == 201 and r.json()["sha256"] == hashlib.sha256(b"z" * 100).hexdigest()
    expired = store.presigned_put(key, "image/jpeg", expires_in=-1, max_bytes=100)
    r = client.put(expired.url.removeprefix("http://testserver"), content=b"z", headers=ct)
    assert r.status_code == 403

    key = "devices/d1/2025/01/01/2-a.jpg"  # signed objects are write-once: a new key
    post = store.presigned_post(key, max_bytes=100, expires_in=60)
    r = client.post(
        post.url.removeprefix("http://testserver"),
        data=post.fields,
        files={"file": ("a.jpg", b"p" * 50, "image/jpeg")},
    )
    assert r.status_code == 201, r.text
    assert store.get(key) == b"p" * 50


def test_oversized_json_bodies_are_refused_unread(client):
    r = client.post("/devices/activate", content=b"{" + b" " * 100_000 + b"}")
    assert r.status_code == 413 and r.json()["detail"]["error"] == "body_too_large"


def test_tokens_and_codes_never_stored_or_logged_in_clear(client, caplog):
    caplog.set_level(logging.DEBUG)
    key = make_user_key(client.dsn)
    r = client.post("/devices/pair", json={}, headers={"Authorization": f"Bearer {key}"})
    code = r.json()["pairing_code"]
    token = client.post("/devices/activate", json={"pairing_code": code}).json()["device_token"]
    target = upload(client, token, 5)
    ingest(client, token, target["object_key"], 5)
    secrets = [key, code, token, token.removeprefix("devtok_")]
    for s in secrets:
        assert s not in caplog.text
    conn = psycopg2.connect(client.dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "select string_agg(t::text, '|') from ("
                " select d::text as t from devices d union all"
                " select p::text from device_pairings p union all"
                " select k::text from api_keys k) x"
            )
            dump = cur.fetchone()[0]
    finally:
        conn.close()
    for s in secrets:
        assert s not in dump
    assert tokens.hash_device_token(SECRET, token) in dump
