"""Untrusted event packages: each gets a clear reason and a visible state, none is
retried forever or deleted, and none reaches the SFTP server."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import psycopg2
import pytest

from camfleet.uploader import DataUploader
from camfleet.uploader.simulate import local_config, write_event


@pytest.fixture
def site(tmp_path: Path, sshd, database_url):
    base = tmp_path / f"site-{uuid.uuid4().hex[:8]}"
    base.mkdir()
    cfg = local_config(sshd, database_url, base, settle_seconds=5, orphan_seconds=600)["uploader"]
    return cfg


def pending(cfg) -> Path:
    return Path(cfg["pending_dir"])


def age(*paths: Path, seconds: float = 60) -> None:
    stamp = time.time() - seconds
    for p in paths:
        os.utime(p, (stamp, stamp), follow_symlinks=False)


def run(cfg) -> dict[str, tuple[str, str]]:
    report = DataUploader({"uploader": cfg}).run_once()
    return {r["event"]: (r["state"], r["reason"]) for r in report.rows}


def remote_names(cfg) -> list[str]:
    out = []
    for key in ("remote_video_dir", "remote_json_dir"):
        d = Path(cfg["sftp"][key])
        out += sorted(p.name for p in d.iterdir()) if d.exists() else []
    return out


def event_row(dsn: str, event_id: str):
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT status, last_error FROM events WHERE event_id = %s", [event_id])
        return cur.fetchone()


@pytest.mark.parametrize(
    "name, json_bytes, video, reason",
    [
        ("garbled", b'{"eventId": "garbled", ', b"v" * 100, "JSON does not parse"),
        ("liar", b'{"eventId": "../../etc/passwd"}', b"v" * 100, "does not match the file name"),
        ("listjson", b"[]", b"v" * 100, "must be an object"),
        ("emptyvideo", b'{"eventId": "emptyvideo"}', b"", "video file is empty"),
        ("emptyjson", b"", b"v" * 100, "JSON file is empty"),
    ],
)
def test_bad_package_is_set_aside_with_its_reason(
    site, database_url, name, json_bytes, video, reason
):
    (pending(site) / f"{name}.mp4").parent.mkdir(parents=True, exist_ok=True)
    (pending(site) / f"{name}.mp4").write_bytes(video)
    (pending(site) / f"{name}.json").write_bytes(json_bytes)
    age(pending(site) / f"{name}.mp4", pending(site) / f"{name}.json")

    states = run(site)

    assert states[name][0] == "rejected" and reason in states[name][1]
    failed = Path(site["failed_dir"])
    assert sorted(p.name for p in failed.iterdir()) == sorted(
        [f"{name}.json", f"{name}.mp4", f"{name}.json.reason.txt"]
    )
    assert reason in (failed / f"{name}.json.reason.txt").read_text()
    assert list(pending(site).iterdir()) == []
    assert remote_names(site) == []
    status, last_error = event_row(database_url, name)  # visible in the database too
    assert status == "failed" and reason in last_error
    assert run(site) == {}  # not retried


def test_unusable_file_names_are_set_aside(site):
    for name in ("évènement.json", "has space.json", "x" * 70 + ".json"):
        (pending(site)).mkdir(parents=True, exist_ok=True)
        (pending(site) / name).write_text("{}")
        age(pending(site) / name)
    states = run(site)
    assert {s for s, _ in states.values()} == {"rejected"}
    assert all("not a usable event id" in r for _, r in states.values())
    assert remote_names(site) == []


def test_symlinks_are_refused_never_followed(site, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for upload")
    write_event(pending(site), "sneaky", age_seconds=60)
    (pending(site) / "sneaky.mp4").unlink()
    (pending(site) / "sneaky.mp4").symlink_to(secret)
    age(pending(site) / "sneaky.mp4")
    states = run(site)
    assert states["sneaky"][0] == "rejected" and "symlink" in states["sneaky"][1]
    assert remote_names(site) == []
    assert secret.read_text() == "not for upload"


def test_missing_video_waits_then_is_set_aside_after_the_orphan_time(site):
    write_event(pending(site), "lonely", age_seconds=60)
    (pending(site) / "lonely.mp4").unlink()
    states = run(site)
    assert states["lonely"] == ("waiting", "video lonely.mp4 missing")
    assert sorted(p.name for p in pending(site).iterdir()) == ["lonely.json"]

    age(pending(site) / "lonely.json", seconds=601)
    states = run(site)
    assert states["lonely"][0] == "rejected" and "missing for over" in states["lonely"][1]
    assert (Path(site["failed_dir"]) / "lonely.json.reason.txt").exists()


def test_files_still_being_written_are_left_alone_until_settled(site):
    write_event(pending(site), "growing", video_bytes=1000)  # mtime: now
    states = run(site)
    assert states["growing"][0] == "waiting" and "modified less than" in states["growing"][1]
    assert remote_names(site) == []
    with open(pending(site) / "growing.mp4", "ab") as f:  # the writer is still at it
        f.write(b"more")
    age(pending(site) / "growing.mp4", pending(site) / "growing.json", seconds=10)
    assert run(site)["growing"][0] == "uploaded"
    assert (Path(site["sftp"]["remote_video_dir"]) / "growing.mp4").stat().st_size == 1004


def test_good_events_still_upload_next_to_bad_ones(site):
    write_event(pending(site), "good", age_seconds=60)
    (pending(site) / "bad.json").write_text(json.dumps({"eventId": "other"}))
    (pending(site) / "bad.mp4").write_bytes(b"x")
    age(pending(site) / "bad.json", pending(site) / "bad.mp4")
    states = run(site)
    assert states["good"][0] == "uploaded" and states["bad"][0] == "rejected"
