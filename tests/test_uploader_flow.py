"""The event-upload flow against a real Prefect server, sshd and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg2
import pytest
from prefect.client.orchestration import get_client

from camfleet.localsvc import SshdInstance
from camfleet.uploader.simulate import local_config, write_event, write_events
from flows.event_upload import event_upload


@pytest.fixture
def base(tmp_path: Path) -> Path:
    # A unique name: remote directories are named after it on the shared sshd.
    path = tmp_path / f"site-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


def write_config(base: Path, sshd, dsn: str, **uploader) -> tuple[Path, dict]:
    config = local_config(sshd, dsn, base, **uploader)
    path = base / "config.json"
    path.write_text(json.dumps(config))
    return path, config["uploader"]


def run_flow(config_path: Path, **params):
    return asyncio.run(event_upload(str(config_path), return_state=True, **params))


def rows(dsn: str) -> dict[str, tuple]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT event_id, status, remote_video_path, remote_json_path, attempts FROM events"
        )
        return {r[0]: r[1:] for r in cur.fetchall()}


def artifacts(flow_run_id) -> dict[str, object]:
    async def fetch():
        async with get_client() as client:
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
                )
            )
            return {a.key: a for a in found}

    return asyncio.run(fetch())


def test_flow_uploads_every_event_and_publishes_artifacts(
    prefect_api_url, sshd, database_url, base
):
    config_path, cfg = write_config(base, sshd, database_url)
    ids = write_events(cfg["pending_dir"], 12, video_bytes=30_000)
    write_event(cfg["pending_dir"], "broken", metadata={"eventId": "not-broken"})

    state = run_flow(config_path)

    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["counts"] == {"uploaded": 12, "rejected": 1}
    videos = Path(cfg["sftp"]["remote_video_dir"])
    jsons = Path(cfg["sftp"]["remote_json_dir"])
    assert sorted(p.name for p in videos.iterdir()) == sorted(f"{i}.mp4" for i in ids)
    assert sorted(p.name for p in jsons.iterdir()) == sorted(f"{i}.json" for i in ids)
    for event_id in ids:
        uploaded = Path(cfg["uploaded_dir"]) / f"{event_id}.mp4"
        assert (videos / f"{event_id}.mp4").read_bytes() == uploaded.read_bytes()
    assert sorted(p.name for p in Path(cfg["pending_dir"]).iterdir()) == []
    table = rows(database_url)
    assert table["broken"][0] == "failed"
    assert {table[i] for i in ids} == {
        ("completed", str(videos / f"{i}.mp4"), str(jsons / f"{i}.json"), 1) for i in ids
    } and len(table) == 13
    reason = (Path(cfg["failed_dir"]) / "broken.json.reason.txt").read_text()
    assert "does not match the file name" in reason

    found = artifacts(state.state_details.flow_run_id)
    assert {"event-upload-summary", "event-upload-events", "event-upload-progress"} <= set(found)
    assert found["event-upload-progress"].data == 100.0
    per_event = found["event-upload-events"].data
    per_event = json.loads(per_event) if isinstance(per_event, str) else per_event
    assert {r["event"]: r["state"] for r in per_event}["broken"] == "rejected"
    assert sum(r["state"] == "uploaded" for r in per_event) == 12


def test_flow_with_sshd_killed_mid_video_fails_and_the_next_run_completes(
    prefect_api_url, database_url, base
):
    with SshdInstance() as sshd:
        config_path, cfg = write_config(base, sshd, database_url, concurrency=1)
        # Oldest first: two small events go through before the big one is cut off.
        early = write_events(cfg["pending_dir"], 2, prefix="early", age_seconds=120)
        write_event(cfg["pending_dir"], "big", video_bytes=40 * 1024 * 1024, age_seconds=60)
        later = write_events(cfg["pending_dir"], 3)
        ids = [*early, "big", *later]
        before = sorted(
            p.name for p in Path(cfg["pending_dir"]).iterdir() if not p.name.startswith("early")
        )
        videos = Path(cfg["sftp"]["remote_video_dir"])
        partial = videos / ".big.mp4.part"

        def kill_mid_transfer():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if partial.exists() and partial.stat().st_size >= 1024 * 1024:
                    sshd.kill()
                    return
                time.sleep(0.002)

        watcher = threading.Thread(target=kill_mid_transfer, daemon=True)
        watcher.start()
        # One retry, quickly: sshd is still down then, so the lane fails for this run.
        state = run_flow(config_path, task_retries=1, retry_delay_seconds=0.1)
        watcher.join()

        assert not sshd.running, "sshd was not killed mid-transfer"
        assert state.is_failed()
        assert "4 event(s) not uploaded" in state.message
        # What the lane finished before the kill was still updated and archived...
        table = rows(database_url)
        assert {i: table[i][0] for i in early} == {i: "completed" for i in early}
        assert {table[i][0] for i in ["big", *later]} == {"pending"}
        # ...and everything else is untouched locally, with nothing partial remotely.
        assert sorted(p.name for p in Path(cfg["pending_dir"]).iterdir()) == before
        assert not (videos / "big.mp4").exists()

        sshd.start()
        state = run_flow(config_path)
        assert state.is_completed(), state.message
        assert state.result()["counts"] == {"uploaded": 4}  # big + the three later ones
        table = rows(database_url)
        assert sorted(table) == sorted(ids) and {r[0] for r in table.values()} == {"completed"}
        for event_id in ids:
            assert (videos / f"{event_id}.mp4").read_bytes() == (
                Path(cfg["uploaded_dir"]) / f"{event_id}.mp4"
            ).read_bytes()
        assert not partial.exists()


def test_two_overlapping_flow_runs_upload_each_event_exactly_once(
    prefect_api_url, sshd, database_url, base
):
    config_path, cfg = write_config(base, sshd, database_url)
    ids = write_events(cfg["pending_dir"], 40, video_bytes=20_000)
    start = threading.Barrier(2)
    states = []

    def one_run():
        start.wait()
        states.append(run_flow(config_path))

    threads = [threading.Thread(target=one_run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)

    assert len(states) == 2 and all(s.is_completed() for s in states), [s.message for s in states]
    counts = [s.result()["counts"] for s in states]
    assert sum(c.get("uploaded", 0) for c in counts) == 40  # nobody uploaded an event twice
    table = rows(database_url)
    assert sorted(table) == sorted(ids)
    assert {(r[0], r[3]) for r in table.values()} == {("completed", 1)}  # one INSERT each
    assert sorted(p.name for p in Path(cfg["pending_dir"]).iterdir()) == []


def test_flow_takes_sftp_and_database_settings_from_saved_blocks(
    prefect_api_url, sshd, database_url, base, run_cli
):
    config_path, cfg = write_config(base, sshd, database_url)
    name = f"site-{uuid.uuid4().hex[:8]}"
    out = run_cli(
        [
            sys.executable,
            "-m",
            "camfleet.cli",
            "uploader",
            "save-blocks",
            "--config",
            str(config_path),
            "--name",
            name,
        ],
        env={"PREFECT_API_URL": prefect_api_url},
    )
    assert f"saved camfleet-sftp-server/{name}" in out.stdout
    # The file keeps only paths: the endpoints and credentials live in the blocks.
    stripped = {k: v for k, v in cfg.items() if k not in ("sftp", "database")}
    config_path.write_text(json.dumps({"uploader": stripped}))
    ids = write_events(cfg["pending_dir"], 3)

    state = run_flow(config_path, sftp_block=name, database_block=name)

    assert state.is_completed(), state.message
    assert state.result()["counts"] == {"uploaded": 3}
    assert sorted(rows(database_url)) == ids
