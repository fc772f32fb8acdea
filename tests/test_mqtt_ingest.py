"""The assembler service against real Mosquitto, PostgreSQL, storage and a Prefect server."""

import base64
import datetime as dt
import json
import queue
import threading
import time
import uuid

import pytest

from blocks.mqtt import MqttBroker
from camfleet import db
from camfleet.localsvc import MosquittoInstance
from camfleet.protocol.assembler import Timing
from camfleet.simulators.esp32 import SimOptions, simulate
from services.assembler import AssemblerService, ServiceConfig
from tasks.mqtt import next_wake_time
from tests.helpers import rows, wait_for, wait_until

FAST = Timing(capture_timeout=2.0, retransmit_delay=0.4, retransmit_max=2)


def broker_block(m, **kw) -> MqttBroker:
    b = MqttBroker(host=m.host, port=m.port, **kw)
    return b


@pytest.fixture
def make_service(database_url, prefect_api_url, tmp_path):
    started = []

    def make(broker, storage=None, **kw):
        cfg = ServiceConfig(
            database_url=database_url,
            storage_url=storage or f"file://{tmp_path / 'objects'}",
            timing=kw.pop("timing", FAST),
            client_id=f"asm-{uuid.uuid4().hex[:8]}",
            **kw,
        )
        svc = AssemblerService(broker, cfg)
        svc.start()
        assert svc.wait_connected(20)
        started.append(svc)
        return svc

    yield make
    for svc in started:
        if not svc._stopping.is_set():
            svc.stop(timeout=30)


class Device:
    """A hand-driven device: raw publishes and the ack topic as a queue."""

    def __init__(self, broker: MqttBroker, dev: str):
        self.dev = dev
        self.acks: queue.SimpleQueue = queue.SimpleQueue()
        self.c = broker.client(client_id=f"dev-{uuid.uuid4().hex[:8]}")
        ready = threading.Event()
        self.c.on_connect = lambda c, u, f, rc, p=None: c.subscribe(f"ESP32CAM/{dev}/ack", qos=1)
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.on_message = lambda c, u, m: self.acks.put(json.loads(m.payload))
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        assert ready.wait(10)

    def pub(self, body, kind="data", raw=None):
        payload = raw if raw is not None else json.dumps(body)
        self.c.publish(f"ESP32CAM/{self.dev}/{kind}", payload, qos=1).wait_for_publish(10)

    def meta(self, name, data, chunk=1024, **extra):
        total = (len(data) + chunk - 1) // chunk
        body = {"device_id": self.dev, "image_name": name, "image_size": len(data),
                "max_chunks_size": chunk, "total_chunk_count": total,
                "capture_timeStamp": "2025-10-04T12:00:00Z", "temperature": 21.5}  # fmt: skip
        body.update(extra)
        self.pub(body)

    def chunk(self, name, data, cid, chunk=1024, payload=None):
        part = data[cid * chunk : (cid + 1) * chunk]
        if payload is None:
            payload = base64.b64encode(part).decode()
        body = {"device_id": self.dev, "image_name": name, "chunk_id": cid,
                "max_chunk_size": chunk, "payload": payload}  # fmt: skip
        self.pub(body)

    def next_ack(self, timeout=15):
        return self.acks.get(timeout=timeout)

    def no_ack(self, wait=1.0):
        try:
            msg = self.acks.get(timeout=wait)
        except queue.Empty:
            return True
        raise AssertionError(f"unexpected ack {msg}")

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def jpeg(n, seed=0):
    import random

    return b"\xff\xd8" + random.Random(seed).randbytes(n - 4) + b"\xff\xd9"


def errors(dsn, dev):
    return rows(dsn, "select error_code from device_errors where device_id = %s order by id", dev)


# ----------------------------------------------------------------------------------------


def test_fleet_with_drops_duplicates_reorder_is_byte_identical(
    mosquitto, make_service, database_url, tmp_path
):
    b = broker_block(mosquitto)
    make_service(b)
    opts = SimOptions(devices=8, images=2, drop=0.05, duplicate=0.1, reorder=0.2,
                      id_prefix="F1EE70", seed=3, ack_timeout=10)  # fmt: skip
    r = simulate(b, opts)
    assert r.images_acked == 16 and r.images_failed == 0
    assert r.nacks > 0  # drops were recovered through NACK
    query = ("select device_id, device_capture_id, ingest_status, storage_path, sha256,"
             " flow_run_id from captures order by 1, 2")  # fmt: skip
    # the recording flow run stamps its id on the rows shortly after the ACKs
    got = wait_for(
        lambda: all(g[5] for g in rows(database_url, query)) and rows(database_url, query)
    )
    assert len(got) == 16
    for dev, name, status, path, sha, run_id in got:
        assert status == "stored" and run_id
        assert (tmp_path / "objects" / path).read_bytes() == r.sent[(dev, name)]
    # one recording run per interval, not per image
    assert len({g[5] for g in got}) < 16
    assert rows(database_url, "select count(*) from sensor_readings") == [(16,)]


@pytest.mark.parametrize("recorder", ["inline", "process"])
def test_both_recorders_stamp_the_recording_run_on_every_row(
    recorder, mosquitto, make_service, database_url
):
    b = broker_block(mosquitto)
    make_service(b, recorder=recorder)
    r = simulate(b, SimOptions(devices=2, images=2, id_prefix=f"5EC{len(recorder):03X}"))
    assert r.images_acked == 4
    query = "select flow_run_id from captures"
    got = wait_for(
        lambda: all(g[0] for g in rows(database_url, query)) and rows(database_url, query)
    )
    assert got and len(got) == 4


def test_resent_stored_image_is_acked_again_without_second_row_or_object(
    mosquitto, make_service, database_url, tmp_path
):
    b = broker_block(mosquitto)
    make_service(b)
    opts = SimOptions(devices=2, images=1, id_prefix="DEDE00", seed=9)
    assert simulate(b, opts).images_acked == 2
    first = rows(database_url, "select record_id, flow_run_id from captures order by 1")
    objects = sorted(p for p in (tmp_path / "objects").rglob("*") if p.is_file())
    time.sleep(FAST.retransmit_delay + 0.1)  # past the late-duplicate window
    r2 = simulate(b, opts)
    assert r2.images_acked == 2
    assert rows(database_url, "select record_id, flow_run_id from captures order by 1") == first
    assert sorted(p for p in (tmp_path / "objects").rglob("*") if p.is_file()) == objects


def test_chunk_before_metadata_out_of_order_status_and_logs(mosquitto, make_service, database_url):
    b = broker_block(mosquitto)
    make_service(b)
    d = Device(b, "AABBCC000001")
    d.pub({"device_id": d.dev, "status": "Alive", "pendingImg": 3}, kind="status")
    data = jpeg(3000, 1)
    d.chunk("a.jpg", data, 2)
    d.chunk("a.jpg", data, 0)
    d.meta("a.jpg", data)
    d.chunk("a.jpg", data, 0)  # duplicate
    d.chunk("a.jpg", data, 1)
    ack = d.next_ack()
    assert ack["image_name"] == "a.jpg" and "ACK_OK" in ack
    status = wait_for(lambda: rows(database_url, "select status, pending_count from device_status"))
    assert status == [("Alive", 3)]
    seen = rows(database_url, "select last_seen_at from devices where device_id = %s", d.dev)
    assert seen and seen[0][0] is not None
    log = wait_for(lambda: rows(database_url, "select direction, payload from device_publish_log"
                                " order by id"))  # fmt: skip
    ins = [p for direction, p in log if direction == "in"]
    assert any(p.get("chunk_id") == 1 for p in ins)
    assert not any("payload" in p for p in ins)  # no chunk bodies
    outs = wait_for(lambda: rows(database_url, "select payload from device_publish_log"
                                 " where direction = 'out'"))  # fmt: skip
    assert outs[0][0]["ACK_OK"]
    assert errors(database_url, d.dev) == []
    d.close()


def test_dropped_chunk_recovered_by_nack_then_timeout_after_retransmit_max(
    mosquitto, make_service, database_url
):
    b = broker_block(mosquitto)
    make_service(b)
    d = Device(b, "AABBCC000002")
    data = jpeg(4000, 2)
    d.meta("n.jpg", data)
    for cid in (0, 1, 3):
        d.chunk("n.jpg", data, cid)
    nack = d.next_ack(5)
    assert nack == {"image_name": "n.jpg", "missing_chunks": [2]}
    d.chunk("n.jpg", data, 2)
    assert "ACK_OK" in d.next_ack()

    d.meta("t.jpg", data)
    d.chunk("t.jpg", data, 0)
    nacks = [d.next_ack(5), d.next_ack(5)]
    assert [n["missing_chunks"] for n in nacks] == [[1, 2, 3], [1, 2, 3]]
    assert wait_for(lambda: errors(database_url, d.dev), timeout=10) == [(2201,)]
    d.no_ack(0.5)  # no third NACK (RETRANSMIT_MAX = 2), no ACK
    status = wait_for(lambda: rows(database_url, "select ingest_status from captures where"
                                   " device_capture_id = 't.jpg'"))  # fmt: skip
    assert status == [("failed",)]
    d.close()


def test_every_device_side_error_code(mosquitto, make_service, database_url):
    b = broker_block(mosquitto)
    make_service(b)
    d = Device(b, "AABBCC000003")
    data = jpeg(3000, 3)
    d.pub(None, raw="{not json")  # 2101
    d.pub({"device_id": "OTHERDEVICE1", "image_name": "x.jpg", "chunk_id": 0,
           "payload": "/9g="})  # 2101 topic/payload mismatch  # fmt: skip
    d.meta("big.jpg", data, image_size=10**9)  # 2101 oversized declaration
    d.meta("x.jpg", data)
    d.pub({"device_id": d.dev, "image_name": "x.jpg", "chunk_id": 0})  # 2102
    d.chunk("x.jpg", data, 0, payload="!!notbase64!!")  # 2103
    d.chunk("x.jpg", data, 0)
    d.chunk("x.jpg", data, 0, payload=base64.b64encode(b"different").decode())  # 2200
    codes = wait_for(lambda: [c for (c,) in errors(database_url, d.dev)] if len(
        errors(database_url, d.dev)) >= 6 else None)  # fmt: skip
    assert codes == [2101, 2101, 2101, 2102, 2103, 2200]
    details = rows(database_url, "select details->>'reason' from device_errors where"
                   " device_id = %s and error_code = 2101 order by id", d.dev)  # fmt: skip
    assert [r[0] for r in details] == ["invalid_json", "device_id_mismatch", "image_too_large"]

    # 2202 and 2203: stored as received, quarantined, ACKed (the device stops resending)
    d.meta("size.jpg", data, image_size=len(data) + 5)
    for cid in range(3):
        d.chunk("size.jpg", data, cid)
    assert "ACK_OK" in d.next_ack()
    gif = b"GIF89a" + bytes(100)
    d.meta("sig.jpg", gif)
    d.chunk("sig.jpg", gif, 0)
    assert "ACK_OK" in d.next_ack()
    got = rows(database_url, "select device_capture_id, ingest_status from captures where"
               " device_id = %s and ingest_status = 'quarantined' order by 1", d.dev)  # fmt: skip
    assert got == [("sig.jpg", "quarantined"), ("size.jpg", "quarantined")]
    codes = wait_for(lambda: [c for (c,) in errors(database_url, d.dev)][6:] == [2202, 2203])
    assert codes, errors(database_url, d.dev)
    d.close()


def test_store_failure_is_2204_and_no_ack(mosquitto, make_service, database_url, tmp_path):
    root = tmp_path / "broken"
    root.mkdir()
    (root / "esp32").write_text("a file where the store needs a directory")
    b = broker_block(mosquitto)
    make_service(b, storage=f"file://{root}")
    d = Device(b, "AABBCC000004")
    data = jpeg(1500, 4)
    d.meta("s.jpg", data)
    d.chunk("s.jpg", data, 0)
    d.chunk("s.jpg", data, 1)
    assert wait_for(lambda: errors(database_url, d.dev), timeout=20) == [(2204,)]
    d.no_ack(0.5)
    assert wait_for(lambda: rows(database_url, "select ingest_status from captures")) == [
        ("failed",)
    ]
    d.close()


def test_database_failure_is_2205_and_no_ack(mosquitto, make_service, database_url):
    with db.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(
            "create function refuse() returns trigger language plpgsql as"
            " $$ begin raise exception 'captures refused for test'; end $$;"
            " create trigger refuse before insert on captures for each row"
            " when (new.ingest_status = 'stored') execute function refuse();"
        )
    b = broker_block(mosquitto)
    make_service(b)
    d = Device(b, "AABBCC000005")
    data = jpeg(1500, 5)
    d.meta("d.jpg", data)
    d.chunk("d.jpg", data, 0)
    d.chunk("d.jpg", data, 1)
    assert wait_for(lambda: errors(database_url, d.dev), timeout=20) == [(2205,)]
    d.no_ack(0.5)
    d.close()


def test_next_wake_time_from_device_schedule(mosquitto, make_service, database_url):
    now = dt.datetime(2025, 10, 4, 17, 12, tzinfo=dt.UTC)
    assert next_wake_time({"schedule": {"interval_seconds": 1800}}, now) == "5:30PM"
    assert next_wake_time(None, now) == "5:30PM"
    assert next_wake_time({"schedule": {"interval_seconds": 3600}}, now) == "6:00PM"
    assert next_wake_time({"schedule": {"times": ["08:00", "17:45"]}}, now) == "5:45PM"
    assert next_wake_time({"schedule": {"times": ["08:00"]}}, now) == "8:00AM"
    berlin = {"schedule": {"interval_seconds": 900, "timezone": "Europe/Berlin"}}
    assert next_wake_time(berlin, now) == "7:15PM"

    with db.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("insert into devices (device_id, config) values ('AABBCC000006', %s)",
                    [json.dumps({"schedule": {"times": ["03:07"]}})])  # fmt: skip
    b = broker_block(mosquitto)
    make_service(b)
    d = Device(b, "AABBCC000006")
    data = jpeg(900, 6)
    d.meta("w.jpg", data)
    d.chunk("w.jpg", data, 0)
    assert d.next_ack()["ACK_OK"] == {"next_wake_time": "3:07AM"}
    d.close()


def test_broker_restart_mid_image(make_service, database_url):
    with MosquittoInstance() as m:
        b = broker_block(m)
        svc = make_service(b)
        data = jpeg(5000, 7)
        # graceful restart: the persistent sessions keep subscriptions and queued messages
        d = Device(b, "AABBCC000007")
        before = svc.stats["messages"]
        d.meta("r.jpg", data)
        d.chunk("r.jpg", data, 0)
        d.chunk("r.jpg", data, 1)
        # The service has the first three (the rest arrive after the restart).
        wait_until(lambda: svc.stats["messages"] >= before + 3, "three messages", 30)
        d.close()
        m.restart()
        d = Device(b, "AABBCC000007")
        for cid in (2, 3, 4):
            d.chunk("r.jpg", data, cid)
        while "ACK_OK" not in (ack := d.next_ack(20)):  # a NACK if the restart was slow
            for cid in ack["missing_chunks"]:
                d.chunk("r.jpg", data, cid)
        assert ack["image_name"] == "r.jpg"
        d.close()
        # hard kill while a small fleet is sending: devices resend what got no ACK_OK
        opts = SimOptions(devices=2, images=3, id_prefix="C0FFEE", ack_timeout=3, seed=1)
        result = {}
        t = threading.Thread(target=lambda: result.update(r=simulate(b, opts)))
        before = svc.stats["messages"]
        t.start()
        # Killed while the fleet is sending: the service has some of it, not all.
        wait_until(lambda: svc.stats["messages"] > before, "the fleet's first message", 30)
        m.kill()
        m.restart()
        t.join(90)
        assert result["r"].images_acked == 6
        assert svc.stats["messages"] > 0
    got = rows(database_url, "select device_capture_id, ingest_status from captures order by 1")
    assert len(got) == 7 and {status for _, status in got} == {"stored"}


def test_tls_and_password_broker(mosquitto_tls, make_service, database_url):
    m = mosquitto_tls
    b = MqttBroker(host=m.host, port=m.port, tls=True, ca_certs=str(m.ca_file),
                   certfile=str(m.client_cert), keyfile=str(m.client_key),
                   username=m.username, password=m.password)  # fmt: skip
    svc = make_service(b)
    assert m.password not in svc.banner()
    r = simulate(b, SimOptions(devices=2, images=1, id_prefix="7150AA"))
    assert r.images_acked == 2
    assert rows(database_url, "select count(*) from captures where ingest_status = 'stored'") == [
        (2,)
    ]


def test_clean_shutdown_finishes_in_flight_stores(mosquitto, make_service, database_url):
    b = broker_block(mosquitto)
    svc = make_service(b)
    d = Device(b, "AABBCC000008")
    data = jpeg(2000, 8)
    d.meta("z.jpg", data)
    d.chunk("z.jpg", data, 0)
    d.chunk("z.jpg", data, 1)
    svc.stop(timeout=30)  # right after the last chunk: the store is still in flight
    assert "ACK_OK" in d.next_ack(5)
    assert rows(database_url, "select ingest_status from captures") == [("stored",)]
    d.close()


def test_no_prefect_mode_stores_without_flow_run(mosquitto, make_service, database_url):
    b = broker_block(mosquitto)
    make_service(b, use_prefect=False, log_control_only=True)
    r = simulate(b, SimOptions(devices=3, images=1, id_prefix="0F0F00"))
    assert r.images_acked == 3
    assert rows(database_url, "select count(*), count(flow_run_id) from captures") == [(3, 0)]
    log = wait_for(
        lambda: rows(database_url, "select payload from device_publish_log where direction = 'in'")
    )
    assert log and not any("chunk_id" in p for (p,) in log)


def test_flow_on_ack_path_mode(mosquitto, make_service, database_url, tmp_path):
    b = broker_block(mosquitto)
    make_service(b, ack_path="flow")
    r = simulate(b, SimOptions(devices=4, images=1, id_prefix="F10F10", seed=4))
    assert r.images_acked == 4
    got = rows(database_url, "select ingest_status, flow_run_id, storage_path from captures")
    assert len(got) == 4
    # the run id is on each row when the ACK is sent: the run stored it
    assert all(status == "stored" and run for status, run, _ in got)
    assert len({run for _, run, _ in got}) < 4
