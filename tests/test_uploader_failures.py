"""DataUploader when a phase fails, and when two uploaders run at once.

Every failure leaves the local files in `pending_upload/`, and the next run completes
the job with exactly one `events` row and nothing partial under a final remote name.
Services are killed for real (private instances, never the session ones).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg2
import pytest

from camfleet import db
from camfleet.localsvc import PostgresInstance, SshdInstance
from camfleet.uploader import DataUploader
from camfleet.uploader.session import EventSession
from camfleet.uploader.sftp import temp_path
from camfleet.uploader.simulate import local_config, write_event, write_events


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / f"site-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def rows(dsn: str) -> dict[str, tuple]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT event_id, status, attempts, last_error FROM events")
        return {r[0]: r[1:] for r in cur.fetchall()}


def listing(path) -> list[str]:
    path = Path(path)
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def assert_all_uploaded_once(cfg: dict, ids: list[str], dsn: str) -> None:
    """Every event: one completed row, both files complete remotely and archived locally."""
    sftp = cfg["sftp"]
    table = rows(dsn)
    assert sorted(table) == sorted(ids)
    assert {table[i][0] for i in ids} == {"completed"}
    assert listing(cfg["pending_dir"]) == []
    for event_id in ids:
        for remote_dir, suffix in (
            (sftp["remote_video_dir"], ".mp4"),
            (sftp["remote_json_dir"], ".json"),
        ):
            remote = Path(remote_dir) / f"{event_id}{suffix}"
            archived = Path(cfg["uploaded_dir"]) / f"{event_id}{suffix}"
            assert remote.read_bytes() == archived.read_bytes()
    for remote_dir in (sftp["remote_video_dir"], sftp["remote_json_dir"]):
        assert not [n for n in listing(remote_dir) if n.endswith(".part")]


def assert_nothing_partial_remotely(cfg: dict) -> None:
    """Whatever sits under a final remote name is a complete copy of the local file."""
    for remote_dir in (cfg["sftp"]["remote_video_dir"], cfg["sftp"]["remote_json_dir"]):
        for name in listing(remote_dir):
            if not name.startswith("."):
                local = Path(cfg["pending_dir"]) / name
                assert (Path(remote_dir) / name).read_bytes() == local.read_bytes(), name


def test_happy_path_uploads_archives_and_records_each_event(sshd, database_url, base):
    cfg = local_config(sshd, database_url, base)["uploader"]
    ids = write_events(cfg["pending_dir"], 8, video_bytes=20_000)
    report = DataUploader({"uploader": cfg}).run_once()
    assert report.counts == {"uploaded": 8}
    assert_all_uploaded_once(cfg, ids, database_url)
    assert {r[1] for r in rows(database_url).values()} == {1}  # one INSERT each
    assert DataUploader({"uploader": cfg}).run_once().counts == {}  # nothing left to do


def test_database_down_before_insert_leaves_files_and_the_next_run_completes(sshd, base):
    with PostgresInstance(fast=True) as pg:
        dsn = pg.create_database("events_down")
        db.migrate(dsn)
        cfg = local_config(sshd, dsn, base)["uploader"]
        ids = write_events(cfg["pending_dir"], 3)
        before = listing(cfg["pending_dir"])
        uploader = DataUploader({"uploader": cfg})

        pg.kill()
        report = uploader.run_once()
        assert report.counts == {"failed": 3}
        assert all("claim" in r["reason"] for r in report.rows)
        assert listing(cfg["pending_dir"]) == before
        assert listing(cfg["sftp"]["remote_video_dir"]) == []  # nothing sent without a row

        pg.start()
        assert uploader.run_once().counts == {"uploaded": 3}
        assert_all_uploaded_once(cfg, ids, dsn)
        assert {r[1] for r in rows(dsn).values()} == {1}


def test_update_failing_leaves_files_and_the_next_run_completes(sshd, database_url, base):
    cfg = local_config(sshd, database_url, base)["uploader"]
    ids = write_events(cfg["pending_dir"], 3)
    before = listing(cfg["pending_dir"])
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        # A real refusal from the server at phase 3 (as a lost grant or a failover would).
        cur.execute(
            """CREATE FUNCTION refuse_completion() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN RAISE EXCEPTION 'events are read-only right now'; END $$;
               CREATE TRIGGER refuse BEFORE UPDATE ON events FOR EACH ROW
               WHEN (NEW.status = 'completed') EXECUTE FUNCTION refuse_completion();"""
        )
    uploader = DataUploader({"uploader": cfg})
    report = uploader.run_once()
    assert report.counts == {"failed": 3}
    assert all(r["reason"].startswith("update: ") for r in report.rows)
    assert listing(cfg["pending_dir"]) == before
    table = rows(database_url)
    assert {table[i][0] for i in ids} == {"pending"}
    assert all("read-only" in table[i][2] for i in ids)  # the reason is on the row
    assert_nothing_partial_remotely(cfg)

    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("DROP TRIGGER refuse ON events")
    assert uploader.run_once().counts == {"uploaded": 3}
    assert_all_uploaded_once(cfg, ids, database_url)


def test_sshd_killed_mid_video_leaves_files_and_the_next_run_completes(database_url, base):
    with SshdInstance() as sshd:
        cfg = local_config(sshd, database_url, base, concurrency=1)["uploader"]
        write_event(cfg["pending_dir"], "big", video_bytes=40 * 1024 * 1024, age_seconds=60)
        ids = ["big", *write_events(cfg["pending_dir"], 2)]
        before = listing(cfg["pending_dir"])
        partial = Path(temp_path(str(Path(cfg["sftp"]["remote_video_dir"]) / "big.mp4")))

        def kill_mid_transfer():
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if partial.exists() and partial.stat().st_size >= 1024 * 1024:
                    sshd.kill()
                    return
                time.sleep(0.002)

        watcher = threading.Thread(target=kill_mid_transfer, daemon=True)
        watcher.start()
        uploader = DataUploader({"uploader": cfg})
        report = uploader.run_once()
        watcher.join()
        assert not sshd.running, "sshd was not killed mid-transfer"
        assert report.counts == {"failed": 3}
        assert listing(cfg["pending_dir"]) == before
        assert not (Path(cfg["sftp"]["remote_video_dir"]) / "big.mp4").exists()
        assert_nothing_partial_remotely(cfg)
        assert {r[0] for r in rows(database_url).values()} == {"pending"}

        sshd.start()
        assert uploader.run_once().counts == {"uploaded": 3}
        assert_all_uploaded_once(cfg, ids, database_url)
        uploader.close()


def test_an_event_locked_by_another_uploader_is_left_alone(sshd, database_url, base):
    cfg = local_config(sshd, database_url, base)["uploader"]
    ids = write_events(cfg["pending_dir"], 4)
    other = EventSession(database_url)  # another machine, mid-upload of ids[0]
    assert other.claim([ids[0]]) == [ids[0]]
    report = DataUploader({"uploader": cfg}).run_once()
    assert report.counts == {"uploaded": 3, "busy": 1}
    assert listing(cfg["pending_dir"]) == [f"{ids[0]}.json", f"{ids[0]}.mp4"]
    assert ids[0] not in rows(database_url)
    other.close()  # the other uploader went away: its lock went with its connection
    assert DataUploader({"uploader": cfg}).run_once().counts == {"uploaded": 1}
    assert_all_uploaded_once(cfg, ids, database_url)


def test_two_uploaders_at_once_upload_each_event_exactly_once(sshd, database_url, base):
    cfg = local_config(sshd, database_url, base)["uploader"]
    ids = write_events(cfg["pending_dir"], 60, video_bytes=20_000)
    uploaders = [DataUploader({"uploader": cfg}) for _ in range(2)]
    start = threading.Barrier(2)

    def run(uploader):
        start.wait()
        return uploader.run_once()

    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(run, uploaders))
    uploaded = [r["event"] for rep in reports for r in rep.rows if r["state"] == "uploaded"]
    assert sorted(uploaded) == sorted(ids)  # each event uploaded by exactly one of them
    assert all(rep.count("failed") == 0 for rep in reports)
    assert_all_uploaded_once(cfg, ids, database_url)
    assert {r[1] for r in rows(database_url).values()} == {1}  # one INSERT per event


def test_a_crash_between_update_and_move_is_finished_without_re_uploading(sshd, database_url, base):
    cfg = local_config(sshd, database_url, base)["uploader"]
    write_event(cfg["pending_dir"], "done", video_bytes=1234)
    write_event(cfg["pending_dir"], "clash", video_bytes=999)
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO events (event_id, status, video_bytes) "
            "VALUES ('done', 'completed', 1234), ('clash', 'completed', 5000)"
        )
    # An earlier run moved one video and died before moving its JSON.
    write_event(cfg["pending_dir"], "halfmoved", video_bytes=10)
    Path(cfg["uploaded_dir"]).mkdir(parents=True)
    os.rename(
        Path(cfg["pending_dir"]) / "halfmoved.mp4", Path(cfg["uploaded_dir"]) / "halfmoved.mp4"
    )

    report = DataUploader({"uploader": cfg}).run_once()
    states = {r["event"]: (r["state"], r["reason"]) for r in report.rows}
    assert states["done"][0] == "already-completed"
    assert states["halfmoved"][0] == "already-completed"
    assert states["clash"][0] == "rejected" and "different video" in states["clash"][1]
    assert listing(cfg["pending_dir"]) == []
    assert set(listing(cfg["uploaded_dir"])) == {
        "done.json",
        "done.mp4",
        "halfmoved.json",
        "halfmoved.mp4",
    }
    assert listing(cfg["sftp"]["remote_video_dir"]) == []  # nothing was re-sent
    assert set(listing(cfg["failed_dir"])) == {"clash.json", "clash.mp4", "clash.json.reason.txt"}
    assert rows(database_url)["clash"][0] == "completed"  # the earlier upload still stands


def test_run_is_the_seeds_main_loop_and_stops_cleanly(sshd, database_url, base):
    cfg = local_config(sshd, database_url, base, scan_interval_seconds=1)["uploader"]
    uploader = DataUploader({"uploader": cfg})
    first_scan = threading.Event()
    scan = uploader.run_once

    def run_once():  # the loop's own step, observed: it has scanned once
        try:
            return scan()
        finally:
            first_scan.set()

    uploader.run_once = run_once
    loop = threading.Thread(target=uploader.run, daemon=True)
    loop.start()
    assert first_scan.wait(60), "the loop never scanned"
    ids = write_events(cfg["pending_dir"], 2)  # they arrive while it sleeps
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(listing(cfg["uploaded_dir"])) < 4:
        time.sleep(0.1)
    uploader.stop()
    loop.join(10)
    assert not loop.is_alive()
    assert_all_uploaded_once(cfg, ids, database_url)


def test_passwords_never_reach_logs_reports_or_rows(sshd, base, caplog):
    from camfleet.localsvc import free_port

    secret = "hunter2-" + uuid.uuid4().hex
    cfg = local_config(sshd, f"postgresql://uploader:{secret}@127.0.0.1:{free_port()}/x", base)
    write_events(cfg["uploader"]["pending_dir"], 2)
    uploader = DataUploader(cfg)  # the database port is closed: every attempt fails
    with caplog.at_level("DEBUG"):
        report = uploader.run_once()
        uploader.run(max_runs=1)
    assert report.counts == {"failed": 2}
    assert secret not in caplog.text
    assert secret not in repr(report) + repr(uploader.config) + str(uploader.config.describe())


def test_a_run_whose_session_died_mid_upload_renames_nothing_into_place(
    sshd, database_url, base, monkeypatch
):
    """Its advisory lock died with the session, so the event may be another run's now
    (which writes the same temporary name): the first run must not rename its copy."""
    import camfleet.uploader.sftp

    cfg = local_config(sshd, database_url, base, concurrency=1)["uploader"]
    ids = write_events(cfg["pending_dir"], 1, video_bytes=200_000)
    real_upload = camfleet.uploader.sftp.upload_file

    def session_dies_during_transfer(client, local, final, **kw):
        def progress(sent):
            if not killed:
                with psycopg2.connect(database_url) as admin, admin.cursor() as cur:
                    cur.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE application_name = 'camfleet-event-upload'"
                    )
                killed.append(True)

        return real_upload(client, local, final, progress=progress, **kw)

    killed: list[bool] = []
    monkeypatch.setattr("camfleet.uploader.phases.upload_file", session_dies_during_transfer)
    report = DataUploader({"uploader": cfg}).run_once()
    assert killed and report.counts == {"busy": 1}
    assert listing(cfg["sftp"]["remote_video_dir"]) in ([], [f".{ids[0]}.mp4.part"])
    assert listing(cfg["pending_dir"]) == [f"{ids[0]}.json", f"{ids[0]}.mp4"]

    monkeypatch.setattr("camfleet.uploader.phases.upload_file", real_upload)
    assert DataUploader({"uploader": cfg}).run_once().counts == {"uploaded": 1}
    assert_all_uploaded_once(cfg, ids, database_url)
