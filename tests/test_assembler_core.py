"""The sans-IO assembler core: examples for every rule, then hypothesis over fleets."""

import base64
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from camfleet.protocol.assembler import (
    DESCRIPTION,
    SEVERITY,
    Assembler,
    CaptureFailed,
    FinalizeImage,
    Limits,
    ProtocolError,
    RecordError,
    RecordStatus,
    SendNack,
    Timing,
    encode_ack,
    encode_nack,
    parse_message,
    sanitize_image_name,
)

TIMING = Timing(capture_timeout=10.0, retransmit_delay=1.0, retransmit_max=3)


def receive_raw(asm, topic, payload, now):
    """A raw MQTT message through the public path the assembler service takes:
    parse_message, its coded error as the only action, else Assembler.receive."""
    try:
        msg = parse_message(topic, payload, asm.limits)
    except ProtocolError as exc:
        return [exc.record]
    return asm.receive(msg, now)


def jpeg(n: int, seed: int = 0) -> bytes:
    rnd = random.Random(seed)
    return b"\xff\xd8" + bytes(rnd.randrange(256) for _ in range(max(0, n - 4))) + b"\xff\xd9"


def meta(dev, name, data, chunk, **extra):
    total = (len(data) + chunk - 1) // chunk
    m = {
        "device_id": dev,
        "image_name": name,
        "image_size": len(data),
        "max_chunks_size": chunk,
        "total_chunk_count": total,
        "capture_timeStamp": "2025-10-04T12:00:00Z",
        "temperature": 25.1,
        "humidity": 45.0,
        "pressure": 1010.2,
    }
    m.update(extra)
    return (f"ESP32CAM/{dev}/data", json.dumps(m).encode())


def chunk_msg(dev, name, data, chunk, i):
    body = {
        "device_id": dev,
        "image_name": name,
        "chunk_id": i,
        "max_chunk_size": chunk,
        "payload": base64.b64encode(data[i * chunk : (i + 1) * chunk]).decode(),
    }
    return (f"ESP32CAM/{dev}/data", json.dumps(body).encode())


def chunks(dev, name, data, chunk):
    n = (len(data) + chunk - 1) // chunk
    return [chunk_msg(dev, name, data, chunk, i) for i in range(n)]


def feed(asm, msgs, now=0.0):
    out = []
    for topic, payload in msgs:
        out += receive_raw(asm, topic, payload, now)
    return out


def kinds(actions, cls):
    return [a for a in actions if isinstance(a, cls)]


def codes(actions):
    return [a.code for a in actions if isinstance(a, RecordError)]


# --- the seed's own example --------------------------------------------------------------


def test_seed_example_four_bytes_is_stored():
    asm = Assembler(timing=TIMING)
    dev = "TESTMAC123"
    msgs = [
        (
            f"ESP32CAM/{dev}/data",
            b'{"device_id":"TESTMAC123","image_name":"test.jpg","image_size":4,'
            b'"max_chunks_size":2,"total_chunk_count":2,"temperature":25.1,"humidity":45.0,'
            b'"pressure":1010.2,"capture_timeStamp":"2025-10-04T12:00:00Z"}',
        ),
        (
            f"ESP32CAM/{dev}/data",
            b'{"device_id":"TESTMAC123","image_name":"test.jpg","chunk_id":0,'
            b'"max_chunk_size":1024,"payload":"/9g="}',
        ),
        (
            f"ESP32CAM/{dev}/data",
            b'{"device_id":"TESTMAC123","image_name":"test.jpg","chunk_id":1,'
            b'"max_chunk_size":1024,"payload":"/9k="}',
        ),
    ]
    out = feed(asm, msgs)
    (fin,) = kinds(out, FinalizeImage)
    assert fin.data == b"\xff\xd8\xff\xd9" and fin.valid and not codes(out)
    assert fin.metadata["temperature"] == 25.1
    assert asm.is_idle()


def test_out_of_order_and_duplicates():
    asm = Assembler(timing=TIMING)
    data = jpeg(5000, 1)
    cs = chunks("AABBCCDDEEFF", "a.jpg", data, 1024)
    out = feed(asm, [meta("AABBCCDDEEFF", "a.jpg", data, 1024)])
    out += feed(asm, [cs[3], cs[0], cs[3], cs[4], cs[1], cs[0], cs[2]])
    (fin,) = kinds(out, FinalizeImage)
    assert fin.data == data and not codes(out)
    assert asm.stats["duplicates"] == 2


def test_chunk_before_metadata():
    asm = Assembler(timing=TIMING)
    data = jpeg(3000, 2)
    cs = chunks("AABBCCDDEEFF", "b.jpg", data, 1024)
    out = feed(asm, cs[:2])
    assert out == [] and asm.early_bytes == 2048
    out = feed(asm, [meta("AABBCCDDEEFF", "b.jpg", data, 1024), cs[2]])
    assert kinds(out, FinalizeImage)[0].data == data
    assert asm.is_idle() and asm.early_bytes == 0


def test_nack_then_recovery_then_no_more_nacks():
    asm = Assembler(timing=TIMING)
    data = jpeg(4096, 3)
    dev, name = "AABBCCDDEEFF", "c.jpg"
    cs = chunks(dev, name, data, 1024)
    feed(asm, [meta(dev, name, data, 1024), cs[0], cs[2]])
    assert asm.tick(0.5) == []
    assert asm.next_deadline() == pytest.approx(1.0)
    (nack,) = asm.tick(1.0)
    assert isinstance(nack, SendNack) and nack.missing_chunks == [1, 3]
    assert json.loads(nack.payload()) == {"image_name": name, "missing_chunks": [1, 3]}
    assert nack.topic == f"ESP32CAM/{dev}/ack"
    out = feed(asm, [cs[1], cs[3]], now=1.2)
    assert kinds(out, FinalizeImage)[0].data == data
    assert asm.tick(100.0) == []


def test_timeout_after_retransmit_max():
    asm = Assembler(timing=TIMING)
    data = jpeg(4096, 4)
    dev, name = "AABBCCDDEEFF", "d.jpg"
    feed(asm, [meta(dev, name, data, 1024), chunks(dev, name, data, 1024)[0]])
    nacks = []
    t = 0.0
    out = []
    while not out or not codes(out):
        t = asm.next_deadline()
        out = asm.tick(t)
        nacks += kinds(out, SendNack)
    assert [n.round for n in nacks] == [1, 2, 3]
    assert codes(out) == [2201]
    (failed,) = kinds(out, CaptureFailed)
    assert failed.code == 2201 and t == pytest.approx(10.0)
    assert asm.is_idle() and asm.reserved_bytes == 0


def test_metadata_never_arrives_is_2201():
    asm = Assembler(timing=TIMING)
    data = jpeg(2000, 5)
    feed(asm, chunks("AABBCCDDEEFF", "e.jpg", data, 1024)[:1])
    out = asm.tick(10.0)
    assert codes(out) == [2201]
    assert out[0].details["reason"] == "metadata_never_arrived"
    assert asm.is_idle()


@pytest.mark.parametrize(
    "payload,code,reason",
    [
        (b"{not json", 2101, "invalid_json"),
        (b"[1,2]", 2101, "not_an_object"),
        (b'{"device_id": 5}', 2101, "schema"),
        (
            b'{"device_id":"OTHERDEV1","image_name":"x.jpg","chunk_id":0,"payload":"/9g="}',
            2101,
            "device_id_mismatch",
        ),
        (
            b'{"device_id":"AABBCCDDEEFF","image_name":"x.jpg","chunk_id":"0","payload":"/9g="}',
            2101,
            "schema",
        ),
        (
            b'{"device_id":"AABBCCDDEEFF","image_name":"x.jpg","chunk_id":true,"payload":"/9g="}',
            2101,
            "schema",
        ),
        (
            b'{"device_id":"AABBCCDDEEFF","image_name":"x.jpg","chunk_id":99999,"payload":"/9g="}',
            2101,
            "chunk_id_out_of_range",
        ),
        (b'{"device_id":"AABBCCDDEEFF","image_name":"x.jpg","chunk_id":0}', 2102, None),
        (
            b'{"device_id":"AABBCCDDEEFF","image_name":"x.jpg","chunk_id":0,"payload":""}',
            2102,
            None,
        ),
        (
            b'{"device_id":"AABBCCDDEEFF","image_name":"x.jpg","chunk_id":0,"payload":"!!!"}',
            2103,
            None,
        ),
        (
            b'{"device_id":"AABBCCDDEEFF","image_name":"x.jpg","chunk_id":0,"payload":"/9g"}',
            2103,
            None,
        ),
        (
            b'{"device_id":"AABBCCDDEEFF","image_name":"x.jpg","chunk_id":0,"payload":7}',
            2103,
            "not_a_string",
        ),
        (
            b'{"device_id":"AABBCCDDEEFF","image_name":"x.jpg","image_size":99999999999,'
            b'"total_chunk_count":2}',
            2101,
            "image_too_large",
        ),
        (
            b'{"device_id":"AABBCCDDEEFF","image_name":"x.jpg","image_size":4000,'
            b'"total_chunk_count":1000000}',
            2101,
            "too_many_chunks",
        ),
        (
            b'{"device_id":"AABBCCDDEEFF","image_name":"x.jpg","image_size":4000000,'
            b'"total_chunk_count":2}',
            2101,
            "inconsistent_declaration",
        ),
        (
            b'{"device_id":"AABBCCDDEEFF","image_name":"x.jpg","image_size":4,'
            b'"total_chunk_count":2,"temperature":"hot"}',
            2101,
            "schema",
        ),
        (
            b'{"device_id":"AABBCCDDEEFF","image_name":"","image_size":4,"total_chunk_count":2}',
            2101,
            "schema",
        ),
    ],
)
def test_bad_input_gets_coded_error(payload, code, reason):
    asm = Assembler(timing=TIMING)
    out = receive_raw(asm, "ESP32CAM/AABBCCDDEEFF/data", payload, 0.0)
    (err,) = out
    assert isinstance(err, RecordError) and err.code == code
    assert err.severity == SEVERITY[code] and err.message == DESCRIPTION[code]
    if reason:
        assert err.details["reason"] == reason
    assert asm.is_idle() and asm.reserved_bytes == 0


def test_bad_topic_device_id_and_huge_message():
    asm = Assembler(timing=TIMING)
    (err,) = receive_raw(asm, "ESP32CAM/AA:BB:CC:DD:EE:FF/data", b"{}", 0)
    assert err.code == 2101 and err.details["reason"] == "device_id_format"
    (err,) = receive_raw(asm, "ESP32CAM/AABBCCDDEEFF/data", b"x" * 100_000, 0)
    assert err.code == 2101 and err.details["reason"] == "message_too_large"
    (err,) = receive_raw(asm, "ESP32CAM/AABBCCDDEEFF/other", b"{}", 0)
    assert err.details["reason"] == "unknown_topic"


def test_chunk_too_large():
    asm = Assembler(Limits(max_chunk_bytes=1024), timing=TIMING)
    body = {
        "device_id": "AABBCCDDEEFF",
        "image_name": "x.jpg",
        "chunk_id": 0,
        "payload": base64.b64encode(b"x" * 2000).decode(),
    }
    (err,) = receive_raw(asm, "ESP32CAM/AABBCCDDEEFF/data", json.dumps(body).encode(), 0)
    assert err.code == 2101 and err.details["reason"] == "chunk_too_large"


def test_size_mismatch_and_bad_signature_are_quarantined():
    asm = Assembler(timing=TIMING)
    dev = "AABBCCDDEEFF"
    data = jpeg(3000, 6)
    m = meta(dev, "f.jpg", data, 1024, image_size=3001)
    out = feed(asm, [m, *chunks(dev, "f.jpg", data, 1024)])
    (fin,) = kinds(out, FinalizeImage)
    assert not fin.valid and fin.problems == (2202,) and codes(out) == [2202]
    assert fin.data == data  # stored as received
    bad = b"GIF89a" + b"\x00" * 100
    out = feed(asm, [meta(dev, "g.jpg", bad, 64), *chunks(dev, "g.jpg", bad, 64)])
    (fin,) = kinds(out, FinalizeImage)
    assert fin.problems == (2203,) and codes(out) == [2203]


def test_conflicting_duplicate_is_2200_and_dropped():
    asm = Assembler(timing=TIMING)
    dev = "AABBCCDDEEFF"
    data = jpeg(3000, 7)
    other = bytes(reversed(data))
    out = feed(
        asm,
        [
            meta(dev, "h.jpg", data, 1024),
            chunk_msg(dev, "h.jpg", data, 1024, 0),
            chunk_msg(dev, "h.jpg", other, 1024, 0),
        ],
    )
    assert codes(out) == [2200] and out[0].details["reason"] == "conflicting_chunk"
    assert kinds(out, CaptureFailed)
    assert asm.is_idle() and asm.reserved_bytes == 0


def test_capacity_per_device_and_total():
    asm = Assembler(Limits(max_assemblies_per_device=2, max_assemblies_total=3), timing=TIMING)
    data = jpeg(2000, 8)
    out = feed(asm, [meta("AABBCCDDEEFF", f"{i}.jpg", data, 1024) for i in range(3)])
    assert codes(out) == [2200] and out[0].details["reason"] == "capacity"
    out = feed(
        asm, [meta("AABBCCDDEEF1", "x.jpg", data, 1024), meta("AABBCCDDEEF2", "x.jpg", data, 1024)]
    )
    assert codes(out) == [2200] and asm.active() == 3


def test_inflight_bytes_cap_refuses_before_allocating():
    asm = Assembler(Limits(max_inflight_bytes=10_000), timing=TIMING)
    data = jpeg(6000, 9)
    out = feed(
        asm, [meta("AABBCCDDEEFF", "a.jpg", data, 1024), meta("AABBCCDDEEF1", "a.jpg", data, 1024)]
    )
    assert codes(out) == [2200] and asm.reserved_bytes == 6000


def test_metadata_restart_and_duplicate_metadata():
    asm = Assembler(timing=TIMING)
    dev = "AABBCCDDEEFF"
    d1, d2 = jpeg(3000, 10), jpeg(2500, 11)
    feed(asm, [meta(dev, "r.jpg", d1, 1024), chunk_msg(dev, "r.jpg", d1, 1024, 0)])
    feed(asm, [meta(dev, "r.jpg", d1, 1024, temperature=30.0)])  # same image, updated
    out = feed(asm, [meta(dev, "r.jpg", d2, 1024), *chunks(dev, "r.jpg", d2, 1024)])
    (fin,) = kinds(out, FinalizeImage)
    assert fin.data == d2 and asm.stats["restarted"] == 1


def test_late_duplicates_after_finalize_are_ignored_then_resend_works():
    asm = Assembler(timing=TIMING)
    dev = "AABBCCDDEEFF"
    data = jpeg(2000, 12)
    msgs = [meta(dev, "z.jpg", data, 1024), *chunks(dev, "z.jpg", data, 1024)]
    assert kinds(feed(asm, msgs, 0.0), FinalizeImage)
    assert feed(asm, msgs[1:2], 0.1) == [] and asm.is_idle()
    assert asm.tick(50.0) == []
    # a full resend later (e.g. the device never got ACK_OK) finalizes again
    assert kinds(feed(asm, msgs, 60.0), FinalizeImage)


def test_status_message():
    asm = Assembler(timing=TIMING)
    out = receive_raw(
        asm,
        "ESP32CAM/AABBCCDDEEFF/status",
        b'{"device_id":"AABBCCDDEEFF","status":"Alive","pendingImg":3}',
        0,
    )
    assert out == [RecordStatus("AABBCCDDEEFF", "Alive", 3)]


def test_encoders_and_sanitizer():
    assert json.loads(encode_ack("a.jpg", "5:30PM")) == {
        "image_name": "a.jpg",
        "ACK_OK": {"next_wake_time": "5:30PM"},
    }
    assert json.loads(encode_nack("a.jpg", [5, 12])) == {
        "image_name": "a.jpg",
        "missing_chunks": [5, 12],
    }
    assert sanitize_image_name("../../etc/passwd") == "passwd"
    assert sanitize_image_name("..") == "image"
    assert sanitize_image_name("a b$c.jpg") == "a_b_c.jpg"
    assert "/" not in sanitize_image_name("x/../..\\y")


# --- property: arbitrary fleets, orders, losses, duplicates -----------------------------

images_st = st.lists(
    st.tuples(st.integers(4, 600), st.integers(1, 200)),  # (size, chunk size)
    min_size=1,
    max_size=3,
)
fleet_st = st.lists(images_st, min_size=1, max_size=5)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fleet=fleet_st,
    seed=st.integers(0, 2**32 - 1),
    drop_p=st.sampled_from([0.0, 0.05, 0.3]),
    dup_p=st.sampled_from([0.0, 0.1, 0.5]),
    lost_forever=st.booleans(),
    answer_nacks=st.booleans(),
    early_cap=st.sampled_from([2, 64]),
)
def test_fleet_property(fleet, seed, drop_p, dup_p, lost_forever, answer_nacks, early_cap):
    rnd = random.Random(seed)
    limits = Limits(max_early_chunks_per_device=early_cap, max_inflight_bytes=1_000_000)
    asm = Assembler(limits, TIMING)
    originals = {}
    streams = []
    never = set()  # (dev, name, chunk id) the device will never deliver
    seen = set()  # images of which at least one message reached the worker
    meta_kept = set()  # images whose metadata reached the worker
    for d, imgs in enumerate(fleet):
        dev = f"AABBCCDD{d:04X}"
        for j, (size, csize) in enumerate(imgs):
            name = f"img_{j}.jpg"
            data = jpeg(size, rnd.randrange(1 << 30))
            originals[(dev, name)] = (data, csize)
            msgs = [meta(dev, name, data, csize)] + chunks(dev, name, data, csize)
            # shuffle locally (QoS 1 reorders a little), duplicate, drop
            out = []
            for m in msgs:
                if rnd.random() < dup_p:
                    out.append(m)
                out.append(m)
            for i in range(len(out) - 1):
                if rnd.random() < 0.3:
                    out[i], out[i + 1] = out[i + 1], out[i]
            kept = []
            for m in out:
                body = json.loads(m[1])
                if rnd.random() < drop_p:
                    if lost_forever and "chunk_id" in body:
                        never.add((dev, name, body["chunk_id"]))
                    continue
                kept.append(m)
                seen.add((dev, name))
                if "chunk_id" not in body:
                    meta_kept.add((dev, name))
            streams.append(kept)
    # interleave devices and images
    events = []
    idx = [0] * len(streams)
    while any(i < len(s) for i, s in zip(idx, streams, strict=True)):
        k = rnd.choice([n for n, s in enumerate(streams) if idx[n] < len(s)])
        events.append(streams[k][idx[k]])
        idx[k] += 1

    done, failed = {}, {}
    now = 0.0
    peak_reserved = 0

    def handle(actions):
        pending = []
        for a in actions:
            if isinstance(a, FinalizeImage):
                assert (a.device_id, a.image_name) not in done
                done[(a.device_id, a.image_name)] = a
            elif isinstance(a, RecordError):
                assert a.code in SEVERITY
                if a.image_name is not None:
                    failed.setdefault((a.device_id, a.image_name), []).append(a.code)
            elif isinstance(a, SendNack) and answer_nacks:
                data, csize = originals[(a.device_id, a.image_name)]
                for cid in a.missing_chunks:
                    if (a.device_id, a.image_name, cid) not in never:
                        pending.append(chunk_msg(a.device_id, a.image_name, data, csize, cid))
        return pending

    def check_bounds():
        nonlocal peak_reserved
        assert asm.reserved_bytes <= limits.max_inflight_bytes
        assert asm.buffered_bytes <= asm.reserved_bytes + asm.early_bytes
        assert asm.early_bytes <= limits.max_early_bytes_total
        assert asm.active() <= limits.max_assemblies_total
        peak_reserved = max(peak_reserved, asm.reserved_bytes)

    queue = list(events)
    while True:
        while queue:
            topic, payload = queue.pop(0)
            now += 0.001
            queue += handle(receive_raw(asm, topic, payload, now))
            check_bounds()
        nd = asm.next_deadline()
        if nd is None:
            break
        now = max(now, nd)
        queue += handle(asm.tick(now))
        check_bounds()
        if asm.is_idle() and not queue:
            break
    assert asm.is_idle() and asm.reserved_bytes == 0 and asm.early_bytes == 0

    for key, (data, _) in originals.items():
        # every image completes byte-identical or ends in a coded error
        if key not in seen:
            continue  # nothing reached the worker: the device resends, no ACK was sent
        assert key in done or key in failed, key
        if key in done:
            assert done[key].data == data and done[key].valid
        deliverable = answer_nacks and key in meta_kept and not any(k[:2] == key for k in never)
        if deliverable and early_cap == 64:
            assert key in done, (key, failed.get(key))


def test_forget_drops_only_the_named_devices_images_silently():
    """A replica that lost a partition forgets its devices' half-built images (and
    chunks held before their metadata): no NACK, error or capture for them later,
    while the other devices' images carry on."""
    asm = Assembler(Limits(), TIMING)
    data = jpeg(3000, 1)
    for dev in ("AABBCC000001", "AABBCC000002"):
        receive_raw(asm, *meta(dev, "a.jpg", data, 1000), now=0.0)
        receive_raw(asm, *chunk_msg(dev, "a.jpg", data, 1000, 0), now=0.0)
    receive_raw(asm, *chunk_msg("AABBCC000001", "early.jpg", data, 1000, 1), now=0.0)
    assert asm.devices_in_assembly() == {"AABBCC000001", "AABBCC000002"}

    assert asm.forget(lambda device: device == "AABBCC000001") == 2
    assert not asm.in_assembly("AABBCC000001", "a.jpg")
    assert asm.in_assembly("AABBCC000002", "a.jpg")
    assert asm.devices_in_assembly() == {"AABBCC000002"}
    later = asm.tick(100.0)  # past every retransmit and the capture timeout
    assert later and all(getattr(a, "device_id", None) == "AABBCC000002" for a in later)
