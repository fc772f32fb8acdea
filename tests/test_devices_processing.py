"""task_id is a real Prefect flow run: one per window, shared by the window's items,
and running it verifies and records those items (real Prefect server, PostgreSQL)."""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest
from fastapi.testclient import TestClient

from camfleet import db
from camfleet.storage.local import LocalStore
from services.api.app import create_app
from services.api.ingest_batches import PrefectRuns
from services.api.ratelimit import RateLimits
from tests.test_devices_api import SECRET, ingest, make_user_key, pair_and_activate, upload

JPEG = b"\xff\xd8\xff\xe0" + b"camfleet-test-jpeg" * 64 + b"\xff\xd9"
# One window for the whole test, so both items land in the same run.
TEST_WINDOW_S = 3600


@pytest.fixture
def deployment(prefect_api_url):
    from flows.ingest_processing import DEPLOYMENT, lifelog_ingest_processing

    lifelog_ingest_processing.to_deployment(name=DEPLOYMENT).apply()
    return DEPLOYMENT


def test_items_of_a_window_share_one_flow_run_that_processes_them(
    deployment, database_url, tmp_path, monkeypatch
):
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow

    from flows.ingest_processing import lifelog_ingest_processing

    store = LocalStore(tmp_path / "objects", public_url="http://testserver", secret=SECRET)
    # A loaded CI box can take longer than the production 5 s to answer the first run.
    runs = PrefectRuns(window_s=TEST_WINDOW_S).window_runs(time.time, create_timeout_s=120)
    app = create_app(
        database_url=database_url,
        secret_key=SECRET,
        store=store,
        processing_runs=runs,
        rate_limits=RateLimits(),
    )
    with TestClient(app) as client:
        _, token = pair_and_activate(client, make_user_key(database_url))
        items = []
        for seq in (1, 2):
            target = upload(client, token, seq)
            r = ingest(client, token, target["object_key"], seq)
            assert r.json()["status"] == "queued", r.text
            items.append(r.json())
        store.delete(target["object_key"])  # the second object vanishes before processing
    task_id = items[0]["task_id"]
    assert task_id and items[1]["task_id"] == task_id

    async def read_run():
        async with get_client() as c:
            return await c.read_flow_run(task_id)

    run = asyncio.run(read_run())
    assert run.state.is_scheduled()
    assert run.deployment_id is not None
    assert run.state.state_details.scheduled_time.timestamp() > time.time()

    # Its window is still open (an hour long here): move its start time to now, as the
    # passing of time would, or the engine would wait for the scheduled time.
    async def due_now():
        from prefect.states import Scheduled

        async with get_client() as c:
            await c.set_flow_run_state(task_id, Scheduled(), force=True)
            return await c.read_flow_run(task_id)

    run = asyncio.run(due_now())
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("STORAGE_URL", store.root.as_uri())
    from camfleet.settings import get_settings

    get_settings.cache_clear()
    try:
        summary = run_flow(lifelog_ingest_processing, flow_run=run, parameters=run.parameters)
    finally:
        get_settings.cache_clear()
    assert summary == {"items": 2, "verified": 1, "failed": 1}
    assert asyncio.run(read_run()).state.is_completed()

    with db.transaction(database_url) as conn, conn.cursor() as cur:
        cur.execute("select seq, ingest_status, sha256, flow_run_id from captures order by seq")
        rows = cur.fetchall()
    assert rows == [
        (1, "stored", hashlib.sha256(JPEG).hexdigest(), task_id),
        (2, "failed", None, task_id),
    ]
