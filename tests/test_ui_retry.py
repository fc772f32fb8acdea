"""The UI's Retry button on failed runs of served deployments, with results persisted.

(The served test takes minutes on a busy box, so it is `slow`; the first test proves
the same for a manual trigger in seconds.)

The Prefect UI retries a run by proposing the state the test proposes here
(`Scheduled`, named AwaitingRetry, "Retry from the UI", not forced). The served runner
then runs the same flow run again. With result persistence on (the serve default),
a cached task result must not stand in for work: a retried manual trigger makes a new
trigger, and a retried fleet report writes its files.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from camfleet import db
from tests.test_api_commands_helpers import add_device, fetch
from tests.test_serve import Serve, _client_call, _wait_state


def _retry_from_ui(run_id) -> None:
    from prefect.states import Scheduled

    async def retry(client):
        state = Scheduled(name="AwaitingRetry", message="Retry from the UI")
        result = await client.set_flow_run_state(run_id, state, force=False)
        assert result.status.value == "ACCEPT", result

    _client_call(retry)


def _task_run_names(run_id) -> list[str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read(client):
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
        return [t.name for t in runs]

    return _client_call(read)


def test_ui_retry_of_a_failed_manual_trigger_makes_a_new_trigger(
    prefect_api_url, database_url, monkeypatch, tmp_path
):
    """Fast: the same retry, with the run executed in this process (persistence on)."""
    from prefect.flow_engine import run_flow
    from prefect.settings import (
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        PREFECT_RESULTS_PERSIST_BY_DEFAULT,
        temporary_settings,
    )

    from camfleet.settings import get_settings
    from flows.triggers import manual_trigger

    add_device(database_url, "QUIET")
    monkeypatch.setenv("DATABASE_URL", database_url)
    get_settings.cache_clear()
    deployment_id = manual_trigger.to_deployment(name="manual-trigger").apply()

    async def create(client):
        return await client.create_flow_run_from_deployment(
            deployment_id, parameters={"device_id": "QUIET", "timeout_seconds": 0.2}
        )

    async def read(client):
        return await client.read_flow_run(run.id)

    settings = {
        PREFECT_RESULTS_PERSIST_BY_DEFAULT: True,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "results",
    }
    try:
        with temporary_settings(settings):
            run = _client_call(create)
            for _attempt in range(2):
                run = _client_call(read)
                state = run_flow(
                    manual_trigger, flow_run=run, parameters=run.parameters, return_type="state"
                )
                assert state.is_failed()
                if _attempt == 0:
                    _retry_from_ui(run.id)
    finally:
        get_settings.cache_clear()
    rows = fetch(database_url, "SELECT trigger_id, flow_run_id FROM scheduled_triggers")
    assert len({r[0] for r in rows}) == 2 and {r[1] for r in rows} == {str(run.id)}, rows


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ui_retry_of_failed_runs_redoes_their_work(prefect_api_url, database_url, tmp_path):
    from prefect.deployments import run_deployment

    add_device(database_url, "QUIET")  # never executes a trigger
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_API_URL=prefect_api_url,
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        DATABASE_URL=database_url,
        STORAGE_URL=(tmp_path / "objects").as_uri(),
        CAMFLEET_DATA_DIR=str(tmp_path / "data"),
    )
    server = Serve(env, tmp_path / "serve.log", "manual-trigger,fleet-report")
    blocked = tmp_path / "report"
    blocked.write_text("a file where the report directory should be")
    try:
        server.start()
        trigger_run = run_deployment(
            "manual-trigger/manual-trigger",
            parameters={"device_id": "QUIET", "timeout_seconds": 1},
            timeout=0,
        )
        report_run = run_deployment(
            "fleet-report/fleet-report",
            parameters={"days": 1, "out_dir": str(blocked)},
            timeout=0,
        )
        _wait_state(trigger_run.id, {"FAILED"})
        _wait_state(report_run.id, {"FAILED"})  # after its own automatic retry
        assert not any(Path(tmp_path).glob("report/*"))
        # results were persisted where serve put them
        assert any((tmp_path / "data" / "prefect-results").iterdir())

        _retry_from_ui(trigger_run.id)
        blocked.unlink()  # the user fixed the cause, then pressed Retry
        _retry_from_ui(report_run.id)

        _wait_state(report_run.id, {"COMPLETED"})
        assert (blocked / "captures.parquet").exists()  # written, not a cached result
        _wait_state(trigger_run.id, {"FAILED"})  # the device still does not answer...
        rows = fetch(
            database_url,
            "SELECT trigger_id, flow_run_id, status FROM scheduled_triggers ORDER BY created_at",
        )
        # ...but the retry made a second trigger rather than reusing the first one
        assert len({r[0] for r in rows}) == 2, rows
        assert {r[1] for r in rows} == {str(trigger_run.id)}
        assert {r[2] for r in rows} == {"failed"}
        names = _task_run_names(trigger_run.id)
        assert sum(n.startswith("create-manual-trigger") for n in names) == 2, names
    finally:
        server.stop()


# ---- every other deployment: fail part-way, Retry from the UI, finish the rest --------
#
# Each deployment of prefect.yaml (manual-trigger and fleet-report above,
# mqtt-ingest-record in tests/test_mqtt_record_deployment.py) gets one run from its
# deployment that fails part-way through, for a cause fixed before the Retry: the
# database refuses writes to one table after the first `after` rows (a trigger added
# for the test, raising as a constraint or a disk-full would). The retried run (same
# run id, result persistence on) must finish the rest and do nothing a second time.

FAULT_SQL = """
CREATE TABLE IF NOT EXISTS retry_faults (
    tbl text NOT NULL, op text NOT NULL, after int NOT NULL, seen int NOT NULL DEFAULT 0,
    PRIMARY KEY (tbl, op));
CREATE OR REPLACE FUNCTION retry_fault() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE hit boolean;
BEGIN
    -- counted in the writing transaction: a refused write is not counted
    UPDATE retry_faults SET seen = seen + 1 WHERE tbl = TG_TABLE_NAME AND op = TG_OP
        RETURNING seen > after INTO hit;
    IF hit THEN
        RAISE EXCEPTION 'test fault: % on % refused', TG_OP, TG_TABLE_NAME;
    END IF;
    RETURN NEW;
END $$;
"""


class WriteFault:
    """The database refuses `op` on `table` after `after` rows, until `fix()`."""

    def __init__(self, dsn: str, table: str, op: str, after: int = 0) -> None:
        self.dsn, self.table, self.op = dsn, table, op
        self._sql(FAULT_SQL)
        self._sql(
            f"CREATE TRIGGER retry_fault BEFORE {op} ON {table}"
            " FOR EACH ROW EXECUTE FUNCTION retry_fault();"
            "INSERT INTO retry_faults (tbl, op, after) VALUES (%s, %s, %s)",
            (table, op, after),
        )

    def _sql(self, sql: str, args=None) -> None:
        from contextlib import closing

        import psycopg2

        with closing(psycopg2.connect(self.dsn)) as conn, conn, conn.cursor() as cur:
            cur.execute(sql, args)

    def fix(self) -> None:
        self._sql(f"DROP TRIGGER retry_fault ON {self.table}")


@pytest.fixture
def retry_env(prefect_api_url, database_url, monkeypatch, tmp_path):
    """This process set up as a worker's flow run: the test database and store, result
    persistence on, and no waits between task or flow retries (the faults here last
    until fixed, so waiting would only slow the test)."""
    from prefect.settings import (
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        PREFECT_RESULTS_PERSIST_BY_DEFAULT,
        temporary_settings,
    )

    from camfleet.settings import get_settings
    from tests.test_results_persistence import _camfleet_tasks

    for t in _camfleet_tasks():
        if t.retries:
            monkeypatch.setattr(t, "retry_delay_seconds", [0] * t.retries)
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("STORAGE_URL", (tmp_path / "objects").as_uri())
    get_settings.cache_clear()
    settings = {
        PREFECT_RESULTS_PERSIST_BY_DEFAULT: True,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "results",
    }
    with temporary_settings(settings):
        yield database_url
    get_settings.cache_clear()


def _fail_then_retry(flow, parameters: dict, fault, fix=None):
    """A run of `flow`'s deployment fails with `fault` in place; `fix` (default: the
    fault's) removes the cause, the UI's Retry is pressed and the same run runs again.
    Returns (run id, the retried run's result)."""
    import asyncio
    import inspect

    from prefect.flow_engine import run_flow

    deployment_id = flow.to_deployment(name=flow.name).apply()
    quick = flow.with_options(retry_delay_seconds=0)  # its own retries, without the wait

    async def create(client):
        return await client.create_flow_run_from_deployment(deployment_id, parameters=parameters)

    run = _client_call(create)

    def attempt():
        async def read(client):
            return await client.read_flow_run(run.id)

        current = _client_call(read)
        state = run_flow(
            quick, flow_run=current, parameters=current.parameters, return_type="state"
        )
        return asyncio.run(state) if inspect.isawaitable(state) else state

    first = attempt()
    assert first.is_failed(), first
    (fix or fault.fix)()
    _retry_from_ui(run.id)
    second = attempt()
    assert second.is_completed(), second
    return run.id, second.result()


def test_ui_retry_of_trigger_scheduler_plans_the_window_once(retry_env):
    from flows.triggers import trigger_scheduler

    add_device(retry_env, "RT1", {"trigger": {"enabled": True, "interval_seconds": 10}})
    add_device(retry_env, "RT2", {"trigger": {"enabled": True, "interval_seconds": 10}})
    fault = WriteFault(retry_env, "scheduled_triggers", "INSERT")
    run_id, summary = _fail_then_retry(trigger_scheduler, {"window_seconds": 60}, fault)
    rows = fetch(retry_env, "SELECT device_id, scheduled_at, flow_run_id FROM scheduled_triggers")
    assert summary["created"] == summary["planned"] == len(rows) >= 10, (summary, rows)
    assert {r[0] for r in rows} == {"RT1", "RT2"}
    assert {r[2] for r in rows} == {str(run_id)}


def test_ui_retry_of_expire_triggers_ends_each_trigger_once(retry_env):
    from flows.triggers import expire_triggers, trigger_scheduler

    add_device(retry_env, "RX1", {"trigger": {"enabled": True, "interval_seconds": 10}})
    planned = trigger_scheduler(window_seconds=40)["created"]
    with db.transaction(retry_env) as conn, conn.cursor() as cur:  # their time is up
        cur.execute(
            "UPDATE scheduled_triggers SET scheduled_at = scheduled_at - interval '1 day',"
            " expires_at = now() - interval '1 hour'"
        )
    fault = WriteFault(retry_env, "scheduled_triggers", "UPDATE")
    _, summary = _fail_then_retry(expire_triggers, {}, fault)
    assert summary["expired"] == planned >= 3, summary
    assert fetch(retry_env, "SELECT DISTINCT status FROM scheduled_triggers") == [("expired",)]


def test_ui_retry_of_evaluate_captures_scores_the_rest_once(retry_env):
    from flows.evaluation import evaluate_captures
    from tests.test_results_persistence import _add_capture

    add_device(retry_env, "RE1")
    for i in range(5):
        _add_capture(retry_env, "RE1", f"c{i}")
    # one capture per batch: two batches are saved, the third is refused
    fault = WriteFault(retry_env, "captures", "UPDATE", after=2)
    _, summary = _fail_then_retry(evaluate_captures, {"batch_size": 1}, fault)
    assert summary["scored"] == 3, summary  # the two scored before are not scored again
    assert fetch(
        retry_env, "SELECT count(*) FROM captures WHERE evaluation_status = 'pending'"
    ) == [(0,)]


def test_ui_retry_of_lifelog_processing_records_every_item_once(retry_env):
    from flows.ingest_processing import lifelog_ingest_processing
    from tests.test_results_persistence import _add_lifelog_items

    add_device(retry_env, "RL1")
    _add_lifelog_items(retry_env, "RL1", 3)
    # the run adopts the 3 items (3 row updates), then recording them is refused
    fault = WriteFault(retry_env, "captures", "UPDATE", after=3)
    run_id, summary = _fail_then_retry(lifelog_ingest_processing, {}, fault)
    assert summary == {"items": 3, "verified": 3, "failed": 0}
    rows = fetch(retry_env, "SELECT ingest_status, sha256 IS NOT NULL, flow_run_id FROM captures")
    assert rows == [("stored", True, str(run_id))] * 3
    assert lifelog_ingest_processing() == {"items": 0}  # nothing left to do twice


def test_ui_retry_of_fleet_health_opens_one_incident(retry_env):
    from camfleet import alerts
    from flows.fleet_health import fleet_health
    from tests.test_alerts import add_device as add_seen_device

    add_seen_device(retry_env, "RH1", interval=60, seen_ago=600)  # silent
    fault = WriteFault(retry_env, "device_alerts", "INSERT")
    _, summary = _fail_then_retry(fleet_health, {"service_urls": {}}, fault)
    assert summary["transitions"] == [(alerts.SILENT, "RH1")], summary
    assert fetch(retry_env, "SELECT count(*) FROM device_alerts") == [(1,)]
    assert fleet_health(service_urls={})["transitions"] == []


def test_ui_retry_of_prune_flow_runs_after_a_bad_setting(retry_env, monkeypatch, tmp_path):
    import os

    from flows.maintenance import prune_flow_runs

    RETENTION_ENV = "CAMFLEET_FLOW_RUN_RETENTION_DAYS"

    old = tmp_path / "results" / "old-result"
    old.parent.mkdir(parents=True, exist_ok=True)
    old.write_text("a result of a run long pruned")
    os.utime(old, (0, 0))
    monkeypatch.setenv(RETENTION_ENV, "0")  # refused: at least one day
    _, summary = _fail_then_retry(
        prune_flow_runs, {}, None, fix=lambda: monkeypatch.setenv(RETENTION_ENV, "3")
    )
    assert summary["retention_days"] == 3 and summary["result_files_deleted"] == 1
    assert not old.exists()


def test_ui_retry_of_prune_device_logs_deletes_the_rest_once(retry_env):
    from datetime import timedelta

    from flows.maintenance import prune_device_logs
    from tests.test_maintenance import _add_log_rows, _ages_in_days

    log = _add_log_rows(retry_env, "device_publish_log", 12, timedelta(days=9))
    status = _add_log_rows(retry_env, "device_status", 5, timedelta(days=40))
    _add_log_rows(retry_env, "device_status", 2, timedelta(days=1))
    # The publish log is pruned (and committed), then the status table refuses deletes.
    fault = WriteFault(retry_env, "device_status", "DELETE")
    _, summary = _fail_then_retry(prune_device_logs, {}, fault)
    assert summary["device_publish_log"]["deleted"] == 0  # done by the failed run
    assert summary["device_status"]["deleted"] == 5
    assert _ages_in_days(retry_env, "device_publish_log", log) == []
    assert _ages_in_days(retry_env, "device_status", status) == [1, 1]


def test_ui_retry_of_event_upload_uploads_the_rest_once(retry_env, sshd, tmp_path):
    from camfleet.uploader.simulate import local_config, write_event
    from flows.event_upload import event_upload
    from tests.faults_prefect_support import check_invariants, install_lock_audit, write_config

    install_lock_audit(retry_env)
    config = local_config(sshd, retry_env, tmp_path / f"site-{uuid.uuid4().hex[:8]}")
    cfg = config["uploader"]
    written = {}
    for i in range(4):
        event_id = f"retry{i:03d}"
        video = os.urandom(4096)
        _, json_path = write_event(Path(cfg["pending_dir"]), event_id, video=video)
        written[event_id] = _written(video, json_path)
    # phase 3 ('completed') is refused after one event: the others were sent already
    fault = WriteFault(retry_env, "events", "UPDATE", after=1)
    params = {"config_path": str(write_config(tmp_path / "config.json", config)), "task_retries": 0}
    _, summary = _fail_then_retry(event_upload, params, fault)
    check = check_invariants(cfg, retry_env, written, drained=True)
    assert (check.lost, check.duplicated, check.partial_remote, check.temp_remote) == (
        0,
        0,
        0,
        0,
    ), check.problems
    assert check.uploaded == 4 and check.unlocked_writes == 0
    assert not any(Path(cfg["pending_dir"]).iterdir())


def _written(video: bytes, json_path: Path):
    from tests.faults_prefect_support import Written, sha256

    body = json_path.read_bytes()
    return Written(sha256(video), len(video), sha256(body), len(body))


@pytest.mark.slow  # ~100 s here: the broker connect is tried and given up four times
def test_ui_retry_of_edge_batch_upload_uploads_every_image_once(
    retry_env, mosquitto, s3, bucket, tmp_path
):
    """The broker named in ento.conf did not answer (a wrong port): the run fails before
    touching a file; ento.conf is fixed and the Retry uploads every image, once."""

    from camfleet.localsvc import free_port
    from flows.edge_batch import edge_batch_upload, run_uploads_received
    from services.signer import Signer
    from tests.test_edge_flow import seed_conf
    from tests.test_edge_transaction import broker_block, make_store, write_images

    serial = f"ENTO-{uuid.uuid4().hex[:6]}"
    conf = seed_conf(tmp_path, serial, mosquitto, PORT=free_port(), TLS=False)  # no one there
    shas = write_images(tmp_path / "cameraImageRepo", 7)
    signer = Signer(
        make_store(s3, bucket),
        retry_env,
        broker_block(mosquitto),
        client_id=f"signer-{uuid.uuid4().hex[:6]}",
        handoff=run_uploads_received,
    )
    with signer:
        assert signer.wait_connected(10)
        _, summaries = _fail_then_retry(
            edge_batch_upload,
            {"config_path": conf, "min_age_s": 0},
            None,
            fix=lambda: seed_conf(tmp_path, serial, mosquitto, PORT=mosquitto.port, TLS=False),
        )
    assert [s["deleted"] for s in summaries] == [5, 2]
    rows = fetch(retry_env, "SELECT device_capture_id FROM captures WHERE device_id = %s", serial)
    assert sorted(r[0] for r in rows) == sorted(shas)  # each once
    assert list((tmp_path / "cameraImageRepo").iterdir()) == []
    assert list((tmp_path / "bufferStorage").iterdir()) == []
