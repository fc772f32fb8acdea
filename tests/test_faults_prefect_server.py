"""The Prefect server frozen, then killed, then back, under each pipeline (issue 14).

Each test gives its pipeline a private Prefect server (PrefectServerInstance, SQLite in
its own PREFECT_HOME) and takes it down with tests/faults_prefect_support.PrefectOutage:
SIGSTOP on all its processes (requests hang: no error, no answer), then SIGKILL, then
a start on the same port. Each pipeline keeps its promise through it:

- MQTT chunk ingest (assembler, default ACK path): every image of every device is
  stored and ACKed while the server is frozen and while it is dead; the failed
  recording runs are logged; once the server is back new captures are recorded
  (stamped with a flow run id) again, and the mqtt-ingest-record deployment's run
  adopts those the recorder gave up on. Nothing is lost: one row and one object per
  image, every one stamped.
- Edge batch upload (signer + a device without Prefect): every batch is signed,
  uploaded, verified and deleted on the device while the server is frozen and dead;
  the failed post-processing hand-off is logged; once the server is back the next
  batch gets its hand-off flow run.

- Lifelog ingest (the device API): every ingest is answered `queued` while the
  server is frozen and dead (without a task_id: no run could be created), the failed
  creation is logged; once the server is back ingests get run ids again, and the run
  of the first window after it adopts the items ingested during the outage. Every
  item ends verified (`stored`, its SHA-256 recorded) and owned by a run.

- The routine deployments run by `prefect worker start --pool camfleet-process` (a
  schedule every 3 s; the outage lands while a run is going): event upload (every
  package the analyzer writes, during the outage too, is uploaded once, with the
  invariants of tests/test_faults_prefect.py), the trigger scheduler (the window
  planned before still covers the outage; afterwards the slots go on without a gap,
  none twice) and evaluate-captures (captures arriving during the outage are scored
  after it, each once). The run caught by the outage finishes or is marked Crashed.

(The SFTP event uploader's kill of a PostgreSQL-backed server under a worker, with
sshd, PostgreSQL and the worker killed too, is in tests/test_faults_prefect.py.)
"""

from __future__ import annotations

import logging
import uuid
from contextlib import closing

import psycopg2
import pytest

from camfleet.localsvc import PrefectServerInstance
from tests.faults_common import wait_until
from tests.faults_prefect_support import ZOMBIE_AFTER_S, PrefectOutage, prefect_client_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


class _Warnings(logging.Handler):
    """The warnings one logger emits, whatever handlers Prefect's logging set-up gave
    it (pytest's caplog only sees records that reach the root logger)."""

    def __init__(self, logger: str) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.logger = logging.getLogger(logger)
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def detach(self) -> None:
        self.logger.removeHandler(self)

    def seen(self, text: str) -> bool:
        return any(text in m for m in self.messages)


def _rows(dsn: str, sql: str, *args) -> list[tuple]:
    with closing(psycopg2.connect(dsn)) as conn, conn, conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


@pytest.fixture
def outage(tmp_path):
    with PrefectServerInstance(home=tmp_path / "prefect-server") as server:
        fault = PrefectOutage(server)
        with prefect_client_env(server.api_url, tmp_path / "prefect-client"):
            try:
                yield fault
            finally:
                fault.thaw()


def test_mqtt_ingest_acks_everything_through_a_frozen_then_killed_prefect_server(
    outage, mosquitto, database_url, tmp_path, monkeypatch
):
    from camfleet.simulators.esp32 import SimOptions, simulate
    from services.assembler import AssemblerService, ServiceConfig
    from tests.test_mqtt_ingest import FAST, broker_block

    b = broker_block(mosquitto)
    cfg = ServiceConfig(
        database_url=database_url,
        storage_url=(tmp_path / "objects").as_uri(),
        timing=FAST,
        client_id=f"asm-{uuid.uuid4().hex[:6]}",
        recorder="process",  # the recorder's child reads PREFECT_API_URL: this server
    )
    svc = AssemblerService(b, cfg)
    assert svc.recorder is not None  # a Prefect API is configured: runs are recorded
    warnings = _Warnings("camfleet.assembler")
    stamped = "select count(*) from captures where flow_run_id is not null"
    acked = 0
    svc.start()
    try:
        assert svc.wait_connected(20)

        def fleet(prefix: str, devices: int = 6, images: int = 2) -> None:
            nonlocal acked
            r = simulate(b, SimOptions(devices=devices, images=images, id_prefix=prefix,
                                       ack_timeout=10))  # fmt: skip
            assert (r.images_acked, r.images_failed, r.resends) == (devices * images, 0, 0)
            acked += devices * images

        fleet("F0A001", devices=2, images=1)
        assert wait_until(lambda: _rows(database_url, stamped) == [(2,)], 120, 0.5)

        outage.freeze()
        fleet("F0A002")  # the devices do not notice a hung Prefect server
        outage.kill()
        fleet("F0A003")  # nor a dead one
        assert wait_until(lambda: warnings.seen("recording flow run failed"), 180, 0.5), (
            "a failed recording run must be visible in the service's log"
        )

        outage.restart()
        before = _rows(database_url, stamped)[0][0]
        fleet("F0A004", devices=2, images=1)
        # Prefect back: the recorder records again, without being restarted.
        assert wait_until(lambda: _rows(database_url, stamped)[0][0] >= before + 2, 180, 0.5)
    finally:
        svc.stop(timeout=30)
        warnings.detach()

    # Nothing lost, nothing twice: one row and one object per image ACKed.
    captures = _rows(
        database_url, "select device_id, device_capture_id, storage_path from captures"
    )
    assert len(captures) == acked == len({(d, c) for d, c, _ in captures})
    objects = {
        p.relative_to(tmp_path / "objects").as_posix()
        for p in (tmp_path / "objects").rglob("*")
        if p.is_file()
    }
    assert {path for _, _, path in captures} <= objects

    # The captures whose recording the assembler gave up on while Prefect was away are
    # adopted by the mqtt-ingest-record deployment's scheduled run (called here as a
    # worker runs it: no assembler context, the configured database and store).
    import asyncio

    from camfleet.settings import get_settings
    from flows.mqtt_ingest import mqtt_ingest_record
    from tasks import mqtt as tm

    tm.set_context(None)
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("STORAGE_URL", (tmp_path / "objects").as_uri())
    get_settings.cache_clear()
    try:
        state = asyncio.run(mqtt_ingest_record(min_age_s=0, return_state=True))
    finally:
        tm.set_context(None)
        get_settings.cache_clear()
    assert state.is_completed(), state
    unstamped = "select count(*) from captures where flow_run_id is null"
    assert _rows(database_url, unstamped) == [(0,)]


def test_edge_upload_verifies_everything_through_a_frozen_then_killed_prefect_server(
    outage, mosquitto, s3, bucket, database_url, tmp_path
):
    from camfleet.edge.uploader import EdgeUploader
    from flows.edge_batch import run_uploads_received
    from services.signer import Signer
    from tests.test_edge_transaction import broker_block, captures, device, make_store, write_images

    broker = broker_block(mosquitto)
    signer = Signer(
        make_store(s3, bucket),
        database_url,
        broker,
        client_id=f"signer-{uuid.uuid4().hex[:6]}",
        handoff=run_uploads_received,
    )
    warnings = _Warnings("camfleet.signer")
    handed = "select count(*) from captures where device_id = %s and flow_run_id is not null"
    written: dict[str, str] = {}
    signer.start()
    try:
        assert signer.wait_connected(10)
        cfg = device(tmp_path, broker)

        def upload(prefix: str, count: int) -> None:
            written.update(write_images(cfg.repo_dir, count, prefix=prefix))
            summaries = EdgeUploader(cfg, broker, min_age_s=0).drain()
            assert sum(s["deleted"] for s in summaries) == count, summaries
            assert list(cfg.repo_dir.iterdir()) == list(cfg.buffer_dir.iterdir()) == []

        upload("warm", 2)
        assert wait_until(lambda: _rows(database_url, handed, cfg.serial) == [(2,)], 120, 0.5)

        outage.freeze()
        upload("frozen", 7)
        outage.kill()
        upload("dead", 6)
        assert wait_until(lambda: warnings.seen("hand-off failed"), 180, 0.5), (
            "a failed post-processing hand-off must be visible in the signer's log"
        )

        outage.restart()
        before = _rows(database_url, handed, cfg.serial)[0][0]
        upload("back", 3)
        # Prefect back: the next batch is handed to a flow run again.
        assert wait_until(
            lambda: _rows(database_url, handed, cfg.serial)[0][0] >= before + 3, 180, 0.5
        )
    finally:
        signer.stop()
        warnings.detach()

    # Nothing lost, nothing twice: every file the camera wrote is one capture with its bytes.
    rows = captures(database_url, cfg.serial)
    assert set(rows) == set(written)
    assert all(rows[name][0] == sha for name, sha in written.items())


def test_lifelog_ingest_answers_through_a_frozen_then_killed_prefect_server(
    outage, database_url, tmp_path, monkeypatch
):
    import asyncio
    import hashlib
    import time

    from fastapi.testclient import TestClient
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.states import Scheduled

    from camfleet.settings import get_settings
    from camfleet.storage.local import LocalStore
    from flows.ingest_processing import DEPLOYMENT, ORPHAN_MIN_AGE_S, lifelog_ingest_processing
    from services.api.app import create_app
    from services.api.ingest_batches import PrefectRuns
    from services.api.ratelimit import RateLimits
    from services.api.routes_devices import unassigned_task_id
    from tests.test_devices_api import (
        JPEG,
        SECRET,
        ingest,
        make_user_key,
        pair_and_activate,
        upload,
    )

    lifelog_ingest_processing.to_deployment(name=DEPLOYMENT).apply()
    store = LocalStore(tmp_path / "objects", public_url="http://testserver", secret=SECRET)
    # Short windows, so the outage spans windows whose runs were not created ahead.
    window_s = 2
    runs = PrefectRuns(window_s=window_s).window_runs(time.time, create_timeout_s=30)
    app = create_app(
        database_url=database_url,
        secret_key=SECRET,
        store=store,
        processing_runs=runs,
        rate_limits=RateLimits(),
    )
    warnings = _Warnings("camfleet.api.ingest")
    answers: dict[int, dict] = {}
    try:
        with TestClient(app) as client:
            _, token = pair_and_activate(client, make_user_key(database_url))

            def put(seq: int) -> dict:
                target = upload(client, token, seq, filename=f"2025-12-26T10-15-30Z_{seq:06d}.jpg")
                r = ingest(client, token, target["object_key"], seq)
                assert r.status_code == 200 and r.json()["status"] == "queued", r.text
                answers[seq] = r.json()
                return answers[seq]

            def has_run(answer: dict) -> bool:
                return answer["task_id"] != unassigned_task_id(answer["item_id"])

            assert has_run(put(1))  # Prefect up: the window's run id

            outage.freeze()
            frozen_at = time.time()
            # Past the windows created ahead of need: these wait for a hung server.
            assert wait_until(lambda: time.time() > frozen_at + 2 * window_s, 10, 0.1)
            assert not has_run(put(2))  # answered, without a run
            outage.kill()
            assert not has_run(put(3))
            assert wait_until(
                lambda: warnings.seen("cannot create the processing flow run"), 180, 0.5
            ), "a failed run creation must be visible in the API's log"

            outage.restart()
            seq = 4
            while not has_run(put(seq)):  # the API tries Prefect again by itself
                assert seq < 200, "no run id after the Prefect server came back"
                seq += 1
                time.sleep(0.5)
            last = seq
    finally:
        warnings.detach()
    assert not any(has_run(answers[s]) for s in (2, 3))

    async def due_now(run_id):
        async with get_client() as c:
            await c.set_flow_run_state(run_id, Scheduled(), force=True)  # its time has come
            return await c.read_flow_run(run_id)

    def process(run_id) -> dict:
        run = asyncio.run(due_now(run_id))
        return run_flow(lifelog_ingest_processing, flow_run=run, parameters=run.parameters)

    # The items of the outage are adopted once they are ORPHAN_MIN_AGE_S old (so an
    # ingest still committing is never snatched): a worker's run after that.
    unassigned = "select count(*) from captures where source = 'lifelog' and flow_run_id is null"
    assert _rows(database_url, unassigned)[0][0] >= 2
    newest = (
        "select extract(epoch from now() - max(created_at)) from captures where flow_run_id is null"
    )
    assert wait_until(lambda: _rows(database_url, newest)[0][0] > ORPHAN_MIN_AGE_S + 1, 120, 0.5)
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("STORAGE_URL", store.root.as_uri())
    get_settings.cache_clear()
    try:
        # The run created before the outage survived it (the server keeps its state).
        process(answers[1]["task_id"])
        process(answers[last]["task_id"])
    finally:
        get_settings.cache_clear()

    rows = _rows(
        database_url,
        "select seq, ingest_status, sha256, flow_run_id from captures where source = 'lifelog'",
    )
    assert len(rows) == len(answers)
    assert {r[0] for r in rows} == set(answers)
    assert all(status == "stored" for _, status, _, _ in rows), rows
    assert {sha for _, _, sha, _ in rows} == {hashlib.sha256(JPEG).hexdigest()}
    assert all(run for _, _, _, run in rows), "an item left without a run"


# ---- deployments run by a worker: the event upload and the trigger scheduler -----------

# Runs come this often, so an outage of a few seconds catches some in flight.
SCHEDULE_S = 3


def _worker_env(outage, tmp_path, config_path, **extra) -> dict[str, str]:
    from tests.faults_prefect_support import prefect_env
    from tests.test_faults_prefect import _env

    env = prefect_env(
        outage.server.api_url, tmp_path / "prefect-worker", config_path, _env(tmp_path)
    )
    env.update(extra)
    return env


def _through_the_outage(outage, during, wait_back, log_tail) -> tuple[list, list[str]]:
    """Freeze the server while a run of the deployment is going, call `during()` while it
    is frozen and again while it is dead, restart it, wait for `wait_back()`.

    Returns the runs the outage caught and, once each is final, their states: a run
    caught by the outage either finishes (its client retries reach the server again)
    or is marked Crashed; none stays Running or Pending for ever.
    """
    from datetime import UTC, datetime

    from tests.faults_prefect_support import flow_runs, not_final

    api = outage.server.api_url

    def going() -> list:
        return [r.id for r in flow_runs(api) if r.state.type.value in ("PENDING", "RUNNING")]

    caught = wait_until(going, 240, 0.1)
    assert caught, "no run was going: " + log_tail()
    outage.freeze()
    during("frozen")
    outage.kill()
    during("dead")
    outage.restart()
    back = datetime.now(UTC)
    assert wait_until(lambda: wait_back(back), 300, 1), log_tail()
    left = wait_until(lambda: not not_final(api, caught), ZOMBIE_AFTER_S + 240, 2)
    assert left, f"runs caught by the outage never ended: {not_final(api, caught)}"
    states = sorted(
        f"{r.state.type.value}: {(r.state.message or '')[:80]}"
        for r in flow_runs(api)
        if r.id in caught
    )
    return caught, states


def test_event_upload_deployment_through_a_frozen_then_killed_prefect_server(
    outage, sshd, database_url, tmp_path
):
    from pathlib import Path

    from camfleet.uploader.simulate import local_config
    from tests.faults_prefect_support import (
        EventWriter,
        check_invariants,
        completed_since,
        create_zombie_automation,
        deploy_event_upload,
        install_lock_audit,
        worker,
        write_config,
    )
    from tests.test_faults_prefect import SETTLE_S, _drain, _uploaded_count

    api = outage.server.api_url
    install_lock_audit(database_url)
    config = local_config(
        sshd, database_url, tmp_path / f"site-{uuid.uuid4().hex[:8]}", settle_seconds=SETTLE_S
    )
    cfg = config["uploader"]
    env = _worker_env(outage, tmp_path, write_config(tmp_path / "config.json", config))
    deploy_event_upload(env, SCHEDULE_S)
    create_zombie_automation(api)
    w = worker(env, tmp_path / "worker.log", "worker-1").start()
    writer = EventWriter(Path(cfg["pending_dir"]), period=0.25)

    def analyzer_goes_on(phase: str) -> None:
        # The analyzer side never waits for Prefect: packages keep landing.
        written = len(writer.snapshot())
        assert wait_until(lambda: len(writer.snapshot()) >= written + 12, 60, 0.1), phase

    try:
        assert wait_until(lambda: _uploaded_count(cfg) >= 3, 240, 0.5), w.log_tail()
        _, states = _through_the_outage(
            outage, analyzer_goes_on, lambda back: completed_since(api, back) >= 2, w.log_tail
        )
        print("runs caught by the outage:", states)
        writer.close()
        assert _drain(cfg, writer, timeout=300), w.log_tail()
    finally:
        writer.close()
        w.stop()

    # Nothing lost, nothing twice, nothing half-written: every package is uploaded once.
    check = check_invariants(cfg, database_url, writer.snapshot(), drained=True)
    assert (check.lost, check.duplicated, check.partial_remote, check.temp_remote) == (
        0,
        0,
        0,
        0,
    ), check.problems
    assert check.unlocked_writes == 0
    assert check.uploaded == len(writer.snapshot())


def test_trigger_scheduler_deployment_through_a_frozen_then_killed_prefect_server(
    outage, database_url, tmp_path
):
    from datetime import UTC, datetime, timedelta

    from tests.faults_prefect_support import (
        completed_since,
        create_zombie_automation,
        deploy_every,
        worker,
    )
    from tests.test_api_commands_helpers import add_device

    api = outage.server.api_url
    device = f"FRZ{uuid.uuid4().hex[:6].upper()}"
    interval = 5
    add_device(database_url, device, {"trigger": {"enabled": True, "interval_seconds": interval}})
    env = _worker_env(outage, tmp_path, tmp_path / "no-uploader.json", DATABASE_URL=database_url)
    deploy_every(env, "trigger-scheduler", SCHEDULE_S)
    create_zombie_automation(api)
    w = worker(env, tmp_path / "worker.log", "worker-1").start()
    slots_sql = (
        "select scheduled_at, flow_run_id from scheduled_triggers"
        " where device_id = %s and trigger_type = 'scheduled' order by scheduled_at"
    )

    def slots() -> list[tuple]:
        return _rows(database_url, slots_sql, device)

    planned_before: list[tuple] = []

    def still_planned_ahead(phase: str) -> None:
        # The API delivers triggers from the rows alone: while Prefect is away the
        # window planned before keeps devices triggered (it reaches past now).
        rows = slots()
        planned_before[:] = planned_before or rows
        assert rows and rows[-1][0] > datetime.now(UTC) + timedelta(seconds=interval), phase

    try:
        assert wait_until(lambda: completed_since(api, datetime(2000, 1, 1, tzinfo=UTC)) >= 1,
                          240, 0.5), w.log_tail()  # fmt: skip
        caught, states = _through_the_outage(
            outage, still_planned_ahead, lambda back: completed_since(api, back) >= 2, w.log_tail
        )
        print("runs caught by the outage:", states)
    finally:
        w.stop()

    rows = slots()
    # Every slot planned before the outage is still there; none is missing since: one
    # slot every `interval` seconds from the first to the last, no gap, none twice.
    assert {r[0] for r in planned_before} <= {r[0] for r in rows}
    steps = {(b[0] - a[0]).total_seconds() for a, b in zip(rows, rows[1:], strict=False)}
    assert steps == {float(interval)}, sorted(steps)
    assert all(run for _, run in rows), "a slot without the run that planned it"


EVAL_AUDIT_SQL = """
CREATE TABLE eval_audit (record_id text NOT NULL, at timestamptz NOT NULL DEFAULT now());
CREATE FUNCTION eval_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.evaluation_status = 'pending' AND NEW.evaluation_status <> 'pending' THEN
        INSERT INTO eval_audit (record_id) VALUES (NEW.record_id);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER eval_audit AFTER UPDATE ON captures
    FOR EACH ROW EXECUTE FUNCTION eval_audit();
"""


def test_evaluate_captures_deployment_through_a_frozen_then_killed_prefect_server(
    outage, database_url, tmp_path
):

    from tests.faults_prefect_support import (
        completed_since,
        create_zombie_automation,
        deploy_every,
        worker,
    )
    from tests.test_api_commands_helpers import add_device
    from tests.test_results_persistence import _add_capture

    api = outage.server.api_url
    with closing(psycopg2.connect(database_url)) as conn, conn, conn.cursor() as cur:
        cur.execute(EVAL_AUDIT_SQL)
    add_device(database_url, "EVFRZ1")
    env = _worker_env(
        outage,
        tmp_path,
        tmp_path / "no-uploader.json",
        DATABASE_URL=database_url,
        STORAGE_URL=(tmp_path / "objects").as_uri(),
    )
    deploy_every(env, "evaluate-captures", SCHEDULE_S)
    create_zombie_automation(api)
    w = worker(env, tmp_path / "worker.log", "worker-1").start()
    added = 0

    def captures_arrive(phase: str = "up") -> None:
        # Ingest does not need Prefect: captures keep arriving, pending evaluation.
        nonlocal added
        for _ in range(4):
            _add_capture(database_url, "EVFRZ1", f"{phase}-{added}")
            added += 1

    pending = "select count(*) from captures where evaluation_status = 'pending'"
    try:
        captures_arrive()
        assert wait_until(lambda: _rows(database_url, pending) == [(0,)], 240, 0.5), w.log_tail()
        captures_arrive("before")
        _, states = _through_the_outage(
            outage, captures_arrive, lambda back: completed_since(api, back) >= 2, w.log_tail
        )
        print("runs caught by the outage:", states)
        # Every capture, those of the outage too, is evaluated by the runs after it.
        assert wait_until(lambda: _rows(database_url, pending) == [(0,)], 240, 0.5), w.log_tail()
    finally:
        w.stop()
    audit = _rows(database_url, "select record_id, count(*) from eval_audit group by 1")
    assert len(audit) == added and {n for _, n in audit} == {1}  # each once, none twice
