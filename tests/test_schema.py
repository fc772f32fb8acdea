"""The unified schema runs the seeds' own SQL unchanged (seeds 001, 002 and 003)."""

from __future__ import annotations

import json

import psycopg2
import pytest

from camfleet import db

# Seed 002, "Monitoring": the five queries exactly as the seed prints them.
SEED_002_MONITORING = [
    """select device_id, status, pending_count, created_at
from public.device_status
order by created_at desc
limit 20;""",
    """select device_id, device_capture_id, captured_at,
       image_bytes, total_chunks, ingest_status,
       storage_path, created_at
from public.captures
order by created_at desc
limit 20;""",
    """select sr.device_id, sr.temperature_c, sr.humidity_pct,
       sr.pressure_hpa, sr.created_at
from public.sensor_readings sr
order by sr.created_at desc
limit 20;""",
    """select device_id, capture_id, error_code,
       message, details, occurred_at
from public.device_errors
order by occurred_at desc
limit 50;""",
    """select topic, direction,
       payload->>'image_name' as image,
       payload->>'chunk_id' as chunk,
       received_at
from public.device_publish_log
order by received_at desc
limit 50;""",
]

# Seed 003, "Recommended Indexes" and "Trigger Cleanup", verbatim.
SEED_003_INDEXES = """CREATE INDEX idx_devices_status ON devices(status);
CREATE INDEX idx_scheduled_triggers_status ON scheduled_triggers(status);
CREATE INDEX idx_scheduled_triggers_device ON scheduled_triggers(device_id);
CREATE INDEX idx_captures_device ON captures(device_id);
CREATE INDEX idx_captures_evaluation_status ON captures(evaluation_status);"""

SEED_003_CLEANUP = """DELETE FROM scheduled_triggers
WHERE status = 'executed'
  AND executed_at < NOW() - INTERVAL '7 days';"""


@pytest.fixture
def conn(database_url):
    connection = psycopg2.connect(database_url)
    yield connection
    connection.close()


def _seed_rows(cur) -> None:
    cur.execute("INSERT INTO devices (device_id) VALUES ('AABBCCDDEEFF')")
    cur.execute(
        """INSERT INTO captures (record_id, device_id, device_capture_id, image_bytes,
               total_chunks, ingest_status, storage_path)
           VALUES ('cap_1', 'AABBCCDDEEFF', 'image_123.jpg', 45678, 45, 'stored', 'k')"""
    )
    cur.execute(
        "INSERT INTO sensor_readings (device_id, capture_id, temperature_c, humidity_pct,"
        " pressure_hpa) VALUES ('AABBCCDDEEFF', 'cap_1', 23.5, 45.2, 1013.25)"
    )
    cur.execute(
        "INSERT INTO device_status (device_id, status, pending_count)"
        " VALUES ('AABBCCDDEEFF', 'Alive', 3)"
    )
    cur.execute(
        "INSERT INTO device_errors (device_id, capture_id, error_code, message, details)"
        " VALUES ('AABBCCDDEEFF', 'image_123.jpg', 2201, 'Assembly timeout', %s)",
        [json.dumps({"missing_chunks": [5]})],
    )
    cur.execute(
        "INSERT INTO device_publish_log (device_id, topic, direction, payload)"
        " VALUES ('AABBCCDDEEFF', 'ESP32CAM/AABBCCDDEEFF/data', 'in', %s)",
        [json.dumps({"image_name": "image_123.jpg", "chunk_id": 7})],
    )


def test_migrate_is_idempotent(database_url):
    assert db.migrate(database_url) == []  # the template already has everything
    assert db.pending_migrations(database_url) == []


def test_seed_002_monitoring_queries_run_unchanged(conn):
    with conn, conn.cursor() as cur:
        _seed_rows(cur)
        results = []
        for query in SEED_002_MONITORING:
            cur.execute(query)
            results.append(cur.fetchall())
    assert results[0][0][:3] == ("AABBCCDDEEFF", "Alive", 3)
    assert results[1][0][:7] == ("AABBCCDDEEFF", "image_123.jpg", None, 45678, 45, "stored", "k")
    assert results[2][0][1:4] == (23.5, 45.2, 1013.25)
    assert results[3][0][2] == 2201 and results[3][0][4] == {"missing_chunks": [5]}
    assert results[4][0][:4] == ("ESP32CAM/AABBCCDDEEFF/data", "in", "image_123.jpg", "7")


def test_named_monitoring_queries_match_the_seed(conn):
    with conn, conn.cursor() as cur:
        _seed_rows(cur)
    assert list(db.queries.recent_device_status(conn))[0][:3] == ("AABBCCDDEEFF", "Alive", 3)
    assert db.queries.stack_counts(conn) == (1, 1, 1, 0, 0, 1)


def test_seed_003_indexes_and_trigger_cleanup_run_unchanged(conn):
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO devices (device_id, kind) VALUES ('FLOOR1', 'visant')")
        cur.execute(
            """INSERT INTO scheduled_triggers (trigger_id, device_id, trigger_type, status,
                   scheduled_at, executed_at)
               VALUES ('old', 'FLOOR1', 'scheduled', 'executed', now() - interval '9 days',
                       now() - interval '8 days'),
                      ('new', 'FLOOR1', 'manual', 'executed', now(), now()),
                      ('open', 'FLOOR1', 'manual', 'pending', now(), NULL)"""
        )
        for statement in SEED_003_INDEXES.splitlines():
            cur.execute(statement)
        cur.execute(SEED_003_CLEANUP)
        assert cur.rowcount == 1
        cur.execute("SELECT trigger_id FROM scheduled_triggers ORDER BY trigger_id")
        assert [r[0] for r in cur.fetchall()] == ["new", "open"]


def test_seed_001_event_phases(conn):
    """Module C: INSERT 'pending' with NULL remote paths, then UPDATE 'completed'."""
    metadata = {"eventId": "evt_0001", "species": "fox", "duration_s": 12}
    with conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO events (event_id, metadata, status) VALUES (%s, %s, 'pending')",
            ["evt_0001", json.dumps(metadata)],
        )
        cur.execute("SELECT status, remote_video_path, remote_json_path FROM events")
        assert cur.fetchone() == ("pending", None, None)
        cur.execute(
            "UPDATE events SET status = 'completed', remote_video_path = %s,"
            " remote_json_path = %s WHERE event_id = %s",
            ["/srv/videos/evt_0001.mp4", "/srv/json/evt_0001.json", "evt_0001"],
        )
        assert cur.rowcount == 1
        cur.execute("SELECT status, remote_video_path, metadata FROM events")
        assert cur.fetchone() == ("completed", "/srv/videos/evt_0001.mp4", metadata)


def test_resent_image_and_repeated_seq_are_one_capture(conn):
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO devices (device_id) VALUES ('D1')")
        cur.execute("INSERT INTO captures (device_id, device_capture_id) VALUES ('D1', 'a.jpg')")
        cur.execute(
            "INSERT INTO captures (device_id, device_capture_id) VALUES ('D1', 'a.jpg')"
            " ON CONFLICT DO NOTHING"
        )
        assert cur.rowcount == 0
        cur.execute("INSERT INTO captures (device_id, seq, source) VALUES ('D1', 7, 'lifelog')")
        with pytest.raises(psycopg2.errors.UniqueViolation):
            cur.execute("INSERT INTO captures (device_id, seq, source) VALUES ('D1', 7, 'lifelog')")
