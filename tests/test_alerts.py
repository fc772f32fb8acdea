"""Fleet alerts: incidents fire once and resolve (real PostgreSQL), and the Prefect
automations turn the fleet-health flow's events into webhook notifications on a real
Prefect server, delivered to a local webhook receiver."""

from __future__ import annotations

import json
import queue
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anyio
import pytest

from camfleet import alerts, db
from deployments.alerts import RULES, ensure_alert_automations, list_alert_automations

# How long a notification may take: the automation services poll in seconds; on a
# loaded 2-core machine give them a minute. Never a fixed sleep: we wait for the POST.
NOTIFY_TIMEOUT_S = 90


def add_device(dsn, device_id, interval=60, seen_ago=0.0):
    with db.transaction(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "insert into devices (device_id, kind, friendly_name, config, last_seen_at)"
            " values (%s, 'esp32', %s, %s, %s)",
            (
                device_id,
                f"{device_id} name",
                {"schedule": {"interval_seconds": interval}},
                datetime.now(UTC) - timedelta(seconds=seen_ago),
            ),
        )


def set_seen(dsn, device_id, seen_ago):
    with db.transaction(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "update devices set last_seen_at = %s where device_id = %s",
            (datetime.now(UTC) - timedelta(seconds=seen_ago), device_id),
        )


def evaluate(dsn, now=None):
    with db.transaction(dsn) as conn:
        return [(t.event, t.device_id) for t in alerts.evaluate(conn, now)[0]]


def test_silent_fires_once_and_back_resolves(database_url):
    add_device(database_url, "CAM-A", interval=60, seen_ago=10)
    add_device(database_url, "CAM-B", interval=60, seen_ago=121)  # > 2 intervals
    assert evaluate(database_url) == [(alerts.SILENT, "CAM-B")]
    assert evaluate(database_url) == []  # still silent: no second alert
    set_seen(database_url, "CAM-B", 0)
    assert evaluate(database_url) == [(alerts.BACK, "CAM-B")]
    assert evaluate(database_url) == []
    set_seen(database_url, "CAM-B", 500)
    assert evaluate(database_url) == [(alerts.SILENT, "CAM-B")]  # a new incident
    with db.transaction(database_url) as conn, conn.cursor() as cur:
        cur.execute("select count(*), count(resolved_at) from device_alerts")
        assert cur.fetchone() == (2, 1)


def test_erroring_opens_and_recovers(database_url):
    add_device(database_url, "CAM-E", interval=60, seen_ago=0)
    with db.transaction(database_url) as conn, conn.cursor() as cur:
        for _ in range(4):
            cur.execute(
                "insert into device_errors (device_id, error_code, message)"
                " values ('CAM-E', 2201, 'timeout')"
            )
    assert evaluate(database_url) == [(alerts.ERRORING, "CAM-E")]
    assert evaluate(database_url) == []
    later = datetime.now(UTC) + timedelta(hours=2)  # errors out of the window
    set_seen(database_url, "CAM-E", -7200)
    assert evaluate(database_url, later) == [(alerts.RECOVERED, "CAM-E")]


class Receiver:
    """A local webhook endpoint: every POST body (JSON) lands in .posts."""

    def __init__(self):
        posts: queue.Queue = queue.Queue()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                posts.put(json.loads(body or b"{}"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.posts = posts
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, marker: str) -> dict:
        while True:
            post = self.posts.get(timeout=NOTIFY_TIMEOUT_S)
            if marker in post.get("body", ""):
                return post

    def close(self):
        self.server.shutdown()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def _with_client(fn):
    from prefect.client.orchestration import get_client

    async def run():
        async with get_client() as client:
            return await fn(client)

    return anyio.run(run)


def test_automations_created_once_and_notify(prefect_api_url, database_url, receiver, monkeypatch):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.events.worker import EventsWorker

    from camfleet.settings import get_settings
    from flows.fleet_health import fleet_health

    async def clean(client):
        for a in await list_alert_automations(client):
            await client.delete_automation(a.id)

    _with_client(clean)
    CustomWebhookNotificationBlock(
        name="camfleet alerts",
        url=receiver.url,
        method="POST",
        json_data={"subject": "{{subject}}", "body": "{{body}}"},
    ).save("camfleet-alerts-test", overwrite=True)
    assert len(_with_client(ensure_alert_automations)) == len(RULES)
    assert _with_client(ensure_alert_automations) == []  # idempotent
    assert len(_with_client(list_alert_automations)) == len(RULES)

    monkeypatch.setenv("DATABASE_URL", database_url)
    # Devices only: no services (a `camfleet up` running here would be found otherwise).
    monkeypatch.setenv("CAMFLEET_SERVICE_URLS", "{}")
    get_settings.cache_clear()
    try:
        add_device(database_url, "CAM-S", interval=60, seen_ago=300)
        result = fleet_health()
        assert result["transitions"] == [(alerts.SILENT, "CAM-S")]
        assert fleet_health()["transitions"] == []  # one notification per incident
        EventsWorker.drain_all()
        silent = receiver.wait_for("[camfleet.device.silent]")
        assert "CAM-S name" in silent["subject"] and "is silent" in silent["subject"]

        set_seen(database_url, "CAM-S", 0)
        assert fleet_health()["transitions"] == [(alerts.BACK, "CAM-S")]
        EventsWorker.drain_all()
        back = receiver.wait_for("[camfleet.device.back]")
        assert "is back" in back["subject"]
    finally:
        get_settings.cache_clear()
    # Exactly one of each: nothing else for this device arrived meanwhile.
    rest = []
    while not receiver.posts.empty():
        rest.append(receiver.posts.get_nowait())
    assert not [p for p in rest if "CAM-S" in p.get("subject", "")]


class Ready:
    """A readiness endpoint on a loopback port: 200 while .ready, else 503."""

    def __init__(self):
        state = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if state.ready else 503)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.ready = True
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/ready"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_service_incident_opens_once_and_resolves(database_url):
    checked = {"api": "http://127.0.0.1:1/health", "signer": "http://127.0.0.1:2/ready"}

    def run(down):
        with db.transaction(database_url) as conn:
            return [(t.event, t.device_id) for t in alerts.evaluate_services(conn, checked, down)]

    assert run({}) == []
    assert run({"signer": "ConnectError"}) == [(alerts.SERVICE_NOT_READY, "signer")]
    assert run({"signer": "ConnectError"}) == []  # still down: no second alert
    assert run({}) == [(alerts.SERVICE_READY, "signer")]
    assert run({}) == []


def test_fleet_health_checks_the_services_up_started_by_default(
    prefect_api_url, database_url, monkeypatch
):
    """No service_urls given (the fleet-health deployment passes none): the flow checks
    the readiness URLs `camfleet up` handed its children in CAMFLEET_SERVICE_URLS; one
    incident while a service is not ready, resolved when it is."""
    from camfleet.settings import get_settings
    from flows import fleet_health as fh

    api, signer = Ready(), Ready()
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv(fh.SERVICE_URLS_ENV, json.dumps({"api": api.url, "signer": signer.url}))
    monkeypatch.setattr(fh, "CHECK_RETRY_S", 0.05)
    get_settings.cache_clear()
    try:
        first = fh.fleet_health()
        assert first["services_checked"] == ["api", "signer"] and first["services_down"] == []
        signer.ready = False
        down = fh.fleet_health()
        assert down["services_down"] == ["signer"]
        assert down["transitions"] == [(alerts.SERVICE_NOT_READY, "signer")]
        assert fh.fleet_health()["transitions"] == []  # one alert per incident
        signer.ready = True
        assert fh.fleet_health()["transitions"] == [(alerts.SERVICE_READY, "signer")]
        api.close()  # gone entirely: nothing listens any more
        assert fh.fleet_health()["transitions"] == [(alerts.SERVICE_NOT_READY, "api")]
        # Given explicitly, service_urls wins; {} checks nothing.
        assert fh.fleet_health(service_urls={})["services_checked"] == []
    finally:
        get_settings.cache_clear()
        signer.close()


def test_default_service_urls_from_up_and_refusing_nonsense(monkeypatch, tmp_path):
    from flows.fleet_health import SERVICE_URLS_ENV, default_service_urls

    monkeypatch.setenv("CAMFLEET_DATA_DIR", str(tmp_path))  # no running stack here
    monkeypatch.delenv(SERVICE_URLS_ENV, raising=False)
    assert default_service_urls() == {}
    monkeypatch.setenv(SERVICE_URLS_ENV, '{"api": "http://127.0.0.1:8000/health"}')
    assert default_service_urls() == {"api": "http://127.0.0.1:8000/health"}
    monkeypatch.setenv(SERVICE_URLS_ENV, "")  # set empty: none
    assert default_service_urls() == {}
    for bad in ("[1]", "{nope"):
        monkeypatch.setenv(SERVICE_URLS_ENV, bad)
        with pytest.raises(ValueError):
            default_service_urls()


def test_alerts_list_shows_service_incidents_beside_device_ones(
    prefect_api_url, database_url, monkeypatch
):
    """`camfleet alerts list`: a service that stopped answering is listed with the silent
    camera, each marked open until it resolves."""
    from typer.testing import CliRunner

    from camfleet.cli import app
    from camfleet.commands.alerts import recent_incidents
    from camfleet.settings import get_settings

    add_device(database_url, "CAM-LIST", interval=60, seen_ago=500)
    assert evaluate(database_url) == [(alerts.SILENT, "CAM-LIST")]
    signer = {"signer": "http://127.0.0.1:2/ready"}
    with db.transaction(database_url) as conn:
        alerts.evaluate_services(conn, signer, {"signer": "ConnectError"})
    with db.transaction(database_url) as conn:
        rows = recent_incidents(conn, 10)
    assert [r[:3] + r[4:] for r in rows] == [
        ("service", "signer", "not-ready", "open"),  # newest first
        ("device", "CAM-LIST", "silent", "open"),
    ]

    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.delenv("CAMFLEET_DATABASE_BLOCK", raising=False)
    get_settings.cache_clear()

    def listed() -> dict[str, list[str]]:
        get_settings.cache_clear()
        out = CliRunner().invoke(app, ["alerts", "list"], env={"COLUMNS": "300"})
        assert out.exit_code == 0, out.output
        incidents = out.output.split("recent incidents", 1)[1]
        return {
            cells[1]: cells
            for line in incidents.splitlines()
            if len(cells := [c.strip() for c in line.strip("│┃ ").split("│")]) == 5
        }

    try:
        shown = listed()
        assert shown["signer"][0] == "service" and shown["signer"][2] == "not-ready"
        assert shown["signer"][4] == "open"
        assert shown["CAM-LIST"][0] == "device" and shown["CAM-LIST"][4] == "open"
        with db.transaction(database_url) as conn:  # the signer answers again
            alerts.evaluate_services(conn, signer, {})
        shown = listed()
        assert shown["signer"][4] != "open" and shown["CAM-LIST"][4] == "open"
    finally:
        get_settings.cache_clear()
