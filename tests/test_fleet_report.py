"""The fleet report aggregates real rows, publishes artifacts and writes its files."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import polars as pl
import psycopg2
import pytest

from flows import fleet_report as fr


@pytest.fixture
def fleet(database_url):
    now = datetime.now(UTC)
    conn = psycopg2.connect(database_url)
    with conn, conn.cursor() as cur:
        cur.execute(
            """INSERT INTO devices (device_id, kind, config, last_seen_at) VALUES
               ('CAM1', 'esp32', %s, now()),
               ('CAM2', 'visant', %s, now() - interval '2 hours'),
               ('CAM3', 'lifelog', '{}', NULL)""",
            [
                json.dumps({"schedule": {"interval_seconds": 600}}),
                json.dumps({"trigger": {"enabled": True, "interval_seconds": 300}}),
            ],
        )
        for i in range(6):
            cur.execute(
                """INSERT INTO captures (device_id, device_capture_id, ingest_status,
                       captured_at, created_at, image_bytes)
                   VALUES (%s, %s, %s, %s, %s, 1000)""",
                [
                    "CAM1" if i < 4 else "CAM2",
                    f"img{i}.jpg",
                    "failed" if i == 3 else "stored",
                    now - timedelta(minutes=10 * i, seconds=2),
                    now - timedelta(minutes=10 * i),
                ],
            )
        cur.execute(
            "INSERT INTO device_errors (device_id, error_code, message) VALUES"
            " ('CAM1', 2201, 'timeout'), ('CAM1', 2203, 'bad jpeg'), ('CAM1', 2201, 'timeout')"
        )
        cur.execute(
            "INSERT INTO device_publish_log (device_id, topic, direction, payload)"
            " VALUES ('CAM1', 'ESP32CAM/CAM1/ack', 'out', %s)",
            [json.dumps({"image_name": "img3.jpg", "missing_chunks": [1, 2, 3]})],
        )
        cur.execute(
            """INSERT INTO scheduled_triggers (trigger_id, device_id, trigger_type, status,
                   scheduled_at)
               VALUES ('t1', 'CAM2', 'scheduled', 'executed', now() - interval '10 min'),
                      ('t2', 'CAM2', 'scheduled', 'expired', now() - interval '5 min'),
                      ('t3', 'CAM2', 'manual', 'sent', now())"""
        )
    conn.close()
    return database_url


def test_report_tables(fleet):
    now = datetime.now(UTC)
    tables = fr.build_report(fr.read_rows(fleet, now - timedelta(days=1)), now)
    captures = (
        tables["captures"].group_by("device_id").agg(pl.col("received", "stored", "failed").sum())
    )
    by_device = {r["device_id"]: r for r in captures.to_dicts()}
    assert (by_device["CAM1"]["received"], by_device["CAM1"]["stored"]) == (4, 3)
    assert by_device["CAM1"]["failed"] == 1 and by_device["CAM2"]["received"] == 2
    assert tables["captures"]["latency_p50_s"].min() == pytest.approx(2.0)
    errors = tables["errors"].filter(pl.col("device_id") == "CAM1").row(0, named=True)
    assert errors["errors"] == 3 and errors["nack_rounds"] == 1
    assert errors["chunks_requested"] == 3 and errors["error_codes"] == "2201×2, 2203×1"
    triggers = tables["triggers"].row(0, named=True)
    assert (triggers["created"], triggers["executed"], triggers["expired"]) == (3, 1, 1)
    # CAM2 expects contact every 300 s and was last seen 2 h ago; CAM3 never was.
    assert tables["silent_devices"]["device_id"].to_list() == ["CAM2", "CAM3"]


def test_report_flow_publishes_artifacts_and_files(fleet, prefect_api_url, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client

    from camfleet.settings import get_settings

    monkeypatch.setenv("DATABASE_URL", fleet)
    get_settings.cache_clear()
    try:
        counts = fr.fleet_report(days=1, out_dir=str(tmp_path))
    finally:
        get_settings.cache_clear()
    assert counts["silent_devices"] == 2
    for name in ("captures", "errors", "triggers", "silent_devices"):
        assert pl.read_parquet(tmp_path / f"{name}.parquet").height == counts[name]
        assert (tmp_path / f"{name}.csv").read_text().count("\n") == counts[name] + 1
    png = (tmp_path / "captures_per_hour.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000

    import anyio

    async def artifact_keys():
        async with get_client() as client:
            artifacts = await client.read_artifacts()
            return {a.key for a in artifacts}

    keys = anyio.run(artifact_keys)
    assert {"fleet-report", "fleet-report-captures", "fleet-report-silent-devices"} <= keys


def test_report_cli_prints_tables(fleet, run_cli, tmp_path):
    result = run_cli(
        ["camfleet", "report", "--days", "1", "--out-dir", str(tmp_path)],
        env={"DATABASE_URL": fleet, "COLUMNS": "200"},
    )
    assert "silent devices" in result.stdout and "CAM3" in result.stdout
    assert (tmp_path / "captures.parquet").exists()


def test_report_names_devices_that_have_a_name(database_url):
    """Lifelog and Visant ids are UUIDs: the report shows the device's name beside the
    start of its id; a device without a name (or named by its id) keeps its id."""
    now = datetime.now(UTC)
    uuid = "3f9c2a1b-0000-4000-8000-000000000001"
    conn = psycopg2.connect(database_url)
    with conn, conn.cursor() as cur:
        cur.execute(
            """INSERT INTO devices (device_id, kind, friendly_name) VALUES
               (%s, 'lifelog', 'garden-cam'), ('ESP01', 'esp32', NULL),
               ('ENTO-1', 'edge', 'ENTO-1')""",
            [uuid],
        )
        for device in (uuid, "ESP01", "ENTO-1"):
            cur.execute(
                "INSERT INTO captures (device_id, device_capture_id, ingest_status)"
                " VALUES (%s, 'a.jpg', 'stored')",
                [device],
            )
        cur.execute(
            "INSERT INTO device_errors (device_id, error_code, message) VALUES (%s, 2201, 'x')",
            [uuid],
        )
    conn.close()
    tables = fr.build_report(fr.read_rows(database_url, now - timedelta(days=1)), now)
    assert set(tables["captures"]["device_id"]) == {"garden-cam (3f9c2a1b)", "ESP01", "ENTO-1"}
    assert tables["errors"]["device_id"].to_list() == ["garden-cam (3f9c2a1b)"]
    assert uuid not in str(tables["silent_devices"]["device_id"].to_list())
