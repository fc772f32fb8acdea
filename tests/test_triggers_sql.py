"""The trigger lifecycle is SQL only: every transition of sql/queries/triggers.sql on
real PostgreSQL, ``pending -> sent -> executed | failed | expired``, and final states
that no statement changes. (There is no Python copy of these rules to agree with.)"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from camfleet import db
from camfleet.protocol import triggers as core
from tasks import triggers as trig
from tests.test_api_commands_helpers import add_device

DEV = "SQLCAM"


def _status(dsn, trigger_id):
    return trig.trigger_state(dsn, trigger_id)["status"]


def _new(dsn, ttl=60.0):
    return trig.create_manual(dsn, DEV, ttl_seconds=ttl)


def _claim(dsn, trigger_id):
    with db.transaction(dsn) as conn:
        return db.queries.triggers_claim(conn, trigger_id=trigger_id, device_id=DEV)


def _execute(dsn, trigger_id):
    with db.transaction(dsn) as conn:
        return db.queries.triggers_execute(
            conn, trigger_id=trigger_id, device_id=DEV, record_id=None
        )


def _to(dsn, state):
    """A trigger driven into `state` by the statements the running system uses."""
    if state == core.EXPIRED:
        tid = trig.create_manual(
            dsn, DEV, ttl_seconds=1, now=datetime.now(UTC) - timedelta(seconds=5)
        )
        assert trig.sweep(dsn)["expired"] == [tid]
        return tid
    tid = _new(dsn)
    if state in (core.SENT, core.FAILED):
        assert _claim(dsn, tid) is not None
    if state == core.FAILED:
        assert trig.sweep(dsn, execution_timeout=0)["failed"] == [tid]
    if state == core.EXECUTED:
        assert _execute(dsn, tid) is not None
    assert _status(dsn, tid) == state
    return tid


def test_every_transition_of_the_sql_state_machine(database_url):
    add_device(database_url, DEV)
    tid = _new(database_url)
    assert _status(database_url, tid) == core.PENDING
    assert _claim(database_url, tid) is not None  # pending -> sent
    assert _status(database_url, tid) == core.SENT
    assert _claim(database_url, tid) is None  # only one stream claims it
    assert _execute(database_url, tid) is not None  # sent -> executed
    assert _status(database_url, tid) == core.EXECUTED

    direct = _new(database_url)  # an MQTT device captures before the row says "sent"
    assert _execute(database_url, direct) is not None
    assert _status(database_url, direct) == core.EXECUTED

    # the sweep: pending past expiry -> expired, sent past the timeout -> failed,
    # and neither rule touches the other state
    due = trig.create_manual(
        database_url, DEV, ttl_seconds=1, now=datetime.now(UTC) - timedelta(seconds=5)
    )
    assert _claim(database_url, due) is None  # an expired trigger is never claimed
    sent = _new(database_url)
    _claim(database_url, sent)
    fresh = _new(database_url)
    assert trig.sweep(database_url) == {"expired": [due], "failed": []}
    assert trig.sweep(database_url, execution_timeout=0) == {"expired": [], "failed": [sent]}
    assert _status(database_url, due) == core.EXPIRED
    state = trig.trigger_state(database_url, sent)
    assert state["status"] == core.FAILED and "not executed" in state["failed_reason"]
    assert _status(database_url, fresh) == core.PENDING

    trig.fail_trigger(database_url, fresh, "gave up")  # pending -> failed (a flow gives up)
    assert _status(database_url, fresh) == core.FAILED


@pytest.mark.parametrize("final", sorted(core.FINAL_STATES))
def test_no_statement_changes_a_final_state(database_url, final):
    add_device(database_url, DEV)
    tid = _to(database_url, final)
    assert _claim(database_url, tid) is None
    assert _execute(database_url, tid) is None
    trig.fail_trigger(database_url, tid, "again")
    assert trig.sweep(database_url, execution_timeout=0) == {"expired": [], "failed": []}
    assert _status(database_url, tid) == final
