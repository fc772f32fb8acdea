"""Result persistence on and off: same results, no task body skipped by a cached result.

With PREFECT_RESULTS_PERSIST_BY_DEFAULT=true, Prefect caches a task's result under its
cache policy; its default key (inputs + source + flow run id) made a loop of a task with
side effects run the body once and repeat the first result. Every camfleet task now
declares its policy; these tests run the flows with persistence on and off.
"""

from __future__ import annotations

import importlib
import pkgutil
import uuid
from pathlib import Path

import pytest
from prefect import flow, task
from prefect.settings import (
    PREFECT_RESULTS_LOCAL_STORAGE_PATH,
    PREFECT_RESULTS_PERSIST_BY_DEFAULT,
    temporary_settings,
)
from prefect.tasks import Task
from prefect.utilities.annotations import NotSet

from camfleet import db
from camfleet.settings import get_settings
from camfleet.storage import open_store
from tests.test_api_commands_helpers import add_device, fetch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=[True, False], ids=["persist", "no-persist"])
def persistence(request, tmp_path):
    """Runs the test with result persistence on, then off (results kept in tmp_path)."""
    with temporary_settings(
        {
            PREFECT_RESULTS_PERSIST_BY_DEFAULT: request.param,
            PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "results",
        }
    ):
        yield request.param


@pytest.fixture
def env(database_url, monkeypatch, tmp_path):
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("STORAGE_URL", (tmp_path / "objects").as_uri())
    get_settings.cache_clear()
    yield database_url
    get_settings.cache_clear()


def _camfleet_tasks() -> list[Task]:
    found = []
    for package in ("flows", "tasks"):
        for info in pkgutil.iter_modules([str(ROOT / package)]):
            module = importlib.import_module(f"{package}.{info.name}")
            found += [v for v in vars(module).values() if isinstance(v, Task)]
    return found


def test_every_task_declares_its_cache_policy():
    tasks = _camfleet_tasks()
    assert len(tasks) >= 20
    undeclared = [t.name for t in tasks if t._user_cache_policy is NotSet]
    assert undeclared == []


def test_the_hazard_is_real_a_default_policy_loop_repeats_its_first_result(
    prefect_api_url, tmp_path
):
    """Why the policies matter (guards against a Prefect upgrade changing defaults)."""
    calls = []

    @task
    def next_batch(cursor_table: str) -> int:
        calls.append(1)
        return len(calls)

    @flow
    def loop() -> list[int]:
        return [next_batch("pending") for _ in range(4)]

    with temporary_settings(
        {
            PREFECT_RESULTS_PERSIST_BY_DEFAULT: True,
            PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "results",
        }
    ):
        assert loop() == [1, 1, 1, 1]  # the body ran once


def _add_capture(dsn: str, device: str, name: str) -> None:
    with db.transaction(dsn) as conn:
        db.queries.triggers_insert_capture(
            conn,
            device_id=device,
            device_capture_id=name,
            captured_at=None,
            image_bytes=1,
            content_type="image/jpeg",
            storage_path=f"captures/{device}/{name}.jpg",  # not stored: scored 'failed'
            sha256="x",
            trigger_id=None,
            trigger_label=None,
            metadata={},
        )


def test_evaluation_loop_scores_every_batch(prefect_api_url, env, persistence):
    from flows.evaluation import evaluate_captures

    add_device(env, "EV1")
    for i in range(4):
        _add_capture(env, "EV1", f"c{i}")
    # batch_size 1: four task calls with the same inputs, each must take the next capture
    total = evaluate_captures(batch_size=1, max_batches=6)
    assert total["scored"] == 4 and total["failed"] == 4
    assert fetch(env, "SELECT count(*) FROM captures WHERE evaluation_status = 'pending'") == [(0,)]


def test_trigger_flows_same_results_and_no_reused_trigger(prefect_api_url, env, persistence):
    from flows.triggers import expire_triggers, manual_trigger, trigger_scheduler

    # a 60 s interval: the two windows overlap however slowly a loaded machine runs them
    add_device(env, "T1", {"trigger": {"enabled": True, "interval_seconds": 60}})
    first = trigger_scheduler(window_seconds=180)
    assert first["created"] == first["planned"] == 3
    again = trigger_scheduler(window_seconds=180)
    assert again["created"] <= 1  # the overlap is skipped, not doubled
    # two manual triggers for the same device with the same parameters: two rows
    for _ in range(2):
        state = manual_trigger(device_id="T1", timeout_seconds=0.2, return_state=True)
        assert state.is_failed()
    manual = fetch(
        env,
        "SELECT count(DISTINCT trigger_id) FROM scheduled_triggers WHERE trigger_type = 'manual'",
    )
    assert manual == [(2,)]
    assert expire_triggers(execution_timeout_seconds=0)["expired"] >= 0


def _add_lifelog_items(dsn: str, device: str, count: int) -> str:
    """`count` ingested Lifelog items (objects stored) of a run Prefect no longer knows
    (deleted or pruned), an hour old; returns that run id."""
    store = open_store(None)
    ended = str(uuid.uuid4())
    with db.transaction(dsn) as conn:
        for seq in range(1, count + 1):
            key = f"lifelog/{device}/{seq}.jpg"
            store.put(key, b"jpeg-bytes-%d" % seq, "image/jpeg")
            db.queries.devices_ingest_insert(
                conn,
                device_id=device,
                object_key=key,
                seq=seq,
                captured_at=None,
                image_bytes=12,
                content_type="image/jpeg",
                metadata="{}",
                flow_run_id=ended,
            )
        with conn.cursor() as cur:
            cur.execute("UPDATE captures SET updated_at = now() - interval '1 hour'")
    return ended


def test_lifelog_processing_adopts_items_of_an_ended_run(prefect_api_url, env, persistence):
    from flows.ingest_processing import lifelog_ingest_processing

    add_device(env, "L1")
    ended = _add_lifelog_items(env, "L1", 2)
    summary = lifelog_ingest_processing()
    assert summary == {"items": 2, "verified": 2, "failed": 0}
    rows = fetch(
        env, "SELECT count(*) FROM captures WHERE sha256 IS NOT NULL AND flow_run_id <> %s", ended
    )
    assert rows == [(2,)]
    assert lifelog_ingest_processing() == {"items": 0}  # nothing processed twice


def test_fleet_report_same_with_and_without_persistence(
    prefect_api_url, env, persistence, tmp_path
):
    from flows.fleet_report import fleet_report

    add_device(env, "R1")
    _add_capture(env, "R1", "r0")
    first = fleet_report(days=1, out_dir=str(tmp_path / "a"))
    second = fleet_report(days=1, out_dir=str(tmp_path / "b"))
    assert first == second and first["captures"] >= 1
    assert (tmp_path / "b" / "captures.parquet").exists()  # written again, not cached


# ---- the flows run from services' threads and by workers -----------------------------


@pytest.fixture(params=[True, False], ids=["persist", "no-persist"])
def persistence_everywhere(request, tmp_path, monkeypatch, prefect_api_url):
    """Result persistence on, then off, for this process's every thread and children:
    the assembler's and the signer's flows run in threads without a settings context
    of their own, which fall back to the one built from the environment."""
    from prefect.context import refresh_global_settings_context

    monkeypatch.setenv("PREFECT_RESULTS_PERSIST_BY_DEFAULT", str(request.param).lower())
    monkeypatch.setenv("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(tmp_path / "results"))
    refresh_global_settings_context()
    try:
        with temporary_settings(
            {
                PREFECT_RESULTS_PERSIST_BY_DEFAULT: request.param,
                PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "results",
            }
        ):
            yield request.param
    finally:
        monkeypatch.undo()
        refresh_global_settings_context()


def test_fleet_health_same_with_and_without_persistence(prefect_api_url, env, persistence):
    from camfleet import alerts
    from flows.fleet_health import fleet_health
    from tests.test_alerts import add_device as add_seen_device

    add_seen_device(env, "H1", interval=60, seen_ago=600)  # silent
    assert fleet_health(service_urls={})["transitions"] == [(alerts.SILENT, "H1")]
    assert fleet_health(service_urls={})["transitions"] == []  # the incident is open
    assert fetch(env, "SELECT count(*), count(resolved_at) FROM device_alerts") == [(1, 0)]


def test_prune_flow_runs_same_with_and_without_persistence(
    prefect_api_url, persistence, monkeypatch, tmp_path
):
    import asyncio
    import os

    from flows.maintenance import prune_flow_runs

    RETENTION_ENV = "CAMFLEET_FLOW_RUN_RETENTION_DAYS"

    old = tmp_path / "results" / "old-result"
    old.parent.mkdir(parents=True, exist_ok=True)
    old.write_text("a result of a run long pruned")
    os.utime(old, (0, 0))
    monkeypatch.setenv(RETENTION_ENV, "3")
    first = asyncio.run(prune_flow_runs())
    second = asyncio.run(prune_flow_runs())
    assert (first["retention_days"], first["result_files_deleted"]) == (3, 1)
    assert second["result_files_deleted"] == 0 and not old.exists()


def test_prune_device_logs_same_with_and_without_persistence(prefect_api_url, env, persistence):
    from datetime import timedelta

    from flows.maintenance import prune_device_logs
    from tests.test_maintenance import _add_log_rows

    _add_log_rows(env, "device_publish_log", 6, timedelta(days=8))
    _add_log_rows(env, "device_status", 3, timedelta(days=31))
    first, second = prune_device_logs(), prune_device_logs()
    assert (first["device_publish_log"]["deleted"], first["device_status"]["deleted"]) == (6, 3)
    assert (second["device_publish_log"]["deleted"], second["device_status"]["deleted"]) == (0, 0)


def test_event_upload_same_with_and_without_persistence(
    prefect_api_url, env, persistence, sshd, tmp_path
):
    import asyncio
    import os

    from camfleet.uploader.simulate import local_config, write_event
    from flows.event_upload import event_upload
    from tests.faults_prefect_support import write_config

    config = local_config(sshd, env, tmp_path / f"site-{uuid.uuid4().hex[:8]}")
    cfg = config["uploader"]
    for i in range(3):
        write_event(Path(cfg["pending_dir"]), f"p{i:03d}", video=os.urandom(2048))
    path = str(write_config(tmp_path / "config.json", config))
    first = asyncio.run(event_upload(config_path=path))
    write_event(Path(cfg["pending_dir"]), "p100", video=os.urandom(2048))
    second = asyncio.run(event_upload(config_path=path))  # only the new one
    assert first["counts"] == {"uploaded": 3}, first
    assert second["counts"] == {"uploaded": 1}, second
    assert fetch(env, "SELECT count(*) FROM events WHERE status = 'completed'") == [(4,)]
    assert len(list(Path(cfg["uploaded_dir"]).glob("*.json"))) == 4


def test_mqtt_flows_same_with_and_without_persistence(
    persistence_everywhere, mosquitto, database_url, tmp_path, monkeypatch
):
    """`mqtt-ingest` (the assembler's `--ack-path flow`) and `mqtt-ingest-record` (the
    default path's recorder, then the deployment's adopting run)."""
    import asyncio

    from camfleet.simulators.esp32 import SimOptions, simulate
    from flows.mqtt_ingest import mqtt_ingest_record
    from services.assembler import AssemblerService, ServiceConfig
    from tasks import mqtt as tm
    from tests.faults_common import wait_until
    from tests.test_mqtt_ingest import FAST, broker_block

    b = broker_block(mosquitto)
    for ack_path, prefix in (("flow", "AF0001"), ("direct", "AD0001")):
        svc = AssemblerService(
            b,
            ServiceConfig(
                database_url=database_url,
                storage_url=(tmp_path / "objects").as_uri(),
                timing=FAST,
                client_id=f"asm-{uuid.uuid4().hex[:6]}",
                ack_path=ack_path,
            ),
        )
        svc.start()
        try:
            assert svc.wait_connected(20)
            r = simulate(b, SimOptions(devices=3, images=2, id_prefix=prefix))
            assert (r.images_acked, r.images_failed) == (6, 0)
            stamped = "select count(flow_run_id) from captures where device_id like %s"
            assert wait_until(
                lambda: fetch(database_url, stamped, prefix[:2] + "%") == [(6,)], 120, 0.5
            )
        finally:
            svc.stop(timeout=30)
    rows = fetch(database_url, "select ingest_status, count(*) from captures group by 1")
    assert rows == [("stored", 12)]

    # The deployment's run finds nothing to adopt: every capture has its run.
    tm.set_context(None)
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("STORAGE_URL", (tmp_path / "objects").as_uri())
    get_settings.cache_clear()
    try:
        assert asyncio.run(mqtt_ingest_record(min_age_s=0))["captures"] == 0
    finally:
        tm.set_context(None)
        get_settings.cache_clear()


def test_edge_flows_same_with_and_without_persistence(
    persistence_everywhere, mosquitto, s3, bucket, database_url, tmp_path
):
    """`edge-batch-upload` on the device and `edge-uploads-received`, the signer's
    hand-off of each verified batch."""
    from flows.edge_batch import edge_batch_upload, run_uploads_received
    from services.signer import Signer
    from tests.faults_common import wait_until
    from tests.test_edge_flow import seed_device
    from tests.test_edge_transaction import broker_block, make_store

    serial, conf, shas = seed_device(tmp_path, mosquitto, 7)
    signer = Signer(
        make_store(s3, bucket),
        database_url,
        broker_block(mosquitto),
        client_id=f"signer-{uuid.uuid4().hex[:6]}",
        handoff=run_uploads_received,
    )
    handed = "select device_capture_id, flow_run_id from captures where device_id = %s"
    with signer:
        assert signer.wait_connected(10)
        summaries = edge_batch_upload(conf, min_age_s=0)
        assert [s["deleted"] for s in summaries] == [5, 2]
        assert edge_batch_upload(conf, min_age_s=0) == []  # nothing left: an idle run
        assert wait_until(
            lambda: all(run for _, run in fetch(database_url, handed, serial)), 120, 0.5
        )
    assert {name for name, _ in fetch(database_url, handed, serial)} == set(shas)
