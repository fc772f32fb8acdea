"""The web console against a real PostgreSQL and the real app (issue 16).

Sign-in with a user key, CSRF refusal, one user never reaching another's devices or
pictures, thumbnails made once with Pillow and stored beside the object, config edits,
and /metrics counting requests.
"""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from camfleet import db, tokens
from camfleet.storage.local import LocalStore
from services.api.app import create_app
from services.api.console import config_patch, fleet_rows, sensor_charts
from services.api.console.fleet_table import rows_html
from services.api.console.thumbnails import THUMB_SIZE, thumbnail_key

SECRET = b"test-console-secret-0123456789abcdef"
UI = "http://127.0.0.1:4200"
RUN_ID = "0b6f7c1e-2a1f-4c59-9a43-111122223333"


def jpeg(width=1280, height=960, seed=0) -> bytes:
    """A small landscape (sky gradient, sun, ground), different for every seed."""
    from PIL import ImageDraw, ImageOps

    sky = ((40 + seed * 37) % 200, 90, 160 + seed * 11 % 90)
    img = ImageOps.colorize(
        Image.linear_gradient("L").resize((width, height)), black=sky, white=(235, 225, 200)
    )
    draw = ImageDraw.Draw(img)
    x = 200 + (seed * 173) % (width - 400)
    draw.ellipse((x, 150, x + 160, 310), fill=(250, 200, 60))
    draw.rectangle((0, height * 2 // 3, width, height), fill=(60, 110 + seed * 23 % 80, 50))
    out = io.BytesIO()
    img.save(out, "JPEG")
    return out.getvalue()


def make_user(dsn: str, user_id: str) -> str:
    key = tokens.new_user_key()
    with db.transaction(dsn) as conn:
        db.queries.devices_create_user(conn, user_id=user_id, name=user_id)
        db.queries.devices_create_user_key(
            conn, user_id=user_id, key_hash=tokens.hash_user_key(SECRET, key), label="t"
        )
    return key


def add_device(dsn, store, device_id, user_id, kind="esp32", captures=1, interval=60):
    now = datetime.now(UTC)
    with db.transaction(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "insert into devices (device_id, kind, user_id, friendly_name, config, last_seen_at)"
            " values (%s, %s, %s, %s, %s, %s)",
            (
                device_id,
                kind,
                user_id,
                f"{device_id} name",
                {"schedule": {"interval_seconds": interval}},
                now,
            ),
        )
        for i in range(captures):
            key = f"{device_id}/cap{i}.jpg"
            store.put(key, jpeg(seed=sum(map(ord, device_id)) + i), content_type="image/jpeg")
            cur.execute(
                "insert into captures (record_id, device_id, device_capture_id, ingest_status,"
                " storage_path, content_type, flow_run_id, created_at)"
                " values (%s, %s, %s, 'stored', %s, 'text/html', %s, %s)",
                (
                    f"cap_{device_id}_{i}",
                    device_id,
                    f"n{i}",
                    key,
                    RUN_ID,
                    now - timedelta(seconds=i),
                ),
            )
            cur.execute(
                "insert into sensor_readings (device_id, capture_id, temperature_c,"
                " humidity_pct, recorded_at) values (%s, %s, %s, %s, %s)",
                (device_id, f"cap_{device_id}_{i}", 20 + i, 40 + i, now - timedelta(seconds=i)),
            )
        cur.execute(
            "insert into device_errors (device_id, error_code, message) values (%s, 2203, %s)",
            (device_id, "<script>alert(1)</script>"),
        )


@pytest.fixture
def console(database_url, tmp_path):
    store = LocalStore(tmp_path / "objects", public_url="http://testserver", secret=SECRET)
    app = create_app(
        database_url=database_url,
        secret_key=SECRET,
        processing_runs=None,
        store=store,
        prefect_ui_url=UI,
    )
    with TestClient(app) as c:
        c.store, c.dsn = store, database_url
        c.alice_key = make_user(database_url, "alice")
        c.bob_key = make_user(database_url, "bob")
        add_device(database_url, store, "ALICE-CAM", "alice", captures=3)
        add_device(database_url, store, "ALICE-EDGE", "alice", kind="edge", captures=1)
        add_device(database_url, store, "BOB-CAM", "bob", captures=1)
        yield c


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def sign_in(client: TestClient, key: str):
    page = client.get("/console/login")
    assert page.status_code == 200
    r = client.post(
        "/console/login",
        data={"api_key": key, "csrf": csrf_of(page.text)},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    return r


def test_pages_need_sign_in(console):
    r = console.get("/console/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/console/login"
    assert console.get("/console/captures/cap_ALICE-CAM_0/thumb").status_code == 401
    assert console.get("/console/captures/cap_ALICE-CAM_0/image").status_code == 401


def test_wrong_key_and_forged_cookie_refused(console):
    page = console.get("/console/login")
    r = console.post(
        "/console/login", data={"api_key": "cfuk_" + "x" * 43, "csrf": csrf_of(page.text)}
    )
    assert r.status_code == 401 and "Unknown or revoked" in r.text
    console.cookies.set("camfleet_console", "eyJrIjoiMSJ9.forged.sig", path="/console")
    assert console.get("/console/", follow_redirects=False).status_code == 303


def test_login_without_csrf_refused(console):
    console.get("/console/login")
    r = console.post("/console/login", data={"api_key": console.alice_key, "csrf": "guess"})
    assert r.status_code == 403
    r = console.post("/console/login", data={"api_key": console.alice_key})
    assert r.status_code == 403


def test_fleet_page_shows_own_devices_only(console):
    sign_in(console, console.alice_key)
    r = console.get("/console/")
    assert r.status_code == 200
    assert "ALICE-CAM" in r.text and "ALICE-EDGE" in r.text
    assert "BOB-CAM" not in r.text
    assert "/console/captures/cap_ALICE-CAM_0/thumb" in r.text  # newest capture
    assert "nonce-" in r.headers["content-security-policy"]
    rows = console.get("/console/fleet/rows", params={"kind": "edge"})
    assert "ALICE-EDGE" in rows.text and "ALICE-CAM" not in rows.text
    rows = console.get("/console/fleet/rows", params={"health_state": "silent"})
    assert "No devices match" in rows.text


def _alert_items(html: str) -> list[tuple[str, str]]:
    """(device id, state) of every alert the page lists, in order."""
    return re.findall(
        r'<li class="alert [^"]*" data-alert="\d+" data-device="([^"]+)"[^>]*data-state="(\w+)"',
        html,
    )


def test_alerts_show_silent_then_back_to_the_owner_only(console):
    """The fleet-health flow's incidents (camfleet/alerts.py) are what the console lists:
    "silent" while open, "back" once resolved; on the fleet page, its refreshed fragment
    and the device page. Another user sees none of them."""
    from camfleet import alerts

    def set_seen(device_id, ago_s):
        with db.transaction(console.dsn) as conn, conn.cursor() as cur:
            cur.execute(
                "update devices set last_seen_at = %s where device_id = %s",
                (datetime.now(UTC) - timedelta(seconds=ago_s), device_id),
            )

    def evaluate():
        with db.transaction(console.dsn) as conn:
            return [(t.event, t.device_id) for t in alerts.evaluate(conn)[0]]

    # Captures just stored count as contact too: push them back with last_seen.
    with db.transaction(console.dsn) as conn, conn.cursor() as cur:
        cur.execute("update captures set created_at = created_at - interval '1 hour'")
    set_seen("ALICE-CAM", 0)
    set_seen("ALICE-EDGE", 0)
    set_seen("BOB-CAM", 0)
    assert evaluate() == []
    sign_in(console, console.alice_key)
    assert _alert_items(console.get("/console/").text) == []
    assert "No alerts" in console.get("/console/fleet/alerts").text

    set_seen("ALICE-CAM", 600)  # 10 intervals of 60 s
    set_seen("BOB-CAM", 600)
    assert sorted(evaluate()) == [(alerts.SILENT, "ALICE-CAM"), (alerts.SILENT, "BOB-CAM")]
    assert _alert_items(console.get("/console/").text) == [("ALICE-CAM", "silent")]
    assert _alert_items(console.get("/console/fleet/alerts").text) == [("ALICE-CAM", "silent")]
    assert _alert_items(console.get("/console/devices/ALICE-CAM").text) == [("ALICE-CAM", "silent")]
    assert _alert_items(console.get("/console/devices/ALICE-EDGE").text) == []

    set_seen("ALICE-CAM", 0)
    assert evaluate() == [(alerts.BACK, "ALICE-CAM")]
    assert _alert_items(console.get("/console/fleet/alerts").text) == [("ALICE-CAM", "back")]

    console.cookies.clear()
    sign_in(console, console.bob_key)
    assert _alert_items(console.get("/console/fleet/alerts").text) == [("BOB-CAM", "silent")]


def test_other_users_device_and_images_are_404(console):
    sign_in(console, console.alice_key)
    assert console.get("/console/devices/BOB-CAM").status_code == 404
    assert console.get("/console/captures/cap_BOB-CAM_0/thumb").status_code == 404
    assert console.get("/console/captures/cap_BOB-CAM_0/image").status_code == 404
    assert console.get("/console/devices/..%2F..%2Fetc").status_code == 404
    csrf = csrf_of(console.get("/console/").text)
    r = console.post(
        "/console/devices/BOB-CAM/config",
        data={"csrf": csrf, "schedule_interval_seconds": "5"},
        follow_redirects=False,
    )
    assert r.status_code == 404


def test_device_page_thumbnail_made_once_and_full_image(console):
    sign_in(console, console.alice_key)
    page = console.get("/console/devices/ALICE-CAM")
    assert page.status_code == 200
    assert page.text.count("/thumb") == 3
    assert "Invalid JPEG signature" in page.text  # error code meaning
    assert "&lt;script&gt;" in page.text and "<script>alert" not in page.text
    assert f"/runs/flow-run/{RUN_ID}" in page.text
    assert "<polyline" in page.text  # temperature chart
    thumb_key = thumbnail_key("ALICE-CAM/cap0.jpg")
    assert console.store.head(thumb_key) is None
    r = console.get("/console/captures/cap_ALICE-CAM_0/thumb")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(r.content)) as img:
        assert img.width <= THUMB_SIZE[0] and img.height <= THUMB_SIZE[1]
    stored = console.store.head(thumb_key)
    assert stored is not None and stored.size == len(r.content)
    mtime = (console.store.root / thumb_key).stat().st_mtime_ns
    assert console.get("/console/captures/cap_ALICE-CAM_0/thumb").content == r.content
    assert (console.store.root / thumb_key).stat().st_mtime_ns == mtime  # not remade
    full = console.get("/console/captures/cap_ALICE-CAM_0/image")
    assert full.status_code == 200 and full.content == console.store.get("ALICE-CAM/cap0.jpg")
    assert full.headers["content-type"] == "image/jpeg"  # the stored 'text/html' is not served


def test_config_edit_needs_csrf_and_validates(console):
    sign_in(console, console.alice_key)
    url = "/console/devices/ALICE-CAM/config"
    form = {
        "schedule_interval_seconds": "120",
        "trigger_enabled": "on",
        "trigger_cron": "*/5 * * * *",
    }
    assert console.post(url, data=form, follow_redirects=False).status_code == 403
    csrf = csrf_of(console.get("/console/devices/ALICE-CAM").text)
    r = console.post(url, data=form | {"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 303
    bad = console.post(url, data=form | {"csrf": csrf, "trigger_cron": "nope"})
    assert bad.status_code == 422
    with db.transaction(console.dsn) as conn, conn.cursor() as cur:
        cur.execute("select config from devices where device_id = 'ALICE-CAM'")
        config = cur.fetchone()[0]
    assert config["schedule"] == {"interval_seconds": 120}
    assert config["trigger"] == {"enabled": True, "cron": "*/5 * * * *"}


def test_logout_and_revoked_key_end_session(console):
    sign_in(console, console.alice_key)
    csrf = csrf_of(console.get("/console/").text)
    assert console.post("/console/logout", data={"csrf": "x"}).status_code == 403
    with db.transaction(console.dsn) as conn:
        db.queries.devices_revoke_user_keys(conn, user_id="alice")
    assert console.get("/console/", follow_redirects=False).status_code == 303
    assert csrf  # the session cookie outlived nothing: the key's revocation ended it


def test_metrics_count_requests(console):
    console.get("/health")
    r = console.get("/metrics")
    assert r.status_code == 200
    assert 'camfleet_api_requests_total{method="GET",route="/health",status="200"}' in r.text
    assert "process_resident_memory_bytes" in r.text


def test_config_patch_and_health_helpers():
    with pytest.raises(Exception, match="interval"):
        config_patch({}, "", "on", "", "")  # enabled without interval or cron
    patch = config_patch({"trigger": {"label": "x"}, "schedule": {}}, "60", "", "30", "")
    assert patch == {
        "trigger": {"label": "x", "enabled": False, "interval_seconds": 30},
        "schedule": {"interval_seconds": 60},
    }
    seen = datetime(2026, 12, 3, 7, 0, 5, 123456, tzinfo=UTC)
    row = {
        "device_id": "cam 1/a",
        "kind": "esp32",
        "friendly_name": None,
        "interval_seconds": 60,
        "last_seen_at": seen,
        "latest_capture_at": None,
        "latest_record_id": "rec/1",
        "errors_today": 2,
        "captures_today": 0,
        "failures_today": 1,
        "triggers_ended": 4,
        "triggers_executed": 3,
    }
    (out,) = fleet_rows([row], seen + timedelta(seconds=200))
    assert out.health == "silent" and out.success_rate == 0.75 and out.success_text == "75%"
    assert (out.name, out.device_href, out.thumb_href) == ("cam 1/a", "cam%201%2Fa", "rec%2F1")
    assert out.last_contact_text == "2026-12-03 07:00:05" and out.failures_today == 3
    assert out.last_contact_iso == seen.isoformat()


def test_fleet_table_escapes_what_devices_and_users_named():
    """The fleet rows are written in Python (fleet_table.py), not by the template: a
    name, id or kind from the database is escaped there as autoescape would."""
    now = datetime.now(UTC)
    row = {
        "device_id": 'cam"1',
        "kind": "<b>esp32</b>",
        "friendly_name": "<script>alert(1)</script>",
        "interval_seconds": 60,
        "last_seen_at": now,
        "latest_capture_at": None,
        "latest_record_id": None,
        "errors_today": 0,
        "captures_today": 0,
        "failures_today": 0,
        "triggers_ended": 0,
        "triggers_executed": 0,
    }
    html = str(rows_html(fleet_rows([row], now)))
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert 'data-device="cam&#34;1"' in html and "&lt;b&gt;esp32&lt;/b&gt;" in html
    assert 'href="/console/devices/cam%221"' in html and "no capture" in html
    assert "No devices match." in str(rows_html([]))
    assert sensor_charts([]) == []


def test_images_revalidate_so_a_shared_browser_never_shows_them_to_another_user(console):
    sign_in(console, console.alice_key)
    r = console.get("/console/captures/cap_ALICE-CAM_0/thumb")
    assert r.headers["cache-control"] == "private, no-cache"
    etag = r.headers["etag"]
    again = console.get("/console/captures/cap_ALICE-CAM_0/thumb", headers={"If-None-Match": etag})
    assert again.status_code == 304
    console.cookies.clear()
    sign_in(console, console.bob_key)
    other = console.get("/console/captures/cap_ALICE-CAM_0/thumb", headers={"If-None-Match": etag})
    assert other.status_code == 404


def test_hostile_query_parameters(console):
    sign_in(console, console.alice_key)
    assert (
        console.get("/console/devices/ALICE-CAM", params={"before": "x'; drop"}).status_code == 400
    )
    page = console.get("/console/devices/ALICE-CAM", params={"before": "2000-01-01T00:00:00"})
    assert page.status_code == 200 and "No captures yet" in page.text
    for params in ({"sort": "device_id; --"}, {"kind": "<b>"}, {"health_state": "../"}):
        r = console.get("/console/", params=params)
        assert r.status_code == 200 and "ALICE-CAM" in r.text and "<b>" not in r.text
    assert console.get("/console/captures/" + "x" * 300 + "/thumb").status_code == 404
