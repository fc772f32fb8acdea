"""No device can stop the fleet's ingest (issue 12): hostile and buggy devices against the
real assembler service, a private Mosquitto and PostgreSQL.  After every hostile message
a well-behaved device must still get its ACK_OK and its rows must still be written."""

import datetime as dt
import json
import signal
import subprocess
import sys
import threading
import types
import urllib.error
import urllib.request
import uuid

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from camfleet.protocol import assembler as core
from services.assembler import AssemblerService, ServiceConfig
from services.assembler.recorder import Recorder
from tests.helpers import assembler_env, rows, wait_for
from tests.test_mqtt_ingest import FAST, Device, broker_block, jpeg


@pytest.fixture
def service(database_url, tmp_path, monkeypatch):
    # no Prefect API: the ACK path must not need one (and none is started)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    started = []

    def make(broker, **kw):
        cfg = ServiceConfig(
            database_url=database_url,
            storage_url=f"file://{tmp_path / 'objects'}",
            timing=kw.pop("timing", FAST),
            client_id=f"iso-{uuid.uuid4().hex[:8]}",
            **kw,
        )
        svc = AssemblerService(broker, cfg)
        svc.start()
        assert svc.wait_connected(20)  # after the SUBACK: no sleep needed
        started.append(svc)
        return svc

    yield make
    for svc in started:
        if not svc._stopping.is_set():
            svc.stop(timeout=30)


def register(dsn, *devices):
    from camfleet import db

    with db.connect(dsn) as conn, conn.cursor() as cur:
        for d in devices:
            cur.execute(
                "insert into devices (device_id, kind) values (%s, 'esp32') on conflict do nothing",
                (d,),
            )


def send_image(d: Device, name: str, data: bytes, **extra) -> None:
    d.meta(name, data, **extra)
    for cid in range((len(data) + 1023) // 1024):
        d.chunk(name, data, cid)


def healthy_device_still_works(b, dsn, dev="600D00000001", name="ok.jpg"):
    """A real device: its image is ACKed and stored, its status row written."""
    d = Device(b, dev)
    try:
        d.pub({"device_id": dev, "status": "Alive", "pendingImg": 1}, kind="status")
        data = jpeg(2500, hash(name) & 0xFF)
        send_image(d, name, data)
        ack = d.next_ack(timeout=30)
        assert ack["image_name"] == name and "ACK_OK" in ack
        assert rows(
            dsn,
            "select ingest_status from captures where device_id = %s and device_capture_id = %s",
            dev,
            name,
        ) == [("stored",)]
        assert wait_for(
            lambda: rows(
                dsn, "select 1 from device_status where device_id = %s and status = 'Alive'", dev
            )
        )
    finally:
        d.close()


# -- 1. names that sanitize to nothing ---------------------------------------------------


def test_image_names_that_sanitize_to_nothing_are_stored_under_a_hashed_name(
    mosquitto, service, database_url, tmp_path
):
    b = broker_block(mosquitto)
    service(b)
    d = Device(b, "AA0000000001")
    for i, name in enumerate(["?", "é", "日本", "_"]):
        data = jpeg(1500, i)
        send_image(d, name, data)
        ack = d.next_ack(timeout=30)
        assert ack["image_name"] == name and "ACK_OK" in ack
        (path,) = rows(
            database_url,
            "select storage_path from captures where device_id = %s and device_capture_id = %s",
            d.dev,
            name,
        )[0]
        assert "img-" in path and (tmp_path / "objects" / path).read_bytes() == data
    d.close()
    healthy_device_still_works(b, database_url)


# -- 2. poison values -------------------------------------------------------------------

POISON_STATUS = [
    b'{"device_id":"B0150N000001","status":"ok","x":NaN}',
    b'{"device_id":"B0150N000001","status":"ok","x":-Infinity,"y":[1,{"z":NaN}]}',
    b'{"device_id":"B0150N000001","status":"o\\u0000k","pendingImg":1}',
    b'{"device_id":"B0150N000001","status":"\\ud800lone","pendingImg":1}',
    b'{"device_id":"B0150N000001","status":"ok","k\\u0000ey":"v\\udfff"}',
]


def test_poison_values_are_normalized_and_every_table_keeps_being_written(
    mosquitto, service, database_url
):
    b = broker_block(mosquitto)
    svc = service(b)
    d = Device(b, "B0150N000001")
    for raw in POISON_STATUS:
        d.pub(None, kind="status", raw=raw)
    bad_meta = [
        {"capture_timeStamp": "2025-10-04T12:00:00\u0000Z"},
        {"location": "roof\u0000top", "temperature": 1e300},
        {"capture_timeStamp": "9999-12-31T23:59:59+14:00"},
        {"capture_timeStamp": "0001-01-01T00:00:00-12:00"},
        {"location": "\ud800"},
    ]
    for i, extra in enumerate(bad_meta):
        name = f"p{i}.jpg"
        send_image(d, name, jpeg(1200, i), **extra)
        ack = d.next_ack(timeout=30)  # the image is still ACKed
        assert ack["image_name"] == name and "ACK_OK" in ack
    d.close()
    healthy_device_still_works(b, database_url)
    got = wait_for(
        lambda: (
            len(rows(database_url, "select 1 from device_status where device_id = 'B0150N000001'"))
            == 5
        )
    )
    assert got
    warn = rows(
        database_url,
        "select severity, details->>'reason' from device_errors"
        " where device_id = 'B0150N000001' and error_code = 2101",
    )
    assert len(warn) >= 8 and set(warn) == {("warn", "normalized")}
    (loc,) = rows(
        database_url,
        "select location from sensor_readings s join captures c"
        " on c.record_id = s.capture_id where c.device_capture_id = 'p1.jpg'",
    )[0]
    assert loc == "rooftop"
    assert svc.stats["rows_quarantined"] == 0  # the parser caught all of it
    assert svc.stats["internal_errors"] == 0


def test_a_row_the_database_refuses_is_quarantined_and_the_rest_written(
    mosquitto, service, database_url
):
    """The writer's second line: rows that bypass the parser (here queued directly)
    and that PostgreSQL refuses are isolated by bisection, never re-queued."""
    b = broker_block(mosquitto)
    svc = service(b)
    register(database_url, "C0000000000A")
    for i in range(40):
        status = "bad\x00" if i in (7, 31) else f"s{i}"
        svc.rows.queue("status", ("C0000000000A", status, i))
    svc.rows.queue(
        "log",
        (
            "C0000000000A",
            "ESP32CAM/C0000000000A/status",
            "in",
            {"x": float("nan")},
            dt.datetime.now(dt.UTC),
        ),
    )
    assert wait_for(
        lambda: (
            rows(
                database_url, "select count(*) from device_status where device_id = 'C0000000000A'"
            )
            == [(38,)]
        )
    )
    quarantined = wait_for(
        lambda: rows(
            database_url,
            "select details->>'table' from device_errors where error_code = 2205"
            " and details->>'reason' = 'row_rejected' order by 1",
        )
    )
    assert quarantined == [("device_publish_log",), ("device_status",), ("device_status",)]
    assert svc.stats["rows_quarantined"] == 3
    healthy_device_still_works(b, database_url)
    assert svc.rows.pending() == 0 or wait_for(lambda: svc.rows.pending() == 0)


# -- 3. invented devices ----------------------------------------------------------------


def test_refuse_policy_hears_only_registered_devices(mosquitto, service, database_url):
    b = broker_block(mosquitto)
    register(database_url, "600D00000001")
    service(b, unknown_devices="refuse")
    fake = Device(b, "FA4E00000001")
    send_image(fake, "x.jpg", jpeg(1500, 1))
    healthy_device_still_works(b, database_url)  # messages are handled in order
    assert fake.acks.empty()
    assert rows(database_url, "select count(*) from devices where device_id like 'FA4E%%'") == [
        (0,)
    ]
    assert rows(database_url, "select count(*) from device_errors where device_id like 'FA4E%%'")[
        0
    ] == (0,)
    fake.close()


def test_register_policy_admits_new_ids_at_a_bounded_rate(mosquitto, service, database_url):
    b = broker_block(mosquitto)
    register(database_url, "600D00000001")
    svc = service(b, new_device_burst=5, new_device_per_min=0.001)
    c = b.client(client_id=f"flood-{uuid.uuid4().hex[:6]}")
    c.connect(b.host, b.port)
    c.loop_start()
    for i in range(300):
        dev = f"1A4E{i:08d}"
        body = {"device_id": dev, "image_name": "f.jpg", "image_size": 4000, "total_chunk_count": 4}
        c.publish(f"ESP32CAM/{dev}/data", json.dumps(body), qos=1)
        c.publish(
            f"ESP32CAM/{dev}/data",
            json.dumps({"device_id": dev, "image_name": "f.jpg", "chunk_id": 3, "payload": "AAAA"}),
            qos=1,
        ).wait_for_publish(10)
    c.disconnect()
    c.loop_stop()
    healthy_device_still_works(b, database_url)
    assert rows(database_url, "select count(*) from devices where device_id like '1A4E%%'") == [
        (5,)
    ]
    assert svc.admission.dropped == 2 * 295
    assert svc.core.active() <= 5


def test_early_chunk_budget_counts_what_is_really_held():
    limits = core.Limits(max_early_bytes_total=1024 * 1024)
    asm = core.Assembler(limits, FAST)
    accepted = 0
    for i in range(50_000):
        dev = f"E{i:011d}"
        msg = core.ChunkMessage(dev, "x.jpg", 0, b"z")
        if not asm.receive(msg, 0.0):
            accepted += 1
    per_image = core.EARLY_KEY_OVERHEAD + core.EARLY_CHUNK_OVERHEAD + 1
    assert accepted == limits.max_early_bytes_total // per_image
    assert asm.early_held_bytes <= limits.max_early_bytes_total
    assert asm.early_bytes == accepted  # payload bytes alone would have allowed 50,000


def test_inbox_is_bounded_in_bytes_and_drops_are_counted(database_url, tmp_path):
    cfg = ServiceConfig(
        database_url=database_url, storage_url=f"file://{tmp_path}", inbox_max_bytes=64 * 1024
    )
    svc = AssemblerService(broker_block(types.SimpleNamespace(host="127.0.0.1", port=1)), cfg)
    try:
        big = b"x" * (16 * 1024)
        for _ in range(20):  # never started: nothing drains the inbox
            svc._on_message(
                None, None, types.SimpleNamespace(topic="ESP32CAM/A1B2C3/data", payload=big)
            )
        assert svc._inbox_bytes <= cfg.inbox_max_bytes
        assert svc.stats["inbox_dropped"] == 20 - svc.inbox.qsize() and svc.inbox.qsize() == 3
    finally:
        svc.pool.close()


# -- 7. device-reported failures --------------------------------------------------------


def test_device_reported_failure_is_recorded_and_acked(mosquitto, service, database_url):
    b = broker_block(mosquitto)
    service(b)
    d = Device(b, "DE7000000001")
    d.pub(
        {
            "device_id": d.dev,
            "image_name": "fail.jpg",
            "image_size": 0,
            "total_chunk_count": 0,
            "error": 3,
            "temperature": 19.5,
            "humidity": 40.0,
            "capture_timeStamp": "2025-10-04T12:00:00Z",
        }
    )
    ack = d.next_ack(timeout=30)
    assert ack["image_name"] == "fail.jpg" and "ACK_OK" in ack
    assert rows(
        database_url,
        "select error_code, message, details->>'reason' from device_errors where device_id = %s",
        d.dev,
    ) == [(3, "sensor read failed", "device_reported")]
    assert rows(
        database_url,
        "select ingest_status, metadata->>'failure_reason', storage_path"
        " from captures where device_id = %s",
        d.dev,
    ) == [("failed", "sensor read failed", None)]
    assert rows(
        database_url,
        "select temperature_c, humidity_pct from sensor_readings where device_id = %s",
        d.dev,
    ) == [(19.5, 40.0)]
    d.pub(
        {
            "device_id": d.dev,
            "image_name": "f2.jpg",
            "image_size": 0,
            "total_chunk_count": 0,
            "error": 99,
        }
    )
    assert d.next_ack(timeout=30)["image_name"] == "f2.jpg"
    assert wait_for(
        lambda: rows(
            database_url,
            "select message from device_errors where device_id = %s and error_code = 99",
            d.dev,
        )
    )
    d.close()


# -- arbitrary JSON through the running assembler ---------------------------------------

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["\x00", "\ud800", "a\x00b", "日本", "?", "_"]),
)
json_values = st.recursive(
    json_leaf,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "device_id",
    "status",
    "pendingImg",
    "image_name",
    "image_size",
    "total_chunk_count",
    "chunk_id",
    "payload",
    "capture_timeStamp",
    "location",
    "error",
    "temperature",
]


def _dumps(v) -> bytes:
    return json.dumps(v, ensure_ascii=True).encode()  # NaN/Infinity as the literals


def test_arbitrary_json_values_never_stop_ingest(mosquitto, service, database_url):
    b = broker_block(mosquitto)
    register(database_url, "600D00000001")
    svc = service(b)
    dev = "A4B17000001"
    c = b.client(client_id=f"fuzz-{uuid.uuid4().hex[:6]}")
    c.connect(b.host, b.port)
    c.loop_start()

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        kind=st.sampled_from(["data", "status"]),
        body=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8),
        deep=st.integers(0, 3000),
        raw=st.booleans(),
    )
    def send(kind, body, deep, raw):
        body.setdefault("device_id", dev)
        payload = _dumps(body) if not raw else b"[" * deep + _dumps(body) + b"]" * deep
        c.publish(f"ESP32CAM/{dev}/{kind}", payload, qos=1).wait_for_publish(10)

    send()
    c.disconnect()
    c.loop_stop()
    healthy_device_still_works(b, database_url, name="after-fuzz.jpg")
    assert svc.crashed is None and all(t.is_alive() for t in svc._threads)
    assert svc.stats["internal_errors"] == 0
    assert wait_for(
        lambda: (
            rows(database_url, "select count(*) from device_publish_log where device_id = %s", dev)[
                0
            ][0]
            > 0
        )
    )
    assert rows(database_url, "select count(*) from device_errors where device_id = %s", dev)[0][0]


# -- crashes, health, SIGTERM, Prefect ------------------------------------------------------


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_health_is_ready_after_suback_and_a_dead_thread_exits_70(mosquitto, service, database_url):
    b = broker_block(mosquitto)
    svc = service(b, health_port=0)
    url = f"http://127.0.0.1:{svc.health.port}/healthz"
    status, body = _get(url)
    assert status == 200 and body["ready"] and body["subscribed"]
    exited = threading.Event()
    codes = []
    svc._exit = lambda code: (codes.append(code), exited.set())

    def boom():
        raise RuntimeError("a bug in the writer")

    svc.rows.flush = boom
    assert exited.wait(30)
    assert codes == [70]
    status, body = _get(url)
    assert status == 503 and not body["ready"] and "assembler-db" in body["crashed"]


def test_cli_without_prefect_api_starts_no_server_acks_and_stops_on_sigterm(
    mosquitto, database_url, tmp_path
):
    env = assembler_env(mosquitto, database_url, tmp_path, "cli")
    proc = subprocess.Popen(
        [sys.executable, "-m", "camfleet.cli", "assembler"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Worker started" in line:
                break
        banner = "".join(lines)
        assert "no Prefect API configured" in banner, banner
        healthy_device_still_works(broker_block(mosquitto), database_url)
        assert psutil.Process(proc.pid).children(recursive=True) == []  # no Prefect server
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "Worker stopped" in out and "Traceback" not in out


def test_recording_backlog_is_bounded_and_drops_are_counted():
    stats = {}
    r = Recorder("inline", "file:///nowhere", "postgresql://unused", stats, backlog=100)
    for i in range(250):
        r.add({"record_id": str(i)})
    assert r.pending() == 100 and stats["record_dropped"] == 150
    assert r._queue[0][0]["record_id"] == "150"  # the oldest went first


def test_one_device_looping_on_status_is_held_to_its_row_quota(mosquitto, service, database_url):
    from services.assembler.admission import RowQuota

    b = broker_block(mosquitto)
    svc = service(b)
    svc.quota = RowQuota({"status": (10, 0.0), "log": (15, 0.0), "error": (5, 0.0)})
    d = Device(b, "L00B00000001")
    for i in range(200):
        d.pub({"device_id": d.dev, "status": f"s{i}", "pendingImg": 1}, kind="status")
    for _ in range(50):
        d.pub(None, raw=b"{not json")
    d.close()
    healthy_device_still_works(b, database_url)
    n = "select count(*) from {} where device_id = 'L00B00000001'"
    assert rows(database_url, n.format("device_status")) == [(10,)]
    assert rows(database_url, n.format("device_errors")) == [(5,)]
    assert rows(database_url, n.format("device_publish_log") + " and direction = 'in'") == [(15,)]
    assert svc.stats["rows_over_quota"] == 190 + 45 + 235


def test_ack_path_does_not_wait_on_a_frozen_prefect_server(
    mosquitto, database_url, prefect_server, prefect_api_url, tmp_path
):
    """SIGSTOP the Prefect server during a fleet run: every image is still ACKed (the
    devices' own ACK timeout, 10 s, is the bound); the recording catches up after
    SIGCONT."""
    from camfleet.simulators.esp32 import SimOptions, simulate

    frozen = prefect_server.processes()
    b = broker_block(mosquitto)
    cfg = ServiceConfig(
        database_url=database_url,
        storage_url=f"file://{tmp_path / 'o'}",
        timing=FAST,
        client_id=f"frz-{uuid.uuid4().hex[:6]}",
    )
    svc = AssemblerService(b, cfg)
    assert svc.recorder is not None  # a Prefect API is configured: runs are recorded
    svc.start()
    try:
        assert svc.wait_connected(20)
        warm = simulate(b, SimOptions(devices=2, images=1, id_prefix="F4EE2F"))
        assert warm.images_acked == 2
        for p in frozen:
            p.suspend()
        try:
            r = simulate(b, SimOptions(devices=20, images=3, id_prefix="F4EE2E", ack_timeout=10))
        finally:
            for p in frozen:
                p.resume()
        lat = sorted(r.ack_latencies)
        print(
            f"\nPrefect frozen: ACK p50 {lat[len(lat) // 2] * 1000:.0f} ms "
            f"p99 {lat[int(len(lat) * 0.99)] * 1000:.0f} ms"
        )
        assert r.images_acked == 60 and r.images_failed == 0 and r.resends == 0
        q = "select count(*) from captures where flow_run_id is null"
        assert wait_for(lambda: rows(database_url, q) == [(0,)], timeout=180)
    finally:
        svc.stop(timeout=30)
