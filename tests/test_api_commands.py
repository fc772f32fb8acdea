"""The device command API end to end: real PostgreSQL, the real API process, SSE."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest

from camfleet.protocol import triggers as core
from tasks import triggers as trig
from tests.test_api_commands_helpers import (
    ApiProcess,
    SseReader,
    add_device,
    capture_body,
    fetch,
    wait_for,
)


@pytest.fixture
def storage_dir(tmp_path):
    d = tmp_path / "objects"
    d.mkdir()
    return d


def test_connect_ping_manual_and_scheduled_trigger_upload_executed(database_url, storage_dir):
    add_device(database_url, "FLOOR1", {"trigger": {"enabled": True, "interval_seconds": 10}})
    with ApiProcess(database_url, storage_dir) as api:
        sse = SseReader(api.url, "FLOOR1")
        try:
            hello = sse.next()
            assert hello["event"] == "connected" and hello["device_id"] == "FLOOR1"
            assert sse.next(skip_pings=False)["event"] == "ping"  # ping interval 0.3 s here

            # presence is visible through the API and last_seen_at is set
            wait_for(
                lambda: (
                    httpx.get(api.url + "/v1/devices/connected").json()["connected_devices"]
                    == ["FLOOR1"]
                )
            )
            assert fetch(database_url, "SELECT last_seen_at FROM devices")[0][0] is not None

            # manual trigger: POST answers "sent" and the stream carries the command
            r = httpx.post(api.url + "/v1/devices/FLOOR1/trigger", timeout=10)
            assert r.status_code == 200, r.text
            manual = r.json()
            assert manual["status"] == "sent"
            cmd = sse.next_command()
            assert cmd == {"cmd": "capture", "trigger_id": manual["trigger_id"], "type": "manual"}

            # scheduled trigger: the scheduler's batch insert for a slot one second ahead
            slot = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
            planned = core.PlannedTrigger(
                core.scheduled_trigger_id("FLOOR1", slot),
                "FLOOR1",
                slot,
                slot + timedelta(seconds=10),
                "scheduled_interval",
            )
            assert trig.insert_planned(database_url, [planned]) == 1
            assert trig.insert_planned(database_url, [planned]) == 0  # idempotent slot
            cmd2 = sse.next_command(timeout=5)
            assert cmd2 == {"cmd": "capture", "trigger_id": planned.trigger_id, "type": "scheduled"}
            assert datetime.now(UTC) >= slot  # delivered when due, not when inserted

            # the device uploads both; each trigger ends executed with the capture linked
            for tid in (manual["trigger_id"], planned.trigger_id):
                r = httpx.post(api.url + "/v1/captures", json=capture_body("FLOOR1", tid))
                assert r.status_code == 201, r.text
                body = r.json()
                assert body["status"] == "uploaded" and body["evaluation_status"] == "pending"
                assert body["record_id"].startswith("cap_")
                state = trig.trigger_state(database_url, tid)
                assert state["status"] == "executed"
                assert state["capture_id"] == body["record_id"]
                assert state["sent_at"] is not None and state["executed_at"] is not None
            # a retried upload is the same capture, not a second one
            r = httpx.post(
                api.url + "/v1/captures", json=capture_body("FLOOR1", planned.trigger_id)
            )
            assert r.status_code == 201 and r.json()["status"] == "duplicate"
            rows = fetch(
                database_url,
                "SELECT storage_path, source, trigger_label FROM captures ORDER BY created_at",
            )
            assert len(rows) == 2
            for path, source, label in rows:
                assert source == "api" and label == "scheduled_interval"
                assert (storage_dir / path).is_file()
                assert path.startswith("captures/FLOOR1/")
        finally:
            sse.close()
        # the stream closed: the device leaves the connected list
        wait_for(
            lambda: httpx.get(api.url + "/v1/devices/connected").json()["connected_devices"] == []
        )


def test_offline_device_gets_pending_trigger_on_reconnect_and_expired_end_expired(
    database_url, storage_dir
):
    add_device(database_url, "CAM2")
    with ApiProcess(database_url, storage_dir) as api:
        r = httpx.post(api.url + "/v1/devices/CAM2/trigger", json={"ttl_seconds": 60})
        assert r.status_code == 200 and r.json()["status"] == "pending"  # nobody streaming
        waiting = r.json()["trigger_id"]
        stale = trig.create_manual(database_url, "CAM2", ttl_seconds=0.2)
        # The stream opens once the stale trigger is past its expiry (the database's clock).
        wait_for(lambda: expired(database_url, stale), timeout=30)
        sse = SseReader(api.url, "CAM2")
        try:
            assert sse.next()["event"] == "connected"
            assert sse.next_command()["trigger_id"] == waiting
            with pytest.raises(AssertionError):
                sse.next_command(timeout=0.8)  # the expired one is never sent
        finally:
            sse.close()
    assert trig.sweep(database_url) == {"expired": [stale], "failed": []}
    assert trig.trigger_state(database_url, stale)["status"] == "expired"
    # sent but never executed -> failed once the execution timeout passed
    assert trig.sweep(database_url, execution_timeout=0) == {"expired": [], "failed": [waiting]}
    state = trig.trigger_state(database_url, waiting)
    assert state["status"] == "failed" and "not executed" in state["failed_reason"]


def test_api_restart_and_second_instance_lose_no_trigger(database_url, storage_dir):
    add_device(database_url, "CAM3")
    a = ApiProcess(database_url, storage_dir).start()
    b = ApiProcess(database_url, storage_dir).start()
    try:
        sse = SseReader(b.url, "CAM3")
        assert sse.next()["event"] == "connected"
        # a trigger made through instance A reaches the stream held by instance B
        r = httpx.post(a.url + "/v1/devices/CAM3/trigger", timeout=10)
        assert r.json()["status"] == "sent"
        assert sse.next_command()["trigger_id"] == r.json()["trigger_id"]
        wait_for(
            lambda: (
                httpx.get(a.url + "/v1/devices/connected").json()["connected_devices"] == ["CAM3"]
            )
        )
        # B dies hard; a trigger created while no API holds the stream waits for it
        b.stop(kill=True)
        sse.close()
        made_while_down = trig.create_manual(database_url, "CAM3", ttl_seconds=120)
        # a killed instance's presence disappears once its heartbeat is stale (or at
        # once when the instance is stopped cleanly, as A is below)
        a.stop()
        assert (
            fetch(database_url, "SELECT count(*) FROM scheduled_triggers WHERE status='pending'")[
                0
            ][0]
            == 1
        )
        a.start()  # "restart": same database, new process
        sse = SseReader(a.url, "CAM3")
        assert sse.next()["event"] == "connected"
        assert sse.next_command()["trigger_id"] == made_while_down
        sse.close()
    finally:
        a.stop()
        b.stop()


def test_device_token_required_when_the_device_has_one(database_url, storage_dir):
    from camfleet import db, tokens
    from tests.test_api_commands_helpers import SECRET

    add_device(database_url, "TOK1")
    add_device(database_url, "TOK2")
    token = tokens.new_device_token()
    with db.transaction(database_url) as conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE devices SET device_token_hash = %s WHERE device_id = 'TOK1'",
            (tokens.hash_device_token(SECRET.encode(), token),),
        )
    with ApiProcess(database_url, storage_dir) as api:
        r = httpx.get(api.url + "/v1/devices/TOK1/commands", timeout=5)
        assert r.status_code == 401 and "X-Device-Token" in r.json()["detail"]["reason"]
        r = httpx.get(
            api.url + "/v1/devices/TOK2/commands", headers={"X-Device-Token": token}, timeout=5
        )
        assert r.status_code == 404  # another device's id: as if it did not exist
        sse = SseReader(api.url, "TOK1", headers={"X-Device-Token": token})
        try:
            assert sse.next()["event"] == "connected"
        finally:
            sse.close()
        body = capture_body("TOK1", None)
        assert httpx.post(api.url + "/v1/captures", json=body).status_code == 401
        r = httpx.post(api.url + "/v1/captures", json=body, headers={"X-Device-Token": token})
        assert r.status_code == 201, r.text

    # without device-id-only mode a device with no token is refused, and so is an
    # operator without an API key
    with ApiProcess(database_url, storage_dir, CAMFLEET_ALLOW_DEVICE_ID_ONLY="false") as api:
        r = httpx.get(api.url + "/v1/devices/TOK2/commands", timeout=5)
        assert r.status_code == 401 and "CAMFLEET_ALLOW_DEVICE_ID_ONLY" in r.text
        assert httpx.post(api.url + "/v1/devices/TOK2/trigger").status_code == 401
        assert httpx.get(api.url + "/v1/devices/connected").status_code == 401


def expired(dsn: str, trigger_id: str) -> bool:
    sql = "SELECT expires_at < now() FROM scheduled_triggers WHERE trigger_id = %s"
    return bool(fetch(dsn, sql, trigger_id)[0][0])


def test_database_restart_stream_recovers_and_trigger_is_delivered(tmp_path, storage_dir):
    """PostgreSQL restarts under a streaming device: LISTEN reconnects, nothing is lost."""
    from camfleet import db
    from camfleet.localsvc import PostgresInstance

    with PostgresInstance(fast=True) as pg:
        dsn = pg.create_database("restart")
        db.migrate(dsn)
        add_device(dsn, "PGR1")
        with ApiProcess(dsn, storage_dir) as api:
            sse = SseReader(api.url, "PGR1")
            try:
                assert sse.next()["event"] == "connected"
                pg.restart()
                tid = trig.create_manual(dsn, "PGR1", ttl_seconds=60)
                # delivered on the open stream (listener reconnected and reloaded) or,
                # if the stream broke with the database, after the device reconnects
                try:
                    cmd = sse.next_command(timeout=8)
                except AssertionError:
                    sse.close()
                    sse = SseReader(api.url, "PGR1")
                    assert sse.next(timeout=10)["event"] == "connected"
                    cmd = sse.next_command(timeout=8)
                assert cmd["trigger_id"] == tid
                r = httpx.post(api.url + "/v1/captures", json=capture_body("PGR1", tid))
                assert r.status_code == 201, r.text
                assert trig.trigger_state(dsn, tid)["status"] == "executed"
            finally:
                sse.close()
