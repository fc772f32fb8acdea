"""The sans-IO edge batch core: request validation, answers, device batch states."""

from __future__ import annotations

import ast
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from camfleet.protocol import edge_batch as eb

SHA = "a" * 64


def req(serial="ENTO-1", **body):
    base = {"device-serialID": serial, "bucket-name": "b", "files": ["a.jpg"]}
    base.update(body)
    return json.dumps(base).encode()


def test_seed_request_is_unchecked_and_keeps_names():
    r = eb.parse_url_request("ENTO-1", req(files=["a.jpg", "b.jpg"]))
    assert [f.name for f in r.files] == ["a.jpg", "b.jpg"]
    assert not r.checked and r.request_id is None and r.rejected == ()


def test_camfleet_request_is_checked():
    body = req(
        files=["a.jpg"], checksums={"a.jpg": {"size": 10, "sha256": SHA}}, **{"request-id": "r1"}
    )
    r = eb.parse_url_request("ENTO-1", body)
    assert r.checked and r.request_id == "r1"
    assert r.files == (eb.FileSpec("a.jpg", 10, SHA),)


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (req(serial="ENTO-2"), "does not match"),
        (req(files="a.jpg"), "list of file names"),
        (req(files=[f"f{i}.jpg" for i in range(251)]), "more than 250"),
        (req(**{"request-id": "../x"}), "request-id"),
        (req(checksums=[1]), "checksums"),
        (b" " * (eb.MAX_REQUEST_BYTES + 1), "larger than"),
    ],
)
def test_refused_requests(payload, reason):
    with pytest.raises(eb.RequestRefused) as exc:
        eb.parse_url_request("ENTO-1", payload)
    assert reason in exc.value.reason


def test_bad_names_are_rejected_one_by_one():
    names = ["ok.jpg", "../ENTO-2/x.jpg", "a/b.jpg", "..", "a\x00b", "ok.jpg", 7, "", "\ud800"]
    names.append("x" * 256)
    r = eb.parse_url_request("ENTO-1", req(files=names))
    assert [f.name for f in r.files] == ["ok.jpg"]
    assert len(r.rejected) == 9
    assert any("duplicate" in x.reason for x in r.rejected)


# Names cameras and filesystems really produce: every one is accepted and mapped to a
# safe key of its own; the device keeps (and is answered with) its own name.
CAMERA_NAMES = [
    "IMG 0001.jpg",
    "2026-12-03T02:41:07+00:00.jpg",
    "Éclosion_été.jpg",
    "日本.jpg",
    ".hidden.jpg",
    "_x.jpg",
    "a~b.jpg",
    "?",
    "tab\there.JPG",
    "dots ...jpg",
    "é" * 127,
]


def test_any_name_a_device_can_have_gets_a_safe_distinct_key():
    r = eb.parse_url_request("ENTO-1", req(files=CAMERA_NAMES + ["plain_0001.jpg"]))
    assert r.rejected == ()
    keys = [eb.device_key("ENTO-1", f.name) for f in r.files]
    assert len(set(keys)) == len(keys)
    assert keys[-1] == "edge/ENTO-1/plain_0001.jpg"  # a safe name is its own key
    for name, key in zip(CAMERA_NAMES, keys, strict=False):
        folder, base = key.rsplit("/", 1)
        assert folder == "edge/ENTO-1" and key.count("/") == 2
        assert eb.check_name(base.replace("~", "_")) == base.replace("~", "_")
        assert "~" in base  # never a name a device can ask for as is
        assert len(base.encode()) <= 128
        if name.lower().endswith(".jpg"):
            assert base.lower().endswith(".jpg")
        # Reuse keys of these names stay distinct from every mapped key.
        assert eb.reuse_key("ENTO-1", name) not in keys
    assert eb.key_name("IMG 0001.jpg") == eb.key_name("IMG 0001.jpg")  # stable
    for safe in ("no_extension", "dots...jpg", "A-1.b_c"):
        assert eb.key_name(safe) == safe


def test_more_names_than_one_answer_holds_are_accepted_up_to_the_limit():
    r = eb.parse_url_request("ENTO-1", req(files=[f"f{i}.jpg" for i in range(250)]))
    assert len(r.files) == 250 and r.rejected == ()


def _seed_cloud_answer(batch, names, literal=True, request_id=None):
    files = [
        {"filename": n, "key": f"edge/E/{n}", "url": {"url": "http://s/b", "fields": {"k": n}}}
        for n in names
    ]
    body = {"device-serialID": batch.serial, "files": files}
    if request_id is not None:
        body["request-id"] = request_id
    return (repr(body) if literal else json.dumps(body)).encode()


def test_device_takes_a_seed_clouds_answer_without_request_id_and_python_literals():
    b = _batch()
    b.request(now=0.0)
    uploads = b.on_answer(_seed_cloud_answer(b, ["a.jpg", "b.jpg"]))  # single quotes
    assert [u.name for u in uploads] == ["a.jpg", "b.jpg"]
    assert b.states["c.jpg"] is eb.FileState.REQUESTED
    later = b.on_answer(_seed_cloud_answer(b, ["c.jpg"], literal=False))
    assert [u.name for u in later] == ["c.jpg"]
    # Another request's id is still not ours; names we did not ask for change nothing.
    assert b.on_answer(_seed_cloud_answer(b, ["a.jpg"], request_id="other")) is None
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        b.on_uploaded(name, True)
    assert b.on_verification(b"{'file': 'a.jpg'}") == [eb.Delete("a.jpg")]
    assert b.on_verification(b'{"file": "b.jpg"}') == [eb.Delete("b.jpg")]
    assert b.on_verification(b"{'file': 'zzz.jpg'}") == []
    assert b.on_verification(b"{'file': __import__('os')}") == []  # not a literal


def test_an_answer_without_request_id_cannot_refuse_our_files():
    b = _batch()
    b.request(now=0.0)
    b.on_answer(b"{'device-serialID': 'E', 'files': [], 'error': 'x'}")
    assert b.count(eb.FileState.REQUESTED) == 3


def test_bad_checksums_are_rejected():
    checksums = {
        "a.jpg": {"size": 0, "sha256": SHA},
        "b.jpg": {"size": 5, "sha256": "XYZ"},
        "c.jpg": {"size": eb.MAX_FILE_BYTES + 1, "sha256": SHA},
        "d.jpg": {"size": True, "sha256": SHA},
    }
    r = eb.parse_url_request("ENTO-1", req(files=[*checksums, "e.jpg"], checksums=checksums))
    assert r.files == () and len(r.rejected) == 5


def test_topic_serial():
    t = eb.Topics()
    assert t.serial_from_request_topic("cameraDevice/generateURL/ENTO-1") == "ENTO-1"
    for bad in ("cameraDevice/generateURL/..", "cameraDevice/other/ENTO-1", "x"):
        with pytest.raises(eb.RequestRefused):
            t.serial_from_request_topic(bad)
    custom = eb.Topics(request="fleet/{serial}/urls/req")
    assert custom.request_filter() == "fleet/+/urls/req"
    assert custom.serial_from_request_topic("fleet/CAM9/urls/req") == "CAM9"


def test_device_key_is_confined():
    assert eb.device_key("ENTO-1", "a.jpg") == "edge/ENTO-1/a.jpg"
    with pytest.raises(ValueError):
        eb.device_key("ENTO-1", "../x.jpg")
    with pytest.raises(ValueError):
        eb.device_key("../ENTO-2", "x.jpg")


def test_answer_is_json_and_python_literal():
    """The seed device parses the answer with ast.literal_eval: no true/false/null."""
    answer = eb.url_answer(
        "ENTO-1",
        None,
        [("a.jpg", "devices/ENTO-1/a.jpg", "http://h/b", {"key": "devices/ENTO-1/a.jpg"})],
        rejected=[eb.Rejection("../x", "bad")],
        error=None,
    )
    text = json.dumps(answer)
    assert ast.literal_eval(text) == json.loads(text) == answer
    assert answer["files"][0]["url"] == {
        "url": "http://h/b",
        "fields": {"key": "devices/ENTO-1/a.jpg"},
    }
    assert ast.literal_eval(eb.verification_message("a.jpg").decode()) == {"file": "a.jpg"}


def test_judge_upload():
    g = eb.Grant("E", "a.jpg", "devices/E/a.jpg", 100, 0.0, None, 50, SHA)
    assert eb.judge_upload(g, None, None)[0] is eb.Verdict.MISSING
    assert eb.judge_upload(g, 101, SHA)[0] is eb.Verdict.SIZE
    assert eb.judge_upload(g, 49, SHA)[0] is eb.Verdict.SIZE
    assert eb.judge_upload(g, 50, "b" * 64)[0] is eb.Verdict.CHECKSUM
    assert eb.judge_upload(g, 50, SHA)[0] is eb.Verdict.VERIFIED
    unchecked = eb.Grant("E", "a.jpg", "devices/E/a.jpg", 100, 0.0)
    assert eb.judge_upload(unchecked, 7, "c" * 64)[0] is eb.Verdict.VERIFIED
    assert eb.judge_upload(unchecked, 0, "c" * 64)[0] is eb.Verdict.SIZE


def test_unchecked_verifications_wait_for_the_whole_request_and_settle():
    q = eb.VerificationQueue(settle_s=2.0)
    q.open_request("E", "g", ["a", "b"], now=0.0)
    assert q.resolved("E", "g", "a", True, now=10.0) == []
    assert q.resolved("E", "g", "b", False, now=11.0) == []
    assert q.due(12.9) == []
    assert q.due(13.0) == [eb.Publish("E", "a")]
    assert q.resolved("E", None, "c", True, now=14.0) == [eb.Publish("E", "c")]


def test_a_re_request_takes_its_files_out_of_the_earlier_request():
    q = eb.VerificationQueue(settle_s=1.0)
    q.open_request("E", "old", ["a", "b"], now=0.0)
    q.resolved("E", "old", "a", True, now=1.0)
    q.open_request("E", "new", ["b"], now=2.0)  # the device gave up and asked again
    assert q.due(3.0) == [eb.Publish("E", "a")]  # the old request is complete now
    q.resolved("E", "new", "b", True, now=3.0)
    assert q.due(4.0) == [eb.Publish("E", "b")] and q.next_due() is None


def _batch():
    files = [eb.LocalFile(n, 10, SHA) for n in ("a.jpg", "b.jpg", "c.jpg")]
    return eb.DeviceBatch("ENTO-1", "bucket", files, request_id="r1")


def _answer(request_id="r1", names=("a.jpg", "b.jpg", "c.jpg"), **extra):
    files = [{"filename": n, "url": {"url": "http://h/", "fields": {"key": n}}} for n in names]
    return json.dumps({"request-id": request_id, "files": files, **extra}).encode()


def test_device_batch_happy_path():
    b = _batch()
    body = json.loads(b.request(now=0.0))
    assert body["files"] == ["a.jpg", "b.jpg", "c.jpg"] and body["request-id"] == "r1"
    assert body["checksums"]["a.jpg"] == {"size": 10, "sha256": SHA}
    assert b.on_answer(_answer(request_id="other")) is None  # not ours: ignored
    uploads = b.on_answer(_answer())
    assert [u.name for u in uploads] == ["a.jpg", "b.jpg", "c.jpg"]
    assert not b.waiting_for_urls() and b.url_deadline is None
    for n in ("a.jpg", "b.jpg", "c.jpg"):
        b.on_uploaded(n, True)
    assert b.on_verification(b'{"file": "zzz.jpg"}') == []
    assert b.on_verification(b"garbage") == []
    assert b.on_verification(b'{"file": "a.jpg"}') == [eb.Delete("a.jpg")]
    b.on_deleted("a.jpg")
    b.give_up_verification()
    s = b.summary()
    assert s["deleted"] == 1 and s["left_for_next_run"] == 2


def test_device_batch_expired_url_goes_back_to_request():
    b = _batch()
    b.request(now=0.0)
    b.on_answer(_answer())
    b.on_url_refused("b.jpg", "store answered 403")
    assert b.needs_urls() and b.to_upload() == ["a.jpg", "c.jpg"]
    body = json.loads(b.request(now=1.0))
    assert body["files"] == ["b.jpg"]


def test_device_batch_rejections_and_already_verified():
    b = _batch()
    b.request(now=0.0)
    answer = _answer(
        names=("a.jpg",),
        verified=["b.jpg"],
        rejected=[{"filename": "c.jpg", "reason": "nope"}],
    )
    assert [u.name for u in b.on_answer(answer)] == ["a.jpg"]
    assert b.states["b.jpg"] is eb.FileState.UPLOADED
    assert b.states["c.jpg"] is eb.FileState.REFUSED and b.reasons["c.jpg"] == "nope"


def test_url_timeout():
    b = _batch()
    b.request(now=0.0, url_timeout=5)
    assert b.url_deadline == 5.0  # the edge uploader waits for answers until then
    b.give_up_urls()
    assert b.count(eb.FileState.FAILED) == 3


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=5)
            | st.dictionaries(
                st.sampled_from(
                    ["device-serialID", "files", "checksums", "request-id", "bucket-name", "x"]
                ),
                children,
                max_size=5,
            )
        ),
        max_leaves=20,
    )
)
def test_any_json_request_is_parsed_or_refused(value):
    payload = json.dumps(value).encode()
    try:
        r = eb.parse_url_request("ENTO-1", payload)
    except eb.RequestRefused:
        return
    for f in r.files:
        assert eb.device_key("ENTO-1", f.name).startswith("edge/ENTO-1/")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_to_the_device_batch_are_harmless(data):
    b = _batch()
    b.request(now=0.0)
    b.on_answer(data)
    b.on_verification(data)
    assert set(b.states) == {"a.jpg", "b.jpg", "c.jpg"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from(["a.jpg", "r1", "x"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "request-id",
                    "files",
                    "filename",
                    "url",
                    "fields",
                    "verified",
                    "rejected",
                    "reason",
                    "error",
                    "file",
                ]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_any_json_to_the_device_batch_is_harmless(value):
    b = _batch()
    b.request(now=0.0)
    payload = json.dumps(value).encode()
    uploads = b.on_answer(payload) or []
    assert all(u.name in b.states for u in uploads)
    assert all(d.name in b.states for d in b.on_verification(payload))
