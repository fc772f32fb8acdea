"""Seed 001 compatibility (issue 19 item 4), against a real sshd and PostgreSQL.

- A refused host key stops the run at the first refusal: one SSH connection attempt
  per run, not one per pending package (20 packages were 20 attempts, ~50 s).
- An event JSON without `eventId`/`event_id` is uploaded under its file name, as the
  seed identifies events; an id that is there must still match the name.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import psycopg2
import pytest

from camfleet.uploader import DataUploader
from camfleet.uploader.sftp import HostKeyRejected, SftpConnection
from camfleet.uploader.simulate import local_config, write_event, write_events


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / f"site-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


@pytest.fixture
def dials(monkeypatch) -> list[str]:
    """Every SSH connection attempt (TCP connect + handshake) any SftpConnection makes."""
    attempts: list[str] = []
    real = SftpConnection._open_transport

    def counted(self):
        attempts.append(self.describe())
        return real(self)

    monkeypatch.setattr(SftpConnection, "_open_transport", counted)
    return attempts


def event_rows(dsn: str, ids) -> dict[str, str]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT event_id, status FROM events WHERE event_id = ANY(%s)", [list(ids)])
        return dict(cur.fetchall())


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_refused_host_key_costs_one_attempt_per_run(sshd, database_url, base, dials, concurrency):
    cfg = local_config(sshd, database_url, base, concurrency=concurrency)["uploader"]
    (base / "empty_known_hosts").write_text("")
    trusted = cfg["sftp"]["known_hosts_path"]
    cfg["sftp"]["known_hosts_path"] = str(base / "empty_known_hosts")
    ids = write_events(cfg["pending_dir"], 20, video_bytes=1_000, prefix=f"hk{concurrency}-")

    uploader = DataUploader({"uploader": cfg})
    report = uploader.run_once()

    assert len(dials) == 1
    assert report.counts == {"failed": 20}
    assert {r["reason"].split(":")[0] for r in report.rows} == {"upload"}
    assert all("HostKeyRejected" in r["reason"] and "unknown" in r["reason"] for r in report.rows)
    assert sorted(p.name for p in Path(cfg["pending_dir"]).iterdir()) == sorted(
        f"{i}{s}" for i in ids for s in (".json", ".mp4")
    )  # everything stays for the next run
    assert event_rows(database_url, ids) == {}  # stopped before any INSERT

    # The next run dials again (the operator may have fixed known_hosts meanwhile).
    uploader.run_once()
    assert len(dials) == 2
    uploader.close()
    cfg["sftp"]["known_hosts_path"] = trusted
    fixed = DataUploader({"uploader": cfg})
    assert fixed.run_once().counts == {"uploaded": 20}
    fixed.close()


def test_a_connection_remembers_a_refusal_until_told_to_forget(sshd, tmp_path, dials):
    (tmp_path / "known_hosts").write_text("")
    conn = SftpConnection(_target(sshd, tmp_path / "known_hosts"))
    for _ in range(3):
        with pytest.raises(HostKeyRejected, match="unknown"):
            conn.channel()
    assert len(dials) == 1
    conn.forget_refusal()
    with pytest.raises(HostKeyRejected):
        conn.connect()
    assert len(dials) == 2


def _target(sshd, known_hosts: Path):
    from camfleet.targets import SftpSettings

    return SftpSettings(
        host=sshd.host,
        port=sshd.port,
        username=sshd.username,
        ssh_key_path=str(sshd.client_key_path),
        known_hosts_path=str(known_hosts),
    )


def test_an_event_without_an_id_in_its_json_is_uploaded_by_its_file_name(sshd, database_url, base):
    cfg = local_config(sshd, database_url, base)["uploader"]
    name = f"cam1_{uuid.uuid4().hex[:8]}"
    write_event(cfg["pending_dir"], name, 2_000, metadata={"species": "fox", "score": 0.9})
    liar = f"liar_{uuid.uuid4().hex[:8]}"
    write_event(cfg["pending_dir"], liar, 2_000, metadata={"eventId": "someone-else"})

    report = DataUploader({"uploader": cfg}).run_once()

    assert {r["event"]: r["state"] for r in report.rows} == {name: "uploaded", liar: "rejected"}
    assert event_rows(database_url, [name]) == {name: "completed"}
    remote = Path(cfg["sftp"]["remote_json_dir"]) / f"{name}.json"
    assert json.loads(remote.read_text()) == {"species": "fox", "score": 0.9}  # as written
    assert (Path(cfg["uploaded_dir"]) / f"{name}.mp4").exists()


def test_the_flow_does_not_retry_a_refused_host_key(
    prefect_api_url, sshd, database_url, base, dials
):
    """The flow's SFTP lanes retry a lost connection with backoff, but not a refusal:
    one attempt for the whole run, however many lanes and retries."""
    from flows.event_upload import event_upload

    config = local_config(sshd, database_url, base, concurrency=2)
    (base / "empty_known_hosts").write_text("")
    config["uploader"]["sftp"]["known_hosts_path"] = str(base / "empty_known_hosts")
    path = base / "config.json"
    path.write_text(json.dumps(config))
    ids = write_events(config["uploader"]["pending_dir"], 6, video_bytes=1_000, prefix="fl-")

    state = asyncio.run(
        event_upload(str(path), task_retries=3, retry_delay_seconds=30, return_state=True)
    )

    assert not state.is_completed()  # events failed: the run says so
    assert len(dials) == 1
    # Each lane's task ran once: no retry (and none of its 30 s delays) after the refusal.
    lanes = asyncio.run(task_runs(state.state_details.flow_run_id, "upload over sftp"))
    assert [(r.run_count, r.state.name) for r in lanes] == [(1, "Failed")] * 2
    assert len(list(Path(config["uploader"]["pending_dir"]).iterdir())) == 2 * len(ids)


async def task_runs(flow_run_id, name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return [r for r in runs if r.name.startswith(name)]
