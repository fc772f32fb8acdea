"""`camfleet up --demo` gives its ownerless MQTT and edge devices to the demo user, so
the demo fleet shows in that user's console (against a real PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from camfleet import db, demo


def _console_devices(dsn: str, user_id: str) -> set[str]:
    since = datetime.now(UTC) - timedelta(days=1)
    with db.transaction(dsn) as conn:
        return {r[0] for r in db.queries.console_fleet(conn, user_id=user_id, since=since)}


def test_demo_devices_are_claimed_for_the_demo_user_and_show_in_its_console(database_url):
    esp32_ids = demo.demo_device_ids()[:-1]
    with db.transaction(database_url) as conn:
        db.queries.devices_create_user(conn, user_id=demo.DEMO_USER, name=None)
        db.queries.devices_create_user(conn, user_id="someone-else", name=None)
        # what ingest does on first contact: rows without an owner
        for device_id in esp32_ids[:2]:
            db.queries.ingest_ensure_device(conn, device_id=device_id)
        db.queries.edge_ensure_device(conn, device_id=demo.EDGE_SERIAL)
        # a listed id somebody already owns is never taken away
        db.queries.ingest_ensure_device(conn, device_id=esp32_ids[2])
        db.queries.devices_assign(conn, device_id=esp32_ids[2], user_id="someone-else")
    assert _console_devices(database_url, demo.DEMO_USER) == set()

    wanted = demo.demo_device_ids() + ["DE0A00FFFFFF"]  # the last one does not exist yet
    settled = demo.claim_demo_devices(database_url, demo.DEMO_USER, wanted)

    assert settled == set(demo.demo_device_ids())  # nothing more to ask about them
    assert _console_devices(database_url, demo.DEMO_USER) == {*esp32_ids[:2], demo.EDGE_SERIAL}
    assert _console_devices(database_url, "someone-else") == {esp32_ids[2]}
    # idempotent: a second call claims nothing new and moves nothing
    assert demo.claim_demo_devices(database_url, demo.DEMO_USER, wanted) == settled
    assert _console_devices(database_url, "someone-else") == {esp32_ids[2]}
