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
