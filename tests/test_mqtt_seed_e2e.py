"""Seed 002's own `mosquitto_pub` walkthrough against the real `camfleet assembler` process."""

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from camfleet import db

SEED_METADATA = (
    '{"device_id":"TESTMAC123","image_name":"test.jpg","image_size":4,"max_chunks_size":2,'
    '"total_chunk_count":2,"temperature":25.1,"humidity":45.0,"pressure":1010.2,'
    '"capture_timeStamp":"2025-10-04T12:00:00Z"}'
)
SEED_CHUNK0 = (
    '{"device_id":"TESTMAC123","image_name":"test.jpg","chunk_id":0,"max_chunk_size":1024,'
    '"payload":"/9g="}'
)
SEED_CHUNK1 = (
    '{"device_id":"TESTMAC123","image_name":"test.jpg","chunk_id":1,"max_chunk_size":1024,'
    '"payload":"/9k="}'
)


def start_assembler(broker, database_url, storage_dir, extra_env=None, args=()):
    env = {
        **os.environ,
        "MQTT_HOST": broker.host,
        "MQTT_PORT": str(broker.port),
        "DATABASE_URL": database_url,
        "STORAGE_URL": f"file://{storage_dir}",
        "MQTT_CLIENT_ID": f"asm-{uuid.uuid4().hex[:8]}",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "camfleet.cli", "assembler", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines = []
    end = time.monotonic() + 60
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Worker started" in line:
            proc.banner = "".join(lines)
            return proc
    proc.kill()
    raise AssertionError("assembler did not start:\n" + "".join(lines))


def stop_assembler(proc, timeout=60):
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


def test_seed_mosquitto_pub_commands_get_ack_ok_and_a_stored_row(
    mosquitto, database_url, prefect_api_url, tmp_path
):
    proc = start_assembler(mosquitto, database_url, tmp_path / "objects")
    try:
        assert "MQTT Broker: 127.0.0.1" in proc.banner
        assert "ESP32CAM/+/data" in proc.banner
        # -d logs the broker's SUBACK: from then on the ACK cannot be missed. stdbuf: a
        # pipe would otherwise hold that line in mosquitto_sub's buffer until it exits.
        sub = subprocess.Popen(
            ["stdbuf", "-oL", "mosquitto_sub", "-h", mosquitto.host, "-p", str(mosquitto.port),
             "-d", "-t", "ESP32CAM/TESTMAC123/ack", "-C", "1", "-W", "60", "-q", "1"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        for line in sub.stdout:
            if "SUBACK" in line:
                break
        else:
            pytest.fail("mosquitto_sub ended before subscribing")
        for msg in (SEED_METADATA, SEED_CHUNK0, SEED_CHUNK1):
            subprocess.run(
                ["mosquitto_pub", "-h", mosquitto.host, "-p", str(mosquitto.port),
                 "-t", "ESP32CAM/TESTMAC123/data", "-m", msg, "-q", "1"],
                check=True, timeout=10,
            )  # fmt: skip
        out, _ = sub.communicate(timeout=70)
        ack = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
        assert ack["image_name"] == "test.jpg"
        assert set(ack) == {"image_name", "ACK_OK"}
        assert ack["ACK_OK"]["next_wake_time"].endswith(("AM", "PM"))
        with db.connect(database_url) as conn, conn.cursor() as cur:
            cur.execute(
                "select ingest_status, image_bytes, total_chunks, sha256, storage_path,"
                " flow_run_id from captures where device_id = 'TESTMAC123'"
            )
            rows = cur.fetchall()
            assert len(rows) == 1
            status, nbytes, chunks, sha, path, flow_run_id = rows[0]
            assert (status, nbytes, chunks) == ("stored", 4, 2)
            for _ in range(100):  # the recording flow run stamps its id within ~2 s
                cur.execute("select flow_run_id from captures where device_id = 'TESTMAC123'")
                if (flow_run_id := cur.fetchone()[0]) is not None:
                    break
                time.sleep(0.1)
            assert flow_run_id
            assert (tmp_path / "objects" / path).read_bytes() == b"\xff\xd8\xff\xd9"
            cur.execute("select temperature_c, humidity_pct, pressure_hpa from sensor_readings")
            assert cur.fetchall() == [(25.1, 45.0, 1010.2)]
    finally:
        out = stop_assembler(proc)
    assert "Worker stopped" in out, out
    assert "Traceback" not in out, out
