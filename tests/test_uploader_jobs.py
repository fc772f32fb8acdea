"""The I/O-free decisions about event packages (camfleet/uploader/jobs.py)."""

from __future__ import annotations

import json
import posixpath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from camfleet.uploader.jobs import (
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
    BadInput,
    FileInfo,
    Reject,
    Wait,
    check_files,
    make_job,
    parse_metadata,
    remote_path,
)

NOW = 1_000_000.0
OLD = NOW - 60  # settled


def decide(json_name="evt1.json", json_info=None, video_info=None, **kw):
    json_info = json_info or FileInfo(100, OLD)
    return check_files(
        json_name, json_info, video_info, NOW, settle_seconds=5, orphan_seconds=3600, **kw
    )


def test_settled_package_goes_on_to_the_json():
    assert decide(video_info=FileInfo(5000, OLD)) is None


@pytest.mark.parametrize(
    "json_info, video_info, expected",
    [
        (FileInfo(100, NOW - 1), FileInfo(5000, OLD), "JSON modified less than"),
        (FileInfo(100, OLD), FileInfo(5000, NOW - 1), "video modified less than"),
        (FileInfo(100, OLD), None, "video evt1.mp4 missing"),
    ],
)
def test_unsettled_or_incomplete_packages_wait(json_info, video_info, expected):
    decision = decide(json_info=json_info, video_info=video_info)
    assert isinstance(decision, Wait) and expected in decision.reason


@pytest.mark.parametrize(
    "json_name, json_info, video_info, expected",
    [
        ("evt1.json", FileInfo(100, OLD), FileInfo(0, OLD), "video file is empty"),
        ("evt1.json", FileInfo(0, OLD), FileInfo(10, OLD), "JSON file is empty"),
        ("evt1.json", FileInfo(MAX_JSON_BYTES + 1, OLD), FileInfo(10, OLD), "larger than"),
        ("evt1.json", FileInfo(100, OLD, regular=False), FileInfo(10, OLD), "symlinks"),
        ("evt1.json", FileInfo(100, OLD), FileInfo(10, OLD, regular=False), "symlinks"),
        ("evt1.json", FileInfo(100, NOW - 7200), None, "missing for over"),
        ("-x.json", FileInfo(100, OLD), FileInfo(10, OLD), "not a usable event id"),
        ("a b.json", FileInfo(100, OLD), FileInfo(10, OLD), "not a usable event id"),
        ("x" * 65 + ".json", FileInfo(100, OLD), FileInfo(10, OLD), "not a usable event id"),
    ],
)
def test_packages_that_can_never_succeed_are_rejected(json_name, json_info, video_info, expected):
    decision = decide(json_name, json_info, video_info)
    assert isinstance(decision, Reject) and expected in decision.reason


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b"{nope", "does not parse"),
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"[1, 2]", "must be an object"),
        (b'{"eventId": "evt2"}', "does not match the file name"),
        (b'{"eventId": "evt1", "event_id": "../../etc"}', "does not match"),
        (b'{"eventId": "evt1", "note": "a\\u0000b"}', "NUL"),
        (b'{"eventId": "evt1", "x": NaN}', "does not parse"),
        (b'{"eventId": "evt1", "x": 1e999}', "does not parse"),
        (b'{"eventId": "evt1", "x": ' + b"[" * 100 + b"]" * 100 + b"}", "nested deeper"),
        (b'{"eventId": "evt1", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
        (b"{" + b" " * MAX_JSON_BYTES + b"}", "larger than"),
    ],
)
def test_bad_json_is_refused_with_a_reason(raw, expected):
    with pytest.raises(BadInput, match=expected):
        parse_metadata("evt1", raw)


def test_good_json_becomes_a_job_with_remote_paths_inside_the_remote_dirs():
    raw = json.dumps({"eventId": "evt1", "species": "fox"}).encode()
    job = make_job(
        "evt1.json", FileInfo(len(raw), OLD), FileInfo(5000, OLD), raw, "/srv/videos/", "/srv/json"
    )
    assert job.metadata == {"eventId": "evt1", "species": "fox"}
    assert (job.remote_video_path, job.remote_json_path) == (
        "/srv/videos/evt1.mp4",
        "/srv/json/evt1.json",
    )
    assert (job.video_size, job.json_size) == (5000, len(raw))
    assert MAX_JSON_DEPTH >= 8  # real metadata nests a few levels


@pytest.mark.parametrize("name", ["../x.mp4", "a/b.mp4", ".hidden", "", "x\x00.mp4", "..\\x"])
def test_remote_names_that_would_escape_are_refused(name):
    with pytest.raises(BadInput):
        remote_path("/srv/videos", name)


def test_remote_dir_must_be_absolute():
    with pytest.raises(BadInput, match="absolute"):
        remote_path("srv/videos", "a.mp4")


@given(st.text(min_size=1, max_size=80))
def test_a_remote_path_never_leaves_its_directory(name):
    try:
        path = remote_path("/srv/videos", name)
    except BadInput:
        return
    assert posixpath.dirname(posixpath.normpath(path)) == "/srv/videos"
    assert posixpath.basename(path) == name
