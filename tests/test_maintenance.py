"""prune-flow-runs deletes finished runs older than the retention, and nothing else."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import anyio
import pytest
from prefect import flow

from flows.maintenance import prune_flow_runs, retention_days
from tests.faults_common import wait_until
from tests.test_serve import _client_call

RETENTION_ENV = "CAMFLEET_FLOW_RUN_RETENTION_DAYS"


@flow(name="maintenance-fixture")
def _noop() -> None:
    return None


def test_retention_setting(monkeypatch):
    monkeypatch.setenv(RETENTION_ENV, "3")
    assert retention_days() == 3
    assert retention_days(5) == 5
    for bad in ("0", "-2", "forever", ""):
        monkeypatch.setenv(RETENTION_ENV, bad)
        with pytest.raises(ValueError):
            retention_days()


def test_prune_deletes_only_runs_that_ended_before_the_cutoff(prefect_api_url, monkeypatch):
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Completed, Failed, Running, Scheduled

    from flows.maintenance import prune_before

    old = datetime.now(UTC) - timedelta(days=10)

    async def make(client, states):
        runs = {}
        for name, state in states.items():
            run = await client.create_flow_run(_noop, name=name, state=Scheduled())
            await client.set_flow_run_state(run.id, state, force=True)
            runs[name] = run.id
        return runs

    # The server stamps end times itself, so "old" here means: ended before the cutoff.
    runs = _client_call(
        lambda c: make(
            c,
            {
                "ended-completed": Completed(),
                "ended-failed": Failed(),
                "long-scheduled": Scheduled(scheduled_time=old),  # never ended: kept
                "running": Running(),
            },
        )
    )
    cutoff = datetime.now(UTC) + timedelta(milliseconds=10)
    wait_until(lambda: datetime.now(UTC) > cutoff, 5, 0.01)
    runs |= _client_call(lambda c: make(c, {"ended-after-cutoff": Completed()}))
    assert anyio.run(prune_before, cutoff) >= 2

    async def exists(client):
        present = {}
        for name, run_id in runs.items():
            try:
                await client.read_flow_run(run_id)
                present[name] = True
            except ObjectNotFound:
                present[name] = False
        return present

    assert _client_call(exists) == {
        "ended-completed": False,
        "ended-failed": False,
        "long-scheduled": True,
        "running": True,
        "ended-after-cutoff": True,
    }

    monkeypatch.setenv(RETENTION_ENV, "7")
    summary = asyncio.run(prune_flow_runs())  # the flow: retention from the environment
    assert summary["retention_days"] == 7 and summary["deleted"] == 0


def test_old_result_files_are_deleted(tmp_path):
    import os

    from flows.maintenance import prune_local_results

    old, new = tmp_path / "old-result", tmp_path / "sub" / "new-result"
    new.parent.mkdir()
    for path in (old, new):
        path.write_bytes(b"{}")
    ten_days_ago = (datetime.now(UTC) - timedelta(days=10)).timestamp()
    os.utime(old, (ten_days_ago, ten_days_ago))
    assert prune_local_results(datetime.now(UTC) - timedelta(days=7), tmp_path) == 1
    assert not old.exists() and new.exists()
    assert prune_local_results(datetime.now(UTC), tmp_path / "missing") == 0


# --- prune-device-logs: device_publish_log and device_status ----------------------------


def _add_log_rows(dsn: str, table: str, count: int, age: timedelta, device: str = "AABBCCDDEEFF"):
    """`count` rows `age` old (one second apart, the oldest first) in a device log table."""
    import psycopg2

    column, values = {
        "device_publish_log": (
            "received_at",
            "(device_id, topic, direction, payload, received_at) SELECT %(d)s,"
            " 'ESP32CAM/' || %(d)s || '/data', 'in', jsonb_build_object('chunk_id', i), {t}",
        ),
        "device_status": (
            "created_at",
            "(device_id, status, pending_count, created_at) SELECT %(d)s, 'Alive', i, {t}",
        ),
    }[table]
    when = "now() - %(age)s - make_interval(secs => %(n)s - i)"
    sql = f"INSERT INTO {table} {values.format(t=when)} FROM generate_series(1, %(n)s) AS i"
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql, {"d": device, "n": count, "age": age})
    conn.close()
    return column


def _ages_in_days(dsn: str, table: str, column: str) -> list[int]:
    """The age in whole days of every row left in `table`, youngest first."""
    import psycopg2

    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT extract(day FROM now() - {column})::int FROM {table} ORDER BY 1")
        ages = [r[0] for r in cur.fetchall()]
    conn.close()
    return ages


def test_log_retention_settings(monkeypatch):
    for env, setting, default in (
        ("CAMFLEET_PUBLISH_LOG_RETENTION_DAYS", "publish_log_retention_days", 7),
        ("CAMFLEET_DEVICE_STATUS_RETENTION_DAYS", "device_status_retention_days", 30),
    ):
        monkeypatch.delenv(env, raising=False)
        assert retention_days(None, setting) == default
        monkeypatch.setenv(env, "2")
        assert retention_days(None, setting) == 2
        assert retention_days(9, setting) == 9  # the flow parameter wins
        for bad in ("0", "-1", "week", ""):
            monkeypatch.setenv(env, bad)
            with pytest.raises(ValueError, match=env):  # the error names the variable
                retention_days(None, setting)
        monkeypatch.delenv(env)
        with pytest.raises(ValueError):
            retention_days(0, setting)


def test_prune_rows_deletes_oldest_first_in_bounded_batches_up_to_the_max(database_url):
    from camfleet import db
    from flows.maintenance import prune_rows

    table = "device_publish_log"
    column = _add_log_rows(database_url, table, 27, timedelta(days=10))
    _add_log_rows(database_url, table, 8, timedelta(days=20))
    _add_log_rows(database_url, table, 12, timedelta(days=6))  # newer than the cutoff
    cutoff = datetime.now(UTC) - timedelta(days=7)
    batches = []

    def batch_query(conn, **params):
        assert conn.get_transaction_status() == 0  # each batch in a transaction of its own
        batches.append((params["batch"], db.queries.prune_publish_log_batch(conn, **params)))
        return batches[-1][1]

    assert prune_rows(database_url, batch_query, cutoff, max_deletes=25, batch=10) == 25
    assert batches == [(10, 10), (10, 10), (5, 5)]  # never more than the max
    # the 20-day-old rows went first; 10 of the 27 ten-day-old rows are left
    assert _ages_in_days(database_url, table, column) == [6] * 12 + [10] * 10

    batches.clear()
    assert prune_rows(database_url, batch_query, cutoff, max_deletes=25, batch=4) == 10
    assert batches == [(4, 4), (4, 4), (4, 2)]  # a short batch: nothing old is left
    assert _ages_in_days(database_url, table, column) == [6] * 12
    assert prune_rows(database_url, batch_query, cutoff) == 0


def test_prune_batches_use_the_time_indexes(database_url):
    """With enough rows for the planner to care, a batch never scans the whole table."""
    import psycopg2

    from camfleet import db

    _add_log_rows(database_url, "device_publish_log", 20_000, timedelta(days=1))
    _add_log_rows(database_url, "device_status", 20_000, timedelta(days=1))
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("ANALYZE device_publish_log; ANALYZE device_status")
        for name, index in (
            ("prune_publish_log_batch", "device_publish_log_received_idx"),
            ("prune_device_status_batch", "device_status_created_idx"),
        ):
            sql = getattr(db.queries, name).sql
            cur.execute("EXPLAIN " + sql, {"cutoff": datetime.now(UTC), "batch": 5000})
            plan = "\n".join(r[0] for r in cur.fetchall())
            assert index in plan and "Seq Scan" not in plan, plan
        conn.rollback()
    conn.close()


def test_prune_device_logs_flow(prefect_api_url, database_url, monkeypatch):
    from camfleet.settings import get_settings
    from flows.maintenance import prune_device_logs

    PUBLISH_LOG_RETENTION_ENV = "CAMFLEET_PUBLISH_LOG_RETENTION_DAYS"
    STATUS_RETENTION_ENV = "CAMFLEET_DEVICE_STATUS_RETENTION_DAYS"

    log = _add_log_rows(database_url, "device_publish_log", 30, timedelta(days=8))
    _add_log_rows(database_url, "device_publish_log", 5, timedelta(days=2))
    status = _add_log_rows(database_url, "device_status", 4, timedelta(days=31))
    _add_log_rows(database_url, "device_status", 3, timedelta(days=20))
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.delenv("CAMFLEET_DATABASE_BLOCK", raising=False)
    monkeypatch.delenv(PUBLISH_LOG_RETENTION_ENV, raising=False)
    monkeypatch.delenv(STATUS_RETENTION_ENV, raising=False)
    get_settings.cache_clear()
    try:
        refused = prune_device_logs.with_options(retries=0)
        with pytest.raises(ValueError):
            refused(publish_log_retention_days=0)
        monkeypatch.setenv(STATUS_RETENTION_ENV, "-3")
        with pytest.raises(ValueError):
            refused()
        assert len(_ages_in_days(database_url, "device_publish_log", log)) == 35  # untouched
        monkeypatch.delenv(STATUS_RETENTION_ENV)

        summary = prune_device_logs(max_deletes=20)  # defaults: 7 and 30 days
        assert summary["device_publish_log"]["retention_days"] == 7
        assert summary["device_status"]["retention_days"] == 30
        assert summary["device_publish_log"]["deleted"] == 20
        assert summary["device_publish_log"]["stopped_at_max"] is True
        assert (
            summary["device_status"]["deleted"],
            summary["device_status"]["stopped_at_max"],
        ) == (
            4,
            False,
        )
        summary = prune_device_logs()
        assert summary["device_publish_log"]["deleted"] == 10
        assert summary["device_publish_log"]["stopped_at_max"] is False
        assert _ages_in_days(database_url, "device_publish_log", log) == [2] * 5
        assert _ages_in_days(database_url, "device_status", status) == [20] * 3

        summary = prune_device_logs(publish_log_retention_days=1, device_status_retention_days=10)
        assert summary["device_publish_log"]["deleted"] == 5
        assert summary["device_status"]["deleted"] == 3
    finally:
        get_settings.cache_clear()
