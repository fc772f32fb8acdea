"""What outsiders found in the device API (issue 13 items 1-9 and 16), against a real
`camfleet api` process, PostgreSQL and the local object store.

Each test fails without its fix; docs/security.md ("Device API: hostile requests") lists
them. The body limits run with short settings (CAMFLEET_BODY_IDLE_TIMEOUT_S=1) so a
stalled body is cut off in a second; nothing here asserts how long anything took.
"""

from __future__ import annotations

import hashlib
import re
import socket
import string
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from camfleet import db, keys
from camfleet.protocol import triggers as core
from camfleet.storage.local import LocalStore
from tests.faults_api_support import make_user_key
from tests.test_api_commands_helpers import (
    SECRET,
    ApiProcess,
    add_device,
    capture_body,
    fetch,
    jpeg_bytes,
)

ROOT = Path(__file__).resolve().parent.parent
LONG_ID = "d" * keys.MAX_ID_LEN  # the longest device id the API accepts
# Connections stalled on one signed URL (the outsiders' figure) and the per-URL slots.
STALLED = 45
PER_DEVICE = 2


@pytest.fixture(scope="module")
def api(postgres, _template_db, tmp_path_factory):
    """One API process and database for the module (a start costs seconds on a busy
    machine); tests use their own devices and users and look only at those."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    database_url = postgres.create_database(name, template=_template_db)
    storage_dir = tmp_path_factory.mktemp("hardening") / "objects"
    storage_dir.mkdir()
    env = {
        "CAMFLEET_BODY_IDLE_TIMEOUT_S": "1",
        "CAMFLEET_MAX_UPLOADS_PER_DEVICE": str(PER_DEVICE),
        "CAMFLEET_RATE_LIMIT_DEVICE": "10000/minute",
        "CAMFLEET_RATE_LIMIT_USER": "10000/minute",
    }
    with ApiProcess(database_url, storage_dir, **env) as proc:
        proc.dsn = database_url
        proc.storage = storage_dir
        proc.http = httpx.Client(base_url=proc.url, timeout=30)
        yield proc
        proc.http.close()
    postgres.drop_database(name)


def paired(api) -> tuple[str, str, str]:
    """(user key, device id, device token) of a device paired through the API by a new
    user."""
    key = make_user_key(api.dsn, f"user-{uuid.uuid4().hex[:8]}")
    r = api.http.post("/devices/pair", json={"name": "cam"}, headers=_bearer(key))
    assert r.status_code == 200, r.text
    code = r.json()["pairing_code"]
    r = api.http.post("/devices/activate", json={"pairing_code": code})
    assert r.status_code == 200, r.text
    return key, r.json()["device_id"], r.json()["device_token"]


def _bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def objects(root: Path, device_id: str) -> list[str]:
    """Stored objects of one device, both pipelines."""
    found = []
    for prefix in ("devices", "captures"):
        base = root / prefix / device_id
        found += [p.relative_to(root).as_posix() for p in base.rglob("*") if p.is_file()]
    return sorted(found)


def captures_of(api, device_id: str) -> int:
    return fetch(api.dsn, "SELECT count(*) FROM captures WHERE device_id = %s", device_id)[0][0]


# --- 1. GET /devices, and every many-row query awaited as one ------------------------


def test_get_devices_lists_the_users_devices(api):
    key, device_id, _ = paired(api)
    r = api.http.get("/devices", headers=_bearer(key))
    assert r.status_code == 200, r.text
    assert [d["device_id"] for d in r.json()] == [device_id]
    assert "device_token_hash" not in r.json()[0]


def test_no_route_awaits_a_many_row_query():
    """aiosql returns an async generator for a query without ^ ! <! suffix: `await` on
    it is the GET /devices 500. Walk every API module for the same mistake."""
    many = set()
    for sql in (ROOT / "sql" / "queries").glob("*.sql"):
        many |= set(re.findall(r"^-- name: (\w+)\s*$", sql.read_text(), re.M))
    for module in (ROOT / "services" / "api").glob("*.py"):
        for name in re.findall(r"await [\w.()]*?\.(\w+)\(", module.read_text()):
            assert name not in many, f"{module.name}: await on many-row query {name}"


# --- 2. trigger ids fit every field they come back in --------------------------------


@pytest.mark.parametrize("length", [1, 20, 34, 35, 42, 43, 63, 64])
def test_trigger_ids_fit_the_capture_field_for_every_device_id(length):
    alphabet = string.ascii_letters + string.digits + "_.:-"
    device_id = "A" + "".join(alphabet[i % len(alphabet)] for i in range(length - 1))
    now = datetime(2026, 11, 9, 14, 5, 30, tzinfo=UTC)
    for trigger_id in (
        core.manual_trigger_id(keys.safe_id(device_id), now),
        core.scheduled_trigger_id(device_id, now),
    ):
        assert keys.safe_id(trigger_id, "trigger id") == trigger_id
    # two long ids sharing a head still get different trigger ids
    other = device_id[:-1] + ("x" if device_id[-1] != "x" else "y")
    if length > 42:
        assert core.scheduled_trigger_id(device_id, now) != core.scheduled_trigger_id(other, now)


def test_manual_trigger_of_a_64_char_device_can_be_executed(api):
    add_device(api.dsn, LONG_ID)
    r = api.http.post(f"/v1/devices/{LONG_ID}/trigger", json={})
    assert r.status_code == 200, r.text
    trigger_id = r.json()["trigger_id"]
    r = api.http.post("/v1/captures", json=capture_body(LONG_ID, trigger_id))
    assert r.status_code == 201, r.text
    assert r.json()["trigger_status"] == "executed"


# --- 3. the manual trigger answers the seed's "sent" --------------------------------


def test_manual_trigger_answers_sent_even_when_already_executed(api):
    add_device(api.dsn, "FAST1")
    # A device so fast that its trigger is executed before the API first looks.
    with db.transaction(api.dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "CREATE FUNCTION fast_device() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN NEW.status := 'executed'; NEW.sent_at := now();"
            " NEW.executed_at := now(); RETURN NEW; END $$;"
            "CREATE TRIGGER fast_device BEFORE INSERT ON scheduled_triggers FOR EACH ROW"
            " WHEN (NEW.device_id = 'FAST1') EXECUTE FUNCTION fast_device();"
        )
    r = api.http.post("/v1/devices/FAST1/trigger", json={})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "sent"


# --- 4. local objects are regular files ---------------------------------------------


def test_ingest_of_a_directory_or_through_a_file_is_not_found(api):
    _, device_id, token = paired(api)
    dev = {"X-Device-Token": token}
    r = api.http.post("/devices/upload-url", json={"filename": "a.jpg", "seq": 1}, headers=dev)
    assert r.status_code == 200, r.text
    target = r.json()
    r = api.http.put(target["upload_path"], content=jpeg_bytes(), headers=target["headers"])
    assert r.status_code == 201, r.text
    day = target["object_key"].rsplit("/", 1)[0]
    for key, seq in ((day, 2), (day.rsplit("/", 1)[0], 3), (target["object_key"] + "/x", 4)):
        r = api.http.post("/devices/ingest", json={"object_key": key, "seq": seq}, headers=dev)
        assert r.status_code == 404, (key, r.text)
    assert captures_of(api, device_id) == 0


def test_signed_upload_under_a_file_or_onto_a_directory_is_409(api):
    store = LocalStore(api.storage, public_url=api.url, secret=SECRET.encode())
    store.put("devices/d1/2026/a.jpg", b"\xff\xd8\xff")
    for key in ("devices/d1/2026/a.jpg/b.jpg", "devices/d1/2026"):
        signed = store.presigned_put(key, "image/jpeg", expires_in=60, max_bytes=100)
        r = api.http.put(signed.url, content=b"\xff\xd8\xff!", headers=signed.headers)
        assert r.status_code == 409, (key, r.text)


# --- 5. bad input is a 4xx with a reason -------------------------------------------


def test_bad_input_gets_4xx_with_a_reason_and_writes_nothing(api):
    key, device_id, token = paired(api)
    add_device(api.dsn, "CAM1")
    deep = b"[" * 2000 + b"]" * 2000
    nul_meta = {**capture_body("CAM1", None), "metadata": {"a\u0000b": "\u0000"}}
    old_date = {**capture_body("CAM1", None), "captured_at": "0001-01-01T00:00:00+05:00"}
    cases = [
        ("/v1/devices/CAM1/trigger", deep, {}),
        ("/v1/captures", deep, {}),
        ("/v1/captures", old_date, {}),
        ("/v1/captures", nul_meta, {}),
        ("/v1/devices/CAM1/trigger", {"label": "a\u0000b"}, {}),
        ("/devices/pair", {"name": "a\u0000b"}, _bearer(key)),
        ("/devices/pair", deep, _bearer(key)),
        ("/devices/ingest", {"object_key": f"devices/{device_id}/a\u0000", "seq": 1},
         {"X-Device-Token": token}),
        ("/devices/ingest", {"object_key": f"devices/{device_id}/a.jpg", "seq": 1,
                             "captured_at": "0001-01-01T00:00:00+05:00"},
         {"X-Device-Token": token}),
    ]  # fmt: skip
    for path, body, headers in cases:
        if isinstance(body, bytes):
            r = api.http.post(path, content=body, headers=headers)
        else:
            r = api.http.post(path, json=body, headers=headers)
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:300])
        detail = r.json()["detail"]
        assert detail if isinstance(detail, list) else detail["reason"], (path, r.text)
    for device in (device_id, "CAM1"):
        assert objects(api.storage, device) == []
        assert captures_of(api, device) == 0


# --- 6. credentials before the body ------------------------------------------------


def _headers_only(url: str, path: str, headers: dict, length: int) -> int:
    """POST that declares `length` body bytes but sends none: the status the server
    answers without waiting for the body (it would otherwise wait for it)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {length}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = sock.recv(4096).decode("latin-1")
    return int(head.split(" ", 2)[1])


def test_captures_check_the_token_before_reading_the_body(api):
    big = 12 * 1024 * 1024
    for token in ("devtok_" + "x" * 43, "not-a-token"):
        wrong = {"X-Device-Token": token, "Content-Type": "application/json"}
        assert _headers_only(api.url, "/v1/captures", wrong, big) == 401


# --- 7. slow bodies hold no shared worker ----------------------------------------------


def test_stalled_uploads_are_cut_off_and_do_not_block_other_devices(api):
    _, device_id, token = paired(api)
    r = api.http.post(
        "/devices/upload-url",
        json={"filename": "a.jpg", "seq": 1},
        headers={"X-Device-Token": token},
    )
    target = r.json()
    host, port = api.url.removeprefix("http://").split(":")

    def stall() -> int:
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            head = (
                f"PUT {target['upload_path']} HTTP/1.1\r\nHost: {host}\r\n"
                "Content-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n\xff"
            )
            sock.sendall(head.encode("latin-1"))
            return int(sock.recv(4096).decode("latin-1").split(" ", 2)[1])

    add_device(api.dsn, "OTHER1")
    with ThreadPoolExecutor(STALLED) as pool:
        stalled = [pool.submit(stall) for _ in range(STALLED)]
        r = api.http.post("/v1/captures", json=capture_body("OTHER1", None))
        assert r.status_code == 201, r.text
        codes = sorted(f.result() for f in stalled)
    # two hold the URL's slots until the idle timeout (408), the rest are refused (429)
    assert codes == [408] * PER_DEVICE + [429] * (STALLED - PER_DEVICE), codes
    assert not (api.storage / target["object_key"]).exists()


def test_a_stalled_capture_body_gets_408(api):
    host, port = api.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            f"POST /v1/captures HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"
            "\r\nContent-Length: 1000\r\n\r\n{".encode()
        )
        assert sock.recv(4096).decode("latin-1").split(" ", 2)[1] == "408"


def test_upload_slots_refuse_beyond_the_process_and_device_caps():
    from fastapi import HTTPException

    from services.api.bodies import UploadSlots

    slots = UploadSlots(total=3, per_device=2)
    with slots.take("a"), slots.take("a"):
        with pytest.raises(HTTPException) as refused, slots.take("a"):
            pass
        assert refused.value.status_code == 429
        with slots.take("b"):
            with pytest.raises(HTTPException) as full, slots.take("c"):
                pass
            assert full.value.status_code == 503
            assert full.value.headers["Retry-After"]
    assert slots.busy == 0 and not slots.by_device  # every slot given back


# --- 8. decide, then write -----------------------------------------------------------


def test_duplicate_capture_never_overwrites_nor_adds_objects(api):
    add_device(api.dsn, "CAM2")
    r = api.http.post("/v1/devices/CAM2/trigger", json={})
    trigger_id = r.json()["trigger_id"]
    first = jpeg_bytes(color=(10, 200, 10))
    r = api.http.post("/v1/captures", json=capture_body("CAM2", trigger_id, first))
    assert r.status_code == 201 and r.json()["status"] == "uploaded", r.text
    stored = objects(api.storage, "CAM2")
    other = jpeg_bytes(size=(32, 32), color=(200, 10, 10))
    for captured_at in ("2026-11-09T14:05:30Z", "2026-01-02T00:00:00Z"):
        body = {**capture_body("CAM2", trigger_id, other), "captured_at": captured_at}
        r = api.http.post("/v1/captures", json=body)
        assert r.json()["status"] == "duplicate", r.text
    assert objects(api.storage, "CAM2") == stored
    sql = "SELECT storage_path, sha256 FROM captures WHERE device_id = %s"
    [(path, sha)] = fetch(api.dsn, sql, "CAM2")
    assert hashlib.sha256((api.storage / path).read_bytes()).hexdigest() == sha


# --- 9. what was stored is what was signed, once -------------------------------------


def test_signed_put_binds_content_type_is_write_once_and_ingest_checks_magic(api):
    _, device_id, token = paired(api)
    dev = {"X-Device-Token": token}

    def url(seq: int) -> dict:
        r = api.http.post("/devices/upload-url", json={"filename": "a.jpg", "seq": seq},
                          headers=dev)  # fmt: skip
        return r.json()

    svg = b'<svg xmlns="http://www.w3.org/2000/svg"/>'
    target = url(1)
    r = api.http.put(target["upload_path"], content=svg, headers={"Content-Type": "image/svg+xml"})
    assert r.status_code == 403, r.text
    jpeg = jpeg_bytes()
    assert api.http.put(target["upload_path"], content=jpeg, headers=target["headers"]).is_success
    # the same bytes again (a retry) are fine; other bytes never replace the object
    assert api.http.put(target["upload_path"], content=jpeg, headers=target["headers"]).is_success
    r = api.http.post("/devices/ingest", json={"object_key": target["object_key"], "seq": 1},
                      headers=dev)  # fmt: skip
    assert r.json()["status"] == "queued", r.text
    r = api.http.put(target["upload_path"], content=b"<html>", headers=target["headers"])
    assert r.status_code == 409, r.text
    assert (api.storage / target["object_key"]).read_bytes() == jpeg

    # an SVG sent as image/jpeg is stored but never ingested
    target = url(2)
    assert api.http.put(target["upload_path"], content=svg, headers=target["headers"]).is_success
    r = api.http.post("/devices/ingest", json={"object_key": target["object_key"], "seq": 2},
                      headers=dev)  # fmt: skip
    assert r.status_code == 415, r.text


# --- 16. oversized chunked JSON bodies are 413 ------------------------------------


def test_oversized_chunked_bodies_on_activate_and_pair_are_413(api):
    key = make_user_key(api.dsn, "bob-413")

    def chunked():
        for _ in range(100):
            yield b" " * 1024

    for path, headers in (("/devices/activate", {}), ("/devices/pair", _bearer(key))):
        headers = {**headers, "Content-Type": "application/json"}
        r = api.http.post(path, content=chunked(), headers=headers)
        assert r.status_code == 413, (path, r.status_code, r.text)


# --- issue 19, item 6: Lifelog keys are filed under the capture date (seed 004) -------


def test_upload_keys_use_the_capture_date_as_the_seed_does(api):
    _, device_id, token = paired(api)
    today = datetime.now(UTC).strftime("%Y/%m/%d")
    cases = [
        ({"filename": "2025-12-26T10-15-30Z_000123.jpg", "seq": 123},
         f"devices/{device_id}/2025/12/26/123-2025-12-26T10-15-30Z_000123.jpg"),
        ({"filename": "a.jpg", "seq": 1, "captured_at": "2024-02-03T23:30:00-01:00"},
         f"devices/{device_id}/2024/02/04/1-a.jpg"),
        ({"filename": "a.jpg", "seq": 2}, f"devices/{device_id}/{today}/2-a.jpg"),
        # implausible dates (the far future, before 2000, not a date) file under today
        ({"filename": "9999-01-01_x.jpg", "seq": 3}, f"{today}/3-9999-01-01_x.jpg"),
        ({"filename": "1999-01-01_x.jpg", "seq": 4}, f"{today}/4-1999-01-01_x.jpg"),
        ({"filename": "2025-02-30_x.jpg", "seq": 5}, f"{today}/5-2025-02-30_x.jpg"),
    ]  # fmt: skip
    for body, key in cases:
        r = api.http.post("/devices/upload-url", json=body, headers={"X-Device-Token": token})
        assert r.status_code == 200, r.text
        assert r.json()["object_key"].removeprefix(f"devices/{device_id}/") == key.removeprefix(
            f"devices/{device_id}/"
        )
