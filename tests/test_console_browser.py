"""The console in real headless Chromium (Debian's package): sign in through the form,
see a thumbnail for every device, open a device page, follow a capture to its full
image and its Prefect flow run link, and another user cannot open either.

The API runs as a real uvicorn server on a loopback port. Screenshots land in
tmp_path; with CAMFLEET_SCREENSHOTS=docs/img they refresh the README's pictures.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from camfleet.localsvc import free_port
from camfleet.storage.local import LocalStore
from services.api.app import create_app
from tests.cdp import Browser, chromium_path
from tests.test_console import RUN_ID, SECRET, add_device, make_user

pytestmark = pytest.mark.skipif(
    chromium_path() is None, reason="chromium not installed (.ci/run installs it)"
)
UI = "http://127.0.0.1:4200"


@pytest.fixture
def server(database_url, tmp_path):
    store = LocalStore(tmp_path / "objects", secret=SECRET)
    keys = {"alice": make_user(database_url, "alice"), "bob": make_user(database_url, "bob")}
    for i, kind in enumerate(("esp32", "edge", "visant", "lifelog", "sftp")):
        add_device(database_url, store, f"ALICE-{kind.upper()}", "alice", kind=kind, captures=2 + i)
    add_device(database_url, store, "BOB-CAM", "bob", captures=1)
    went_silent(database_url, "ALICE-LIFELOG")
    app = create_app(
        database_url=database_url,
        secret_key=SECRET,
        processing_runs=None,
        store=store,
        prefect_ui_url=UI,
    )
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "API did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", keys
    srv.should_exit = True
    thread.join(timeout=10)


def went_silent(dsn: str, device_id: str) -> None:
    """The device's last contact an hour ago, then a fleet-health evaluation: an open
    "silent" incident, as the fleet-health deployment records it."""
    from camfleet import alerts, db

    with db.transaction(dsn) as conn, conn.cursor() as cur:
        for table in ("devices", "captures"):
            column = "last_seen_at" if table == "devices" else "created_at"
            cur.execute(
                f"update {table} set {column} = {column} - interval '1 hour'"  # noqa: S608
                " where device_id = %s",
                (device_id,),
            )
    with db.transaction(dsn) as conn:
        assert alerts.evaluate(conn)[0][0].event == alerts.SILENT


@pytest.fixture
def browser():
    b = Browser()
    yield b
    b.close()


def sign_in(browser: Browser, base: str, key: str) -> None:
    browser.goto(f"{base}/console/login")
    browser.eval(
        f"document.querySelector('input[name=api_key]').value = {key!r};"
        "document.querySelector('form[action=\"/console/login\"]').submit(); true"
    )
    browser.wait_for("location.pathname === '/console/' && document.readyState === 'complete'")


THUMBS_LOADED = (
    "(() => { const t = [...document.querySelectorAll('{sel}')];"
    " return t.length > 0 && t.every(i => i.complete && i.naturalWidth > 0) && t.length; })()"
)


def test_console_in_chromium(server, browser, tmp_path):
    base, keys = server
    shots = Path(os.environ.get("CAMFLEET_SCREENSHOTS") or tmp_path)
    sign_in(browser, base, keys["alice"])
    assert browser.wait_for(THUMBS_LOADED.replace("{sel}", "img.thumb")) == 5  # every kind
    assert "BOB-CAM" not in browser.eval("document.body.innerText")
    alert = "#alerts li[data-device='ALICE-LIFELOG'][data-state='silent']"
    assert "ALICE-LIFELOG name" in browser.eval(f'document.querySelector("{alert}").innerText')
    health = "tr[data-device='ALICE-LIFELOG'] .health"
    assert browser.eval(f'document.querySelector("{health}").textContent') == "silent"
    browser.screenshot(shots / "console-fleet.png")

    browser.eval("document.querySelector('a[href=\"/console/devices/ALICE-SFTP\"]').click(); 1")
    browser.wait_for("location.pathname === '/console/devices/ALICE-SFTP'")
    assert browser.wait_for(THUMBS_LOADED.replace("{sel}", "#captures img")) == 6
    run_link = browser.eval("document.querySelector('a.flow-run').href")
    assert run_link == f"{UI}/runs/flow-run/{RUN_ID}"
    browser.screenshot(shots / "console-device.png")
    image_url = browser.eval("document.querySelector('#captures a').href")
    browser.goto(image_url)
    assert browser.eval("document.contentType") == "image/jpeg"
    assert browser.wait_for("document.images.length && document.images[0].naturalWidth") == 1280

    # Bob, signed in in the same browser, reaches neither the page nor the image.
    browser.goto(f"{base}/console/")
    browser.eval("document.querySelector('header form').submit(); 1")
    browser.wait_for("location.pathname === '/console/login'")
    sign_in(browser, base, keys["bob"])
    assert "ALICE" not in browser.eval("document.body.innerText")
    status = browser.eval(
        f"Promise.all([fetch('/console/devices/ALICE-SFTP'), fetch({image_url!r})])"
        ".then(rs => rs.map(r => r.status))"
    )
    assert status == [404, 404]
