"""Every malformed request to the command API gets a 4xx with a reason (one API process)."""

from __future__ import annotations

import base64
import socket
import uuid

import httpx
import pytest

from tests.test_api_commands_helpers import (
    ApiProcess,
    add_device,
    capture_body,
    fetch,
    jpeg_bytes,
    wait_for,
)


@pytest.fixture(scope="module")
def api(postgres, _template_db, tmp_path_factory):
    name = f"test_{uuid.uuid4().hex[:16]}"
    dsn = postgres.create_database(name, template=_template_db)
    add_device(dsn, "GOOD1")
    add_device(dsn, "OTHER1")
    add_device(dsn, "SUSP1", status="suspended")
    storage = tmp_path_factory.mktemp("objects")
    proc = ApiProcess(dsn, storage).start()
    proc.dsn = dsn
    yield proc
    proc.stop()
    postgres.drop_database(name)


def _reason(r: httpx.Response) -> str:
    detail = r.json()["detail"]
    if isinstance(detail, dict):
        return detail["reason"]
    return str(detail)  # FastAPI's own 422 for path parameters


def _other_trigger(api) -> str:
    r = httpx.post(api.url + "/v1/devices/OTHER1/trigger", json={"ttl_seconds": 60})
    return r.json()["trigger_id"]


BIG = "A" * (13 * 1024 * 1024)


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "needle"),
    [
        ("GET", "/v1/devices/NOPE/commands", {}, 404, "no device"),
        ("GET", "/v1/devices/SUSP1/commands", {}, 403, "suspended"),
        ("GET", "/v1/devices/..%2Fetc/commands", {}, 404, ""),
        ("GET", "/v1/devices/bad%20id/commands", {}, 422, "pattern"),
        ("GET", "/v1/devices/" + "x" * 65 + "/commands", {}, 422, "64"),
        ("POST", "/v1/devices/NOPE/trigger", {}, 404, "no device"),
        ("POST", "/v1/devices/SUSP1/trigger", {}, 409, "not active"),
        ("POST", "/v1/devices/GOOD1/trigger", {"content": b"{oops"}, 400, "not JSON"),
        ("POST", "/v1/devices/GOOD1/trigger", {"json": [1, 2]}, 400, "JSON object"),
        ("POST", "/v1/devices/GOOD1/trigger", {"json": {"ttl_seconds": -1}}, 422, "ttl"),
        ("POST", "/v1/devices/GOOD1/trigger", {"json": {"bogus": 1}}, 422, "bogus"),
        ("POST", "/v1/devices/GOOD1/trigger", {"content": b"x" * 5000}, 413, "larger"),
        ("POST", "/v1/captures", {"content": b"not json"}, 400, "not JSON"),
        ("POST", "/v1/captures", {"json": {}}, 422, "device_id"),
        (
            "POST",
            "/v1/captures",
            {"json": {"device_id": 5, "image_base64": "AAAA"}},
            422,
            "device_id",
        ),
        ("POST", "/v1/captures", {"json": capture_body("NOPE", None)}, 404, "no device"),
        ("POST", "/v1/captures", {"json": capture_body("SUSP1", None)}, 403, "suspended"),
        ("POST", "/v1/captures", {"json": capture_body("../x", None)}, 422, "device id"),
        ("POST", "/v1/captures", {"json": capture_body("GOOD1", "../../t")}, 422, "trigger id"),
        ("POST", "/v1/captures", {"json": capture_body("GOOD1", "sched_nope")}, 404, "no trigger"),
        (
            "POST",
            "/v1/captures",
            {"json": {**capture_body("GOOD1", None), "image_base64": "!!!notbase64!!!"}},
            400,
            "base64",
        ),
        (
            "POST",
            "/v1/captures",
            {
                "json": {
                    **capture_body("GOOD1", None),
                    "image_base64": base64.b64encode(b"hello world, not a jpeg").decode(),
                }
            },
            415,
            "not a readable image",
        ),
        (
            "POST",
            "/v1/captures",
            {"json": {**capture_body("GOOD1", None), "captured_at": "yesterday-ish"}},
            422,
            "captured_at",
        ),
        (
            "POST",
            "/v1/captures",
            {"json": {**capture_body("GOOD1", None), "captured_at": "2999-01-01T00:00:00Z"}},
            422,
            "future",
        ),
        (
            "POST",
            "/v1/captures",
            {"json": {**capture_body("GOOD1", None), "metadata": {"x": "y" * 20000}}},
            422,
            "metadata",
        ),
        (
            "POST",
            "/v1/captures",
            {"json": {**capture_body("GOOD1", None), "metadata": [1]}},
            422,
            "metadata",
        ),
        ("POST", "/v1/captures", {"content": BIG}, 413, "larger"),
    ],
)
def test_malformed_request_gets_4xx_with_reason(api, method, path, kwargs, status, needle):
    r = httpx.request(method, api.url + path, timeout=10, **kwargs)
    assert r.status_code == status, r.text
    if needle:
        assert needle in _reason(r)


def test_trigger_of_another_device_and_oversized_declared_body(api):
    tid = _other_trigger(api)
    r = httpx.post(api.url + "/v1/captures", json=capture_body("GOOD1", tid))
    assert r.status_code == 403 and "another device" in _reason(r)
    # a declared Content-Length above the limit is refused before the body is read
    with socket.create_connection(("127.0.0.1", api.port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/captures HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 52428800\r\n\r\n{}"
        )
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    # nothing of the refused uploads reached the captures table
    assert fetch(api.dsn, "SELECT count(*) FROM captures")[0][0] == 0


def test_png_upload_without_trigger_is_stored_once(api):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buf, "PNG")
    body = {**capture_body("GOOD1", None, buf.getvalue())}
    first = httpx.post(api.url + "/v1/captures", json=body).json()
    again = httpx.post(api.url + "/v1/captures", json=body).json()
    assert first["status"] == "uploaded" and again["status"] == "duplicate"
    assert first["record_id"] == again["record_id"]
    assert "trigger_status" not in first
    wait_for(lambda: fetch(api.dsn, "SELECT content_type FROM captures")[0][0] == "image/png")
    assert jpeg_bytes()  # the helper image is a JPEG the API accepts elsewhere
