"""Hostile input against every parser a device can reach, without I/O (issue #9).

Each parser must answer arbitrary and adversarial input with the error type its module
documents, never anything else, and keep memory bounded:

- MQTT ingest (camfleet/protocol/assembler.py): `parse_message` -> Message or
  ProtocolError carrying a 2101/2102/2103 RecordError; the service's path (parse_message,
  then `Assembler.receive`) never raises.
- Edge batch (camfleet/protocol/edge_batch.py): `parse_url_request` -> UrlRequest or
  RequestRefused; `DeviceBatch.on_answer/on_verification` ignore what is not theirs.
- ento.conf (camfleet/edge/config.py): EdgeConfig or ConfigError.
- Event JSON (camfleet/uploader/jobs.py): dict/Job or BadInput.
- Keys (camfleet/keys.py): a safe name/key or BadName.
- The device API (in-process app, real PostgreSQL): wrong tokens -> 401/429, never 500.

The gaps this suite found (nested JSON, ento.conf types, dot-file names) are fixed;
their tests guard the fixes (docs/security.md).
"""

from __future__ import annotations

import json
import re
import string
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from camfleet import keys
from camfleet.edge import config as ento
from camfleet.protocol import assembler as asm
from camfleet.protocol import edge_batch as eb
from camfleet.uploader import jobs

# derandomize: the same examples every run, so CI never meets a new one by chance;
# widen max_examples locally to explore.
FAST = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Peak traced heap allowed while a parser chews through thousands of hostile inputs.
# Each single input is capped by the module (16 KiB MQTT, 32 KiB request, 64 KiB conf,
# 1 MiB event JSON); 8 MiB leaves room for Python's own overhead and nothing else, so
# anything that accumulates per input (a leak, an unbounded buffer) trips it.
PARSER_PEAK_BYTES = 8 * 1024 * 1024

# Deep enough to exceed Python's recursion limit (1000) inside json.loads, small enough
# to fit every module's byte cap (16 KiB is the smallest).
DEEP_NESTING = 5000

SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
DEV = "abcd1234"


def receive_raw(core, topic, payload, now):
    """A raw MQTT message the way the assembler service feeds it to the core."""
    try:
        msg = asm.parse_message(topic, payload, core.limits)
    except asm.ProtocolError as exc:
        return [exc.record]
    return core.receive(msg, now)


hostile_text = st.one_of(
    st.text(max_size=200),
    st.sampled_from(
        [
            "",
            ".",
            "..",
            "../x.jpg",
            "..\\x.jpg",
            "a/../../etc/passwd",
            "/etc/passwd",
            "a\x00b.jpg",
            "x" * 5000,
            "\u202eexe.jpg",
            "ｆｕｌｌ.jpg",
            "e\u0301.jpg",
            "\ufeffa.jpg",
            "CON",
            ".hidden",
            "%2e%2e%2fx",
            "a\nb",
            "💥.jpg",
        ]
    ),
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    hostile_text,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(hostile_text, inner, max_size=5),
    max_leaves=20,
)
raw_bytes = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda v: json.dumps(v).encode(), json_values),
    # truncated JSON: a valid document cut anywhere
    st.builds(
        lambda v, f: json.dumps(v).encode()[: max(0, int(len(json.dumps(v)) * f))],
        json_values,
        st.floats(0, 1),
    ),
    st.sampled_from(
        [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"9" * 5000, b"\xff\xfe", b"{" * 10]
    ),
)


def _deep(prefix: bytes = b"") -> bytes:
    return prefix + b"[" * DEEP_NESTING + b"]" * DEEP_NESTING


def peak_bytes(fn, inputs) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        for item in inputs:
            fn(item)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------------------------------
# camfleet.keys
# ---------------------------------------------------------------------------------------


@FAST
@given(hostile_text)
def test_sanitize_name_is_one_safe_component_or_badname(name):
    try:
        out = keys.sanitize_name(name)
    except keys.BadName:
        return
    assert SAFE_NAME.match(out) and out not in (".", "..")
    assert len(out) <= keys.MAX_NAME_LEN
    assert keys.object_key("devices", "d1", out).count("/") == 2


@pytest.mark.parametrize("name", [":.0", "_.x"])
def test_sanitize_name_never_returns_a_dot_file(name):
    try:
        out = keys.sanitize_name(name)
    except keys.BadName:
        return
    assert not out.startswith(".")


@FAST
@given(st.one_of(hostile_text, json_scalars))
def test_safe_id_accepts_only_the_id_alphabet(value):
    try:
        out = keys.safe_id(value)
    except keys.BadName:
        return
    assert out == value and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}", out)


@FAST
@given(st.lists(hostile_text, min_size=1, max_size=4))
def test_object_key_never_escapes(parts):
    try:
        key = keys.object_key(*parts)
    except keys.BadName:
        return
    pieces = key.split("/")
    assert all(p not in ("", ".", "..") and "\x00" not in p and "\\" not in p for p in pieces)


@pytest.mark.parametrize(
    "key",
    [
        "devices/d1/../d2/x.jpg",
        "devices/d1/./x.jpg",
        "devices/d1//x.jpg",
        "devices/d1",
        "devices/d1/",
        "devices/d10/x.jpg",
        "devices/d2/x.jpg",
        "/devices/d1/x.jpg",
        "devices/d1/x\x00.jpg",
        "devices/d1\\..\\d2/x.jpg",
    ],
)
def test_key_within_refuses_keys_outside_a_device_prefix(key):
    # moto's S3 server does not enforce presigned policies: this check is the guard.
    assert not keys.key_within(key, "devices/d1")


# ---------------------------------------------------------------------------------------
# MQTT ingest: camfleet/protocol/assembler.py
# ---------------------------------------------------------------------------------------

PARSER_CODES = {2101, 2102, 2103}
topics = st.one_of(
    st.sampled_from([f"ESP32CAM/{DEV}/data", f"ESP32CAM/{DEV}/status", f"ESP32CAM/{DEV}/ack"]),
    st.builds(lambda d, k: f"ESP32CAM/{d}/{k}", hostile_text, st.sampled_from(["data", "x"])),
    hostile_text,
)


def _check_parse(topic, payload):
    try:
        msg = asm.parse_message(topic, payload)
    except asm.ProtocolError as exc:
        assert exc.record.code in PARSER_CODES
        assert exc.record.severity in ("error", "warn")
        return None
    assert msg.device_id == topic.split("/")[1]
    return msg


@FAST
@given(topics, raw_bytes)
def test_mqtt_parse_answers_a_message_or_a_coded_error(topic, payload):
    _check_parse(topic, payload)


field_values = st.one_of(
    json_scalars, st.integers(min_value=-(2**63), max_value=2**70), st.just([1]), st.just({})
)


@FAST
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "device_id",
                "image_name",
                "image_size",
                "total_chunk_count",
                "max_chunks_size",
                "chunk_id",
                "payload",
                "capture_timeStamp",
                "temperature",
                "location",
                "error",
            ]
        ),
        field_values,
    ),
    st.booleans(),
)
def test_mqtt_wrong_types_and_huge_numbers_are_coded_errors(body, own_id):
    if own_id:
        body["device_id"] = DEV
    msg = _check_parse(f"ESP32CAM/{DEV}/data", json.dumps(body).encode())
    if isinstance(msg, asm.MetadataMessage):
        assert 0 < msg.image_size <= asm.MAX_IMAGE_BYTES
        assert 0 < msg.total_chunk_count <= asm.MAX_CHUNKS
    if isinstance(msg, asm.ChunkMessage):
        assert 0 <= msg.chunk_id < asm.MAX_CHUNKS and 0 < len(msg.data) <= asm.MAX_CHUNK_BYTES


@FAST
@given(st.text(string.ascii_letters + string.digits, min_size=4, max_size=32))
def test_mqtt_device_id_spoofing_between_topic_and_payload_is_refused(other):
    body = {"device_id": other, "image_name": "a.jpg", "image_size": 10, "total_chunk_count": 1}
    if other == DEV:
        return
    with pytest.raises(asm.ProtocolError) as exc:
        asm.parse_message(f"ESP32CAM/{DEV}/data", json.dumps(body).encode())
    assert exc.value.record.code == 2101
    assert exc.value.record.details["reason"] == "device_id_mismatch"


@pytest.mark.parametrize(
    "body,reason",
    [
        ({"image_size": asm.MAX_IMAGE_BYTES + 1, "total_chunk_count": 2000}, "image_too_large"),
        ({"image_size": 10**18, "total_chunk_count": 1}, "image_too_large"),
        ({"image_size": 4096, "total_chunk_count": asm.MAX_CHUNKS + 1}, "too_many_chunks"),
        ({"image_size": 10**6, "total_chunk_count": 1}, "inconsistent_declaration"),
        ({"image_size": 5, "total_chunk_count": 10}, "inconsistent_declaration"),
        ({"image_size": -1, "total_chunk_count": 1}, "image_too_large"),
    ],
)
def test_mqtt_oversized_declarations_are_refused_before_any_buffer(body, reason):
    body = {"device_id": DEV, "image_name": "a.jpg", **body}
    core = asm.Assembler()
    actions = receive_raw(core, f"ESP32CAM/{DEV}/data", json.dumps(body).encode(), 0.0)
    assert [(a.code, a.details["reason"]) for a in actions] == [(2101, reason)]
    assert core.active() == 0 and core.reserved_bytes == 0


def test_mqtt_oversized_message_is_refused_unparsed():
    payload = b'{"device_id":"' + DEV.encode() + b'","x":"' + b"A" * asm.MAX_MESSAGE_BYTES + b'"}'
    with pytest.raises(asm.ProtocolError) as exc:
        asm.parse_message(f"ESP32CAM/{DEV}/data", payload)
    assert exc.value.record.details["reason"] == "message_too_large"


def test_mqtt_deeply_nested_json_is_a_coded_error():
    with pytest.raises(asm.ProtocolError) as exc:
        asm.parse_message(f"ESP32CAM/{DEV}/data", _deep(b'{"device_id":'))
    assert exc.value.record.code == 2101


def _chunk(dev, name, cid, data=b"\xff\xd8xx"):
    import base64

    body = {"device_id": dev, "image_name": name, "chunk_id": cid}
    body["payload"] = base64.b64encode(data).decode()
    return f"ESP32CAM/{dev}/data", json.dumps(body).encode()


def _meta(dev, name, size, total):
    body = {"device_id": dev, "image_name": name, "image_size": size, "total_chunk_count": total}
    body["max_chunks_size"] = asm.MAX_CHUNK_BYTES
    return f"ESP32CAM/{dev}/data", json.dumps(body).encode()


@FAST
@given(
    st.lists(
        st.one_of(
            st.tuples(topics, raw_bytes),
            st.builds(
                _meta,
                st.sampled_from([DEV, "dev00002"]),
                hostile_text,
                st.integers(1, 10**7),
                st.integers(1, 5000),
            ),
            st.builds(
                _chunk,
                st.sampled_from([DEV, "dev00002"]),
                hostile_text,
                st.integers(-1, 5000),
            ),
        ),
        max_size=30,
    )
)
def test_assembler_never_raises_on_a_hostile_stream(stream):
    core = asm.Assembler()
    t = 0.0
    for topic, payload in stream:
        for action in receive_raw(core, topic, payload, t):
            if isinstance(action, asm.FinalizeImage):
                assert SAFE_NAME.match(action.safe_name) and not action.safe_name.startswith(".")
        t += 1.0
    core.tick(t + 3600)
    assert core.buffered_bytes <= core.limits.max_inflight_bytes


def test_assembler_memory_stays_bounded_under_a_flood_of_declarations_and_chunks():
    """5,000 devices each declaring a 4 MiB image and sending a few chunks, and early
    chunks for images never declared: the core's budgets cap what it holds."""
    limits = asm.Limits(max_inflight_bytes=4 * 1024 * 1024, max_early_bytes_total=1024 * 1024)
    core = asm.Assembler(limits=limits)
    chunk = b"\xff" * 2048

    def stream():
        for i in range(5000):
            dev = f"dev{i:05d}"
            yield _meta(dev, "big.jpg", asm.MAX_IMAGE_BYTES, asm.MAX_IMAGE_BYTES // 4096)
            yield _chunk(dev, "big.jpg", 0, chunk)
            yield _chunk(dev, f"early{i}.jpg", 3, chunk)

    def feed(item):
        receive_raw(core, item[0], item[1], 0.0)

    peak = peak_bytes(feed, stream())
    print(f"assembler flood: peak traced {peak / 2**20:.1f} MiB")
    assert core.buffered_bytes <= limits.max_inflight_bytes
    assert core.early_bytes <= limits.max_early_bytes_total
    assert peak < PARSER_PEAK_BYTES + limits.max_inflight_bytes + limits.max_early_bytes_total


# ---------------------------------------------------------------------------------------
# Edge batch: camfleet/protocol/edge_batch.py
# ---------------------------------------------------------------------------------------


@FAST
@given(raw_bytes)
def test_edge_request_is_parsed_or_refused(payload):
    try:
        req = eb.parse_url_request("ENTO-0001", payload)
    except eb.RequestRefused as exc:
        assert exc.reason.isprintable()
        return
    assert req.serial == "ENTO-0001"
    for spec in req.files:
        assert eb.check_device_name(spec.name) == spec.name
        key = eb.device_key("ENTO-0001", spec.name)
        folder, base = key.rsplit("/", 1)
        assert folder == "edge/ENTO-0001" and eb.check_name(base.replace("~", "_"))
        if eb.key_name(spec.name) != spec.name:
            assert "~" in base


@FAST
@given(
    st.lists(hostile_text, max_size=60),
    st.dictionaries(hostile_text, json_values, max_size=5) | json_scalars,
    st.one_of(st.just("ENTO-0001"), hostile_text),
)
def test_edge_request_names_sizes_and_serial(names, checksums, serial):
    body = {"device-serialID": serial, "bucket-name": "b", "files": names}
    body["checksums"] = checksums
    try:
        req = eb.parse_url_request("ENTO-0001", json.dumps(body).encode())
    except eb.RequestRefused:
        return
    assert serial == "ENTO-0001", "a request whose serial is not the topic's was accepted"
    assert len(req.files) + len(req.rejected) == len(names) <= eb.MAX_REQUEST_NAMES
    for spec in req.files:
        assert "/" not in spec.name and "\x00" not in spec.name and spec.name not in {".", ".."}
        if req.checked:
            assert 0 < spec.size <= eb.MAX_FILE_BYTES and len(spec.sha256) == 64
    for r in req.rejected:  # a usable name is echoed as is (the device matches on it)
        assert r.filename in names or (r.filename.isprintable() and len(r.filename) <= 80)


@pytest.mark.parametrize("name", ["../x.jpg", "a/b.jpg", "..", "a\x00.jpg", "\ud800.jpg", ""])
def test_edge_path_traversal_names_are_rejected_one_by_one(name):
    body = {"device-serialID": "ENTO-0001", "files": [name, "ok.jpg"]}
    req = eb.parse_url_request("ENTO-0001", json.dumps(body).encode())
    assert [f.name for f in req.files] == ["ok.jpg"]
    assert len(req.rejected) == 1


@pytest.mark.parametrize(
    "topic", ["cameraDevice/generateURL/../x", "cameraDevice/generateURL/a b", "x/y/z"]
)
def test_edge_request_topic_serial_is_validated(topic):
    with pytest.raises(eb.RequestRefused):
        eb.Topics().serial_from_request_topic(topic)


def test_edge_deeply_nested_request_is_refused():
    with pytest.raises(eb.RequestRefused):
        eb.parse_url_request("ENTO-0001", _deep())


def _batch():
    files = [eb.LocalFile("a.jpg", 10, "0" * 64), eb.LocalFile("b.jpg", 10, "1" * 64)]
    batch = eb.DeviceBatch("ENTO-0001", "b", files)
    batch.request(0.0)
    return batch


@FAST
@given(raw_bytes, json_values)
def test_edge_device_ignores_answers_and_verifications_that_are_not_its_own(payload, value):
    batch = _batch()
    before = dict(batch.states)
    assert batch.on_answer(payload) in (None, [])
    assert batch.on_verification(payload) == [] or json.loads(payload)["file"] in before
    forged = {"request-id": "not-ours", "files": [{"filename": "a.jpg", "url": value}]}
    assert batch.on_answer(json.dumps(forged).encode()) is None
    assert batch.states == before or any(s is eb.FileState.VERIFIED for s in batch.states.values())


def test_edge_answer_for_unrequested_or_traversal_names_uploads_nothing():
    batch = _batch()
    answer = {
        "request-id": batch.request_id,
        "files": [
            {"filename": "../../etc/passwd", "url": {"url": "http://127.0.0.1/", "fields": {}}},
            {"filename": "c.jpg", "url": {"url": "http://127.0.0.1/", "fields": {}}},
        ],
    }
    assert batch.on_answer(json.dumps(answer).encode()) == []
    assert batch.on_verification(b'{"file": "../a.jpg"}') == []


def test_edge_request_parser_memory_is_bounded():
    big = json.dumps({"device-serialID": "ENTO-0001", "files": ["x" * 200] * 140}).encode()
    inputs = [big[: eb.MAX_REQUEST_BYTES]] * 500 + [b"x" * (eb.MAX_REQUEST_BYTES + 1)] * 500

    def feed(payload):
        try:
            eb.parse_url_request("ENTO-0001", payload)
        except eb.RequestRefused:
            pass

    peak = peak_bytes(feed, inputs)
    print(f"edge request parser: peak traced {peak / 2**20:.2f} MiB over 1000 inputs")
    assert peak < PARSER_PEAK_BYTES


# ---------------------------------------------------------------------------------------
# ento.conf: camfleet/edge/config.py
# ---------------------------------------------------------------------------------------

GOOD_DEVICE = {
    "SERIAL_ID": "ENTO-0001",
    "STORAGE_PATH": "/media/buffer/",
    "ENDPOINT_URL": "127.0.0.1",
}


@FAST
@given(raw_bytes)
def test_ento_conf_bytes_load_or_config_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("conf") / "ento.conf"
    path.write_bytes(raw)
    try:
        cfg = ento.load_ento_conf(path)
    except ento.ConfigError:
        return
    keys.safe_id(cfg.serial)


@FAST
@given(
    st.dictionaries(
        st.sampled_from(["SERIAL_ID", "STORAGE_PATH", "ENDPOINT_URL", "BATCH_SIZE", "TLS"]),
        json_scalars,
    )
)
def test_ento_conf_required_keys_and_batch_size(device):
    try:
        cfg = ento.config_from_device_section({**GOOD_DEVICE, **device})
    except ento.ConfigError:
        return
    keys.safe_id(cfg.serial)
    assert 1 <= cfg.batch_size <= eb.MAX_REQUEST_FILES


def test_ento_conf_too_large_is_refused_unread(tmp_path):
    path = tmp_path / "ento.conf"
    path.write_bytes(b" " * (ento.MAX_CONFIG_BYTES + 1) + b"{}")
    with pytest.raises(ento.ConfigError, match="larger"):
        ento.load_ento_conf(path)


def test_ento_conf_error_never_shows_the_password(tmp_path):
    path = tmp_path / "ento.conf"
    device = {**GOOD_DEVICE, "SERIAL_ID": "../bad", "MQTT_PASSWORD": "hunter2-secret"}
    path.write_text(json.dumps({"device": device}))
    with pytest.raises(ento.ConfigError) as exc:
        ento.load_ento_conf(path)
    assert "hunter2" not in str(exc.value)
    cfg = ento.config_from_device_section({**GOOD_DEVICE, "MQTT_PASSWORD": "hunter2-secret"})
    assert "hunter2" not in repr(cfg) and "hunter2" not in repr(cfg.broker())


@pytest.mark.parametrize(
    "extra",
    [{"PORT": [1]}, {"PORT": "abc"}, {"IMAGE_REPO_PATH": 5}, "deep"],
    ids=["port-list", "port-text", "repo-int", "deep-nesting"],
)
def test_ento_conf_wrong_types_are_config_errors(tmp_path, extra):
    path = tmp_path / "ento.conf"
    if extra == "deep":
        path.write_bytes(_deep(b'{"device":'))
    else:
        path.write_text(json.dumps({"device": {**GOOD_DEVICE, **extra}}))
    try:
        ento.load_ento_conf(path)
    except Exception as exc:
        assert type(exc) is ento.ConfigError, type(exc).__name__
    else:
        pytest.fail("accepted")


# ---------------------------------------------------------------------------------------
# Event JSON: camfleet/uploader/jobs.py
# ---------------------------------------------------------------------------------------


@FAST
@given(raw_bytes, st.sampled_from(["evt-1", "e1"]))
def test_event_json_is_a_dict_or_bad_input(raw, event_id):
    try:
        data = jobs.parse_metadata(event_id, raw)
    except jobs.BadInput:
        return
    assert isinstance(data, dict)
    # An id inside the JSON is optional (the file name is the event id), never a different one.
    assert all(data[k] == event_id for k in jobs.EVENT_ID_KEYS if k in data)


@FAST
@given(json_values, st.one_of(st.just("evt-1"), hostile_text))
def test_event_json_id_spoofing_and_nul_are_bad_input(extra, claimed):
    raw = json.dumps({"eventId": claimed, "extra": extra}).encode()
    try:
        jobs.parse_metadata("evt-1", raw)
    except jobs.BadInput:
        return
    assert claimed == "evt-1"
    assert "\\u0000" not in raw.decode()


@pytest.mark.parametrize(
    "raw",
    [_deep(b'{"eventId":"evt-1","x":'), b'{"eventId":"evt-1","x":1e999}', b'{"eventId": NaN}'],
)
def test_event_json_deep_nesting_and_non_finite_numbers_are_bad_input(raw):
    with pytest.raises(jobs.BadInput):
        jobs.parse_metadata("evt-1", raw)


@FAST
@given(hostile_text)
def test_event_file_names_and_remote_paths_never_escape(name):
    try:
        event_id = jobs.event_id_from_name(name)
    except jobs.BadInput:
        return
    for suffix in (jobs.JSON_SUFFIX, jobs.VIDEO_SUFFIX):
        path = jobs.remote_path("/srv/events", event_id + suffix)
        assert path.startswith("/srv/events/") and path.count("/") == 3


@pytest.mark.parametrize("name", ["../x.mp4", "a/b.mp4", ".x.mp4", "a\x00.mp4", ""])
def test_remote_path_refuses_traversal(name):
    with pytest.raises(jobs.BadInput):
        jobs.remote_path("/srv/events", name)


def test_event_json_parser_memory_is_bounded():
    near_cap = b'{"eventId":"evt-1","x":"' + b"a" * (jobs.MAX_JSON_BYTES - 64) + b'"}'
    inputs = [near_cap] * 20 + [b"{" * 1000] * 200 + [b"x" * (jobs.MAX_JSON_BYTES + 1)] * 20

    def feed(raw):
        try:
            jobs.parse_metadata("evt-1", raw)
        except jobs.BadInput:
            pass

    peak = peak_bytes(feed, inputs)
    print(f"event JSON parser: peak traced {peak / 2**20:.2f} MiB over 240 inputs")
    assert peak < PARSER_PEAK_BYTES


# ---------------------------------------------------------------------------------------
# Device API: token brute force against the in-process app on a real PostgreSQL
# ---------------------------------------------------------------------------------------

# Failed activations allowed per address here, and guesses: three times the limit, so
# even a fixed window that turns over mid-test leaves most guesses answered 429.
ACTIVATE_FAIL_LIMIT = 20
BRUTE_FORCE_TRIES = 3 * ACTIVATE_FAIL_LIMIT


@pytest.fixture
def api(database_url, tmp_path):
    from fastapi.testclient import TestClient

    from camfleet.storage.local import LocalStore
    from services.api.app import create_app
    from services.api.ratelimit import RateLimits

    secret = b"hostile-input-secret-0123456789abcdef"
    app = create_app(
        database_url=database_url,
        secret_key=secret,
        processing_runs=None,
        store=LocalStore(tmp_path / "objects", public_url="http://testserver", secret=secret),
        rate_limits=RateLimits(activate_fail=f"{ACTIVATE_FAIL_LIMIT}/hour"),
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


token_guesses = st.one_of(
    st.text(max_size=300),
    st.builds(lambda s: "devtok_" + s, st.text(string.ascii_letters + "-_", max_size=60)),
    st.sampled_from(["", "devtok_", "devtok_" + "A" * 43, "Bearer x", "\x00", "é" * 50]),
)


def test_device_token_brute_force_gets_401_never_500(api):
    body = {"filename": "a.jpg", "content_type": "image/jpeg", "seq": 1}
    codes = []
    for i in range(BRUTE_FORCE_TRIES):
        token = "devtok_" + f"{i:043d}" if i % 2 else f"guess-{i}-\u00e9"
        try:
            r = api.post("/devices/upload-url", json=body, headers={"X-Device-Token": token})
        except UnicodeEncodeError:
            continue  # a client cannot even send a non-latin-1 header
        codes.append(r.status_code)
    assert codes and set(codes) <= {401, 429}, codes


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(token=token_guesses, body=json_values)
def test_device_api_hostile_tokens_and_bodies_never_500(api, token, body):
    try:
        token.encode("ascii")
    except UnicodeEncodeError:
        return  # not sendable as an HTTP header
    if "\r" in token or "\n" in token or "\x00" in token:
        return
    r = api.post("/devices/upload-url", json=body, headers={"X-Device-Token": token})
    assert r.status_code in (401, 422, 400, 413, 429), (r.status_code, r.text[:200])


def test_pairing_code_brute_force_is_limited_never_500(api):
    codes = [
        api.post("/devices/activate", json={"pairing_code": f"{i:08d}"}).status_code
        for i in range(BRUTE_FORCE_TRIES)
    ]
    assert set(codes) <= {400, 429}, codes
    assert codes.count(429) >= BRUTE_FORCE_TRIES - 2 * ACTIVATE_FAIL_LIMIT, codes


# ---------------------------------------------------------------------------------------
# Every device-API route with a body: arbitrary bytes and JSON (issue 13, item 5)
# ---------------------------------------------------------------------------------------

BODY_ROUTES = (
    "/v1/captures",
    "/v1/devices/HOSTILE1/trigger",
    "/devices/pair",
    "/devices/activate",
    "/devices/upload-url",
    "/devices/ingest",
    "/devices/rotate-token",
)


def _stored_objects(api) -> set[str]:
    root = api.app.state.store.root
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and ".tmp" not in p.relative_to(root).parts
    }


def _db_counts(api) -> tuple[int, int, int]:
    from tests.test_api_commands_helpers import fetch

    dsn = api.app.state.database_url
    return fetch(
        dsn,
        "SELECT (SELECT count(*) FROM captures), (SELECT count(*) FROM devices),"
        " (SELECT count(*) FROM scheduled_triggers)",
    )[0]


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(raw=st.one_of(raw_bytes, st.just(_deep()), st.just(_deep(b'{"a":'))))
def test_every_body_route_refuses_hostile_bodies_before_auth_without_5xx(api, raw):
    before = _db_counts(api), _stored_objects(api)
    for path in BODY_ROUTES:
        r = api.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:200])
    # nothing written for a caller without credentials
    assert (_db_counts(api), _stored_objects(api)) == before


def _credentials(api) -> dict:
    """A paired device's token and its owner's key, made once per test (the fixture
    outlives hypothesis examples)."""
    creds = getattr(api, "creds", None)
    if creds is None:
        from tests.test_api_commands_helpers import add_device

        user_key = _user_key(api)
        r = api.post("/devices/pair", json={"name": "h"}, headers={"Authorization": user_key})
        r = api.post("/devices/activate", json={"pairing_code": r.json()["pairing_code"]})
        device_id, token = r.json()["device_id"], r.json()["device_token"]
        add_device(api.app.state.database_url, "HOSTILE1")
        creds = api.creds = {"device_id": device_id, "token": token, "user": user_key}
    return creds


def _user_key(api) -> str:
    from camfleet import db, tokens

    key = tokens.new_user_key()
    with db.transaction(api.app.state.database_url) as conn:
        db.queries.devices_create_user(conn, user_id="hostile", name="hostile")
        db.queries.devices_create_user_key(
            conn,
            user_id="hostile",
            key_hash=tokens.hash_user_key(api.app.state.secret_key, key),
            label="t",
        )
    return f"Bearer {key}"


def _valid_bodies(device_id: str) -> dict[str, dict]:
    from tests.test_api_commands_helpers import capture_body

    return {
        "/v1/captures": capture_body(device_id, None),
        "/v1/devices/HOSTILE1/trigger": {"label": "x", "ttl_seconds": 60},
        "/devices/pair": {"name": "cam"},
        "/devices/upload-url": {"filename": "a.jpg", "content_type": "image/jpeg", "seq": 1},
        "/devices/ingest": {"object_key": f"devices/{device_id}/a.jpg", "seq": 1},
    }


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    route=st.sampled_from(sorted(_valid_bodies("x"))),
    field_index=st.integers(0, 10),
    value=st.one_of(
        json_values,
        st.sampled_from(
            [
                "0001-01-01T00:00:00+05:00",
                "9999-12-31T23:59:59-05:00",
                "a\x00b",
                {"a\x00b": "\x00"},
                2**64,
                -(2**63) - 1,
            ]
        ),
    ),
)
def test_authenticated_hostile_fields_get_4xx_and_leave_no_orphan(api, route, field_index, value):
    creds = _credentials(api)
    body = _valid_bodies(creds["device_id"])[route]
    field = sorted(body)[field_index % len(body)]
    body[field] = value
    headers = {"X-Device-Token": creds["token"], "Authorization": creds["user"]}
    if route.startswith("/v1/devices"):
        headers.pop("X-Device-Token")
    r = api.post(route, content=json.dumps(body).encode(), headers=headers)
    assert r.status_code < 500, (route, field, r.status_code, r.text[:200])
    # every capture object has its row: nothing written for a refused request
    from tests.test_api_commands_helpers import fetch

    rows = {
        p for (p,) in fetch(api.app.state.database_url, "SELECT storage_path FROM captures") if p
    }
    assert {o for o in _stored_objects(api) if o.startswith("captures/")} <= rows
