"""Property: no message a device can send stops the fleet's ingest, and every bad one is
recorded (issue 12, "Done when": the property-based test).

Hypothesis generates, per example, one device's stream of hostile messages on its
status, data and ack topics: JSON of odd types, NaN/Infinity, NUL and lone surrogates
in values and keys, numbers too large for any column, invalid UTF-8, nesting past the
parser's depth, wrong base64, oversized messages.  Interleaved with them the same
device sends one real image whose chunks arrive out of order (some twice), under a
name that may sanitize to nothing (``?``, ``日本``, ``..``), sometimes with poison
values in its metadata.  All of it goes through a RUNNING assembler on a private
broker and PostgreSQL, and for every example:

* the real image is ACKed and stored byte for byte;
* every bad message left a `device_errors` row with the code it was built to produce
  (the oracle is how the message was made, not the parser under test); accepted
  messages with normalized values leave a 2101 warning, and their status row;
* after all examples a registered, well-behaved device is still stored and ACKed,
  no worker thread died and no message ended as an internal error.

Bounded: 25 examples of at most 12 hostile messages each, ~30 s on a loaded 2-core box.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import itertools
import json
import math
import os
import queue
import time
import uuid

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from camfleet.protocol import assembler as core
from services.assembler import AssemblerService, ServiceConfig
from tests.helpers import rows, wait_for
from tests.test_mqtt_ingest import FAST, broker_block, jpeg
from tests.test_mqtt_isolation import healthy_device_still_works, register

EXAMPLES = int(os.environ.get("CAMFLEET_HOSTILE_EXAMPLES", "25"))  # more: a longer hunt
CHUNK = 512
WARN = (2101, "warn")  # accepted, with values normalized


# -- the hostile messages, each with the row it must leave -------------------------------

odd_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["\x00", "\ud800", "a\x00b", "\udfff\ud800", "日本", "?", "_"]),
)
odd_values = st.recursive(
    odd_scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=8,
)
not_a_string = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(odd_scalars, max_size=2),
    st.dictionaries(st.text(max_size=3), odd_scalars, max_size=2),
)
not_a_count = st.one_of(
    not_a_string.filter(lambda v: not (isinstance(v, int) and not isinstance(v, bool))),
    st.integers(min_value=10**12, max_value=10**40),
    st.integers(max_value=0, min_value=-(10**40)),
    st.text(alphabet="0123456789", min_size=1, max_size=6),  # "42": a string, not a count
)
poison = st.sampled_from([float("nan"), float("inf"), -float("inf"), "a\x00b", "x\ud800y"])
printable_names = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")),
    min_size=1,
    max_size=24,
).filter(str.isprintable)
# names a storage key cannot keep: they must be stored under a hashed name
EMPTY_WHEN_SANITIZED = ["?", "é", "日本", "_", "..", "/", " ", "...jpg/", "\\"]


def dumps(v) -> bytes:
    """JSON as a device might send it: NaN/Infinity literals, \\u escapes for NUL and
    lone surrogates (json.dumps writes them, a device's printf can too)."""
    return json.dumps(v, ensure_ascii=True).encode()


@st.composite
def hostile(draw, dev: str) -> tuple[str, bytes, tuple[int, str] | None]:
    """(topic kind, payload, the (code, severity) row it must leave, or None)."""
    case = draw(
        st.sampled_from(
            [
                "garbage",
                "huge_digits",
                "too_deep",
                "too_big",
                "not_an_object",
                "device_id",
                "status_type",
                "pending",
                "status_poison",
                "status_too_deep",
                "name",
                "declaration",
                "sensor_type",
                "error_field",
                "chunk_id",
                "bad_base64",
                "payload_type",
                "no_payload",
                "ack",
            ]
        )
    )
    name = draw(printable_names.filter(lambda n: len(n) <= core.MAX_IMAGE_NAME_LEN))
    kind = draw(st.sampled_from(["data", "status"]))
    err = (2101, "error")
    if case == "garbage":
        raw = draw(
            st.sampled_from(
                [b"{not json", b"\xff\xfe\xfd", b'{"device_id":', b"", b"\x00", b"{'a': 1}"]
            )
            | st.binary(max_size=40).filter(lambda b: not _is_json(b))
        )
        return kind, raw, err
    if case == "huge_digits":  # past Python's int digit limit: refused as JSON
        digits = b"9" * draw(st.integers(5000, 9000))
        return kind, b'{"device_id":"' + dev.encode() + b'","status":"ok","n":' + digits + b"}", err
    if case == "too_deep":  # past the interpreter's recursion limit
        depth = draw(st.integers(3000, 6000))
        return kind, b"[" * depth + b"]" * depth, err
    if case == "too_big":
        return kind, dumps({"device_id": dev, "status": "x" * (core.MAX_MESSAGE_BYTES + 10)}), err
    if case == "not_an_object":
        value = draw(st.one_of(odd_scalars, st.lists(odd_values, max_size=3)))
        return kind, dumps(value), err
    if case == "device_id":
        other = draw(not_a_string | st.sampled_from(["", "someone-else", dev.lower() + "x"]))
        return kind, dumps({"device_id": other, "status": "ok", "image_name": "a.jpg"}), err
    if case == "status_type":
        value = draw(
            not_a_string
            | st.text(st.characters(codec="ascii"), min_size=65, max_size=80).filter(
                lambda t: "\x00" not in t
            )
        )
        return "status", dumps({"device_id": dev, "status": value}), err
    if case == "pending":
        value = draw(not_a_count.filter(lambda v: v is not None))
        return "status", dumps({"device_id": dev, "status": "ok", "pendingImg": value}), err
    if case == "status_poison":  # accepted: the row is written, the values normalized
        body = {"device_id": dev, "status": "Alive", "pendingImg": 1}
        key = draw(st.sampled_from(["x", "k\x00ey", "\ud800"]))
        body[key] = draw(poison | st.lists(poison, min_size=1, max_size=3))
        return "status", dumps(body), WARN
    if case == "status_too_deep":  # parsed, but nested deeper than jsonb rows should be
        nested: object = 1
        for _ in range(core.MAX_JSON_DEPTH + draw(st.integers(1, 20))):
            nested = [nested]
        return "status", dumps({"device_id": dev, "status": "ok", "n": nested}), WARN
    if case == "name":
        bad = draw(
            not_a_string
            | st.sampled_from(["", "a\x00b", "\ud800", "new\nline", "bell\x07", "x" * 129])
        )
        body = {"device_id": dev, "image_name": bad, "image_size": 10, "total_chunk_count": 1}
        return "data", dumps(body), err
    if case == "declaration":
        field = draw(st.sampled_from(["image_size", "total_chunk_count"]))
        body = {"device_id": dev, "image_name": name, "image_size": 2048, "total_chunk_count": 4}
        body[field] = draw(not_a_count)
        return "data", dumps(body), err
    if case == "sensor_type":
        field = draw(st.sampled_from(["temperature", "humidity", "pressure", "gas_resistance"]))
        value = draw(
            st.one_of(st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=2))
        )
        body = {"device_id": dev, "image_name": name, "image_size": 1000, "total_chunk_count": 2}
        body[field] = value
        return "data", dumps(body), err
    if case == "error_field":
        value = draw(
            st.one_of(
                st.text(min_size=1, max_size=5),
                st.floats(allow_nan=False, allow_infinity=False).filter(bool),
                st.integers(min_value=2**31, max_value=10**40),
                st.integers(max_value=-(2**31) - 1, min_value=-(10**40)),
            )
        )
        body = {"device_id": dev, "image_name": name, "image_size": 0, "error": value}
        return "data", dumps(body), err
    chunk = {"device_id": dev, "image_name": name, "chunk_id": 0, "payload": "QUJD"}
    if case == "chunk_id":
        chunk["chunk_id"] = draw(
            not_a_string.filter(lambda v: not (isinstance(v, int) and not isinstance(v, bool)))
            | st.integers(min_value=core.MAX_CHUNKS, max_value=10**40)
            | st.integers(max_value=-1, min_value=-(10**40))
        )
        return "data", dumps(chunk), err
    if case == "bad_base64":
        good = base64.b64encode(draw(st.binary(min_size=1, max_size=30))).decode()
        at = draw(st.integers(0, len(good)))
        chunk["payload"] = good[:at] + draw(st.sampled_from("!*@#%$&~^")) + good[at:]
        return "data", dumps(chunk), (2103, "error")
    if case == "payload_type":
        value = draw(not_a_string.filter(lambda v: v is not None))
        chunk["payload"] = value
        if isinstance(value, float) and not math.isfinite(value):
            return "data", dumps(chunk), (2102, "warn")  # NaN is normalized to null
        return "data", dumps(chunk), (2103, "error")
    if case == "no_payload":
        if draw(st.booleans()):
            del chunk["payload"]
        else:
            chunk["payload"] = draw(st.sampled_from(["", None]))
        return "data", dumps(chunk), (2102, "warn")
    # case == "ack": whatever comes back on the ack topic is not ours to record, and
    # must not stop anything either
    value = draw(odd_values | st.binary(max_size=30).map(lambda b: b))
    payload = value if isinstance(value, bytes) else dumps(value)
    if b"ACK_OK" in payload or b"missing_chunks" in payload:
        payload = b"{}"
    return "ack", payload, None


def _is_json(b: bytes) -> bool:
    try:
        json.loads(b)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    return True


@dataclasses.dataclass
class Session:
    messages: list[tuple[str, bytes, tuple[int, str] | None]]
    good: str
    image: bytes = dataclasses.field(repr=False)
    expected: list[tuple[int, str]]
    accepted_status: int


@st.composite
def device_session(draw, dev: str) -> Session:
    """One device's messages: a real image in shuffled chunks (some resent), interleaved
    with hostile messages.  Returns (messages, good name, image bytes, expected rows,
    accepted status messages)."""
    good = draw(st.sampled_from(EMPTY_WHEN_SANITIZED) | printable_names)
    data = jpeg(draw(st.integers(600, 3000)), draw(st.integers(0, 255)))
    total = (len(data) + CHUNK - 1) // CHUNK
    meta = {
        "device_id": dev,
        "image_name": good,
        "image_size": len(data),
        "total_chunk_count": total,
        "max_chunks_size": CHUNK,
        "capture_timeStamp": "2026-12-03T05:00:00Z",
        "temperature": 21.5,
    }
    expected: list[tuple[int, str]] = []
    if draw(st.booleans()):  # poison in the real image's metadata: stored, and warned
        field = draw(st.sampled_from(["temperature", "humidity", "extra"]))
        non_finite = st.sampled_from([float("nan"), float("inf"), -float("inf")])
        meta[field] = draw(poison if field == "extra" else non_finite)
        expected.append(WARN)
    chunks = [
        dumps(
            {
                "device_id": dev,
                "image_name": good,
                "chunk_id": i,
                "max_chunk_size": CHUNK,
                "payload": base64.b64encode(data[i * CHUNK : (i + 1) * CHUNK]).decode(),
            }
        )
        for i in range(total)
    ]
    # out of order, some twice; a few before the metadata (buffered as early chunks)
    order = draw(st.permutations(range(total)))
    again = draw(st.lists(st.sampled_from(range(total)), max_size=3))
    early = draw(st.integers(0, min(2, total - 1)))
    good_msgs = [("data", chunks[i], None) for i in order[:early]]
    good_msgs.append(("data", dumps(meta), None))
    good_msgs += [("data", chunks[i], None) for i in order[early:]]
    for i in again:  # QoS 1 redeliveries, anywhere after the metadata
        at = draw(st.integers(early + 1, len(good_msgs)))
        good_msgs.insert(at, ("data", chunks[i], None))

    bad = draw(st.lists(hostile(dev), min_size=1, max_size=12))
    # interleave, keeping each stream's own order
    slots = draw(st.permutations([0] * len(good_msgs) + [1] * len(bad)))
    streams = [iter(good_msgs), iter(bad)]
    messages = [next(streams[s]) for s in slots]
    accepted_status = 0
    for kind, payload, want in bad:
        if want is not None:
            expected.append(want)
        if kind == "status" and want == WARN:
            accepted_status += 1
    return Session(messages, good, data, expected, accepted_status)


# -- the running service --------------------------------------------------------------------


class AckWatch:
    """Everything published on ESP32CAM/+/ack, raw, per device (hostile bytes included)."""

    def __init__(self, broker):
        self.queues: dict[str, queue.SimpleQueue] = collections.defaultdict(queue.SimpleQueue)
        self.c = broker.client(client_id=f"acks-{uuid.uuid4().hex[:8]}")
        subscribed = queue.SimpleQueue()
        self.c.on_connect = lambda c, u, f, rc, p=None: c.subscribe("ESP32CAM/+/ack", qos=1)
        self.c.on_subscribe = lambda *a: subscribed.put(True)
        self.c.on_message = lambda c, u, m: self.queues[m.topic.split("/")[1]].put(m.payload)
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        subscribed.get(timeout=20)

    def ack_ok(self, dev: str, name: str, timeout: float = 30) -> dict | None:
        """The first ACK_OK for this image (NACKs and hostile bytes skipped)."""
        end = time.monotonic() + timeout
        q = self.queues[dev]
        while (left := end - time.monotonic()) > 0:
            try:
                raw = q.get(timeout=left)
            except queue.Empty:
                return None
            try:
                msg = json.loads(raw)
            except (ValueError, UnicodeDecodeError, RecursionError):
                continue
            if isinstance(msg, dict) and msg.get("image_name") == name and "ACK_OK" in msg:
                return msg
        return None

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def running(mosquitto, database_url, tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # the ACK path needs no Prefect
    b = broker_block(mosquitto)
    register(database_url, "600D00000001")
    cfg = ServiceConfig(
        database_url=database_url,
        storage_url=f"file://{tmp_path / 'objects'}",
        timing=FAST,
        client_id=f"prop-{uuid.uuid4().hex[:8]}",
        new_device_burst=10_000,  # every example (and every shrink) is a new device
    )
    svc = AssemblerService(b, cfg)
    svc.start()
    try:
        assert svc.wait_connected(30)
        yield svc, b
    finally:
        svc.stop(timeout=30)


def test_hostile_streams_are_recorded_and_never_stop_ingest(running, database_url, tmp_path):
    svc, b = running
    acks = AckWatch(b)
    pub = b.client(client_id=f"hostile-{uuid.uuid4().hex[:8]}")
    pub.max_inflight_messages_set(100)
    pub.connect(b.host, b.port)
    pub.loop_start()
    serial = itertools.count()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,  # examples run against this test's own database
        phases=[Phase.explicit, Phase.generate],  # no shrinking: every rerun waits on I/O
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def one_device(data):
        dev = f"H057{next(serial):08d}"
        session = data.draw(device_session(dev))
        good = session.good
        sent = [pub.publish(f"ESP32CAM/{dev}/{k}", p, qos=1) for k, p, _ in session.messages]
        for info in sent:
            info.wait_for_publish(20)

        ack = acks.ack_ok(dev, good)
        assert ack is not None, f"{good!r} never ACKed"
        ((path, status),) = rows(
            database_url,
            "select storage_path, ingest_status from captures"
            " where device_id = %s and device_capture_id = %s",
            dev,
            good,
        )
        assert status == "stored" and (tmp_path / "objects" / path).read_bytes() == session.image

        want = collections.Counter(session.expected)

        def missing():
            got = rows(
                database_url,
                "select error_code, severity from device_errors where device_id = %s",
                dev,
            )
            return want - collections.Counter(got)

        wait_for(lambda: not missing(), timeout=30, step=0.05)
        assert not missing(), f"no device_errors row for {missing()}"
        status_rows = "select count(*) from device_status where device_id = %s"
        wait_for(
            lambda: rows(database_url, status_rows, dev)[0][0] >= session.accepted_status,
            timeout=30,
            step=0.05,
        )
        assert rows(database_url, status_rows, dev)[0][0] == session.accepted_status
        assert svc.crashed is None and svc.stats["internal_errors"] == 0

    try:
        one_device()
    finally:
        pub.disconnect()
        pub.loop_stop()
        acks.close()
    healthy_device_still_works(b, database_url, name="after-hostile.jpg")
    assert all(t.is_alive() for t in svc._threads) and svc.crashed is None
    assert svc.stats["internal_errors"] == 0 and svc.stats["rows_quarantined"] == 0
