"""Lifelog ingest processing: one flow run per time window of ingests, not per item.

The device API (services/api/ingest_batches.py) creates one run of this flow's
deployment per WINDOW_S-second window, ahead of time, and answers every ingest of that
window with the run's id as `task_id`. When the run starts (shortly after its window
closes) it:

1. claims its items: the captures carrying its run id, plus any ingested while
   Prefect was unreachable (no run id yet);
2. verifies each object in storage: it still exists, its size, its SHA-256;
3. records the result on the capture (sha256, size, `ingest_status` stored or failed),
   which is where the evaluation flow picks them up (evaluation_status 'pending').

Three task runs per window whatever the ingest rate: the Prefect server's cost per
task run (35-50 ms of CPU) stays flat.

Serve it with `python -m flows.ingest_processing` (or via prefect.yaml).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.cache_policies import INPUTS, NO_CACHE, RUN_ID, TASK_SOURCE
from prefect.runtime import flow_run

from camfleet import db

DEPLOYMENT = "lifelog-ingest-processing"
# Items whose ingest found Prefect unreachable are adopted once they are this old, so
# an ingest committing right now is not snatched from the run the API is creating.
ORPHAN_MIN_AGE_S = 30
# Objects verified in parallel: storage round trips dominate, not CPU; eight keeps a
# small box's storage connection pool (boto3 default 10) busy without queueing.
VERIFY_THREADS = 8


def _dsn(database_block: str | None) -> str:
    from camfleet import resolve

    return resolve.database_url(database_block)


@task(
    name="claim-ingest-items",
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    cache_policy=NO_CACHE,
    persist_result=False,  # the item list is re-read on every attempt anyway
)
def claim_items(run_id: str, database_block: str | None = None) -> list[dict]:
    import psycopg2.extras

    conn = db.connect(_dsn(database_block), cursor_factory=psycopg2.extras.RealDictCursor)
    try:
        with db.transaction(conn):
            waiting = db.queries.recovery_lifelog_waiting_runs(
                conn, flow_run_id=run_id, min_age_s=float(ORPHAN_MIN_AGE_S)
            )
        ended = ended_runs([r["flow_run_id"] for r in waiting])
        with db.transaction(conn):
            db.queries.devices_ingest_adopt_orphans(
                conn, flow_run_id=run_id, min_age_s=float(ORPHAN_MIN_AGE_S)
            )
            if ended:
                db.queries.recovery_lifelog_adopt_from_runs(
                    conn, flow_run_id=run_id, ended_run_ids=ended
                )
            rows = db.queries.devices_ingest_items_for_run(conn, flow_run_id=run_id)
        return [dict(r) for r in rows]
    finally:
        conn.close()


def ended_runs(run_ids: list[str]) -> list[str]:
    """The runs among `run_ids` that will never process their items: ended (completed,
    failed for good, crashed, cancelled) or deleted. Their items are adopted, so a run
    cancelled by a stop or killed with its machine loses nothing."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    ended = []
    with get_client(sync_client=True) as client:
        for run_id in run_ids:
            try:
                state = client.read_flow_run(UUID(run_id)).state
            except ValueError:  # not a Prefect run id: not ours to judge
                continue
            except ObjectNotFound:  # deleted (pruned, or by hand)
                ended.append(run_id)
                continue
            if state is None or state.is_final():
                ended.append(run_id)
    return ended


def _verify_one(store, item: dict) -> dict:
    key = item["storage_path"]
    info = store.head(key)
    if info is None:
        return {
            "record_id": item["record_id"],
            "device_id": item.get("device_id"),
            "ok": False,
            "reason": "object missing",
        }
    return {
        "record_id": item["record_id"],
        "device_id": item.get("device_id"),
        "ok": True,
        "size": info.size,
        "sha256": info.sha256 or store.checksum(key),
    }


# Verifying reads storage only and depends on nothing but its items, so a retried run
# (same run id: the UI's Retry) reuses the hashes it already computed; another run
# never does, in case an object was replaced since.
@task(
    name="verify-objects",
    retries=3,
    retry_delay_seconds=[5, 30, 60],
    cache_policy=INPUTS + TASK_SOURCE + RUN_ID,
)
def verify_objects(items: list[dict], storage_url: str | None = None) -> list[dict]:
    from camfleet.storage import open_store

    store = open_store(storage_url)
    with ThreadPoolExecutor(VERIFY_THREADS) as pool:
        return list(pool.map(lambda item: _verify_one(store, item), items))


@task(name="record-verification", retries=3, retry_delay_seconds=[2, 10, 30], cache_policy=NO_CACHE)
def record_results(results: list[dict], database_block: str | None = None) -> dict:
    now = datetime.now(UTC).isoformat()
    with db.transaction(_dsn(database_block)) as conn:
        for r in results:
            db.queries.devices_ingest_record_verified(
                conn,
                record_id=r["record_id"],
                sha256=r.get("sha256"),
                image_bytes=r.get("size"),
                ingest_status="stored" if r["ok"] else "failed",
                patch={"processed_at": now, **({} if r["ok"] else {"error": r["reason"]})},
            )
    from tasks.events import emit_per_device

    for status, ok in (("stored", True), ("failed", False)):
        pairs = [(r.get("device_id"), r["record_id"]) for r in results if r["ok"] is ok]
        emit_per_device(f"camfleet.capture.{status}", pairs, {"path": "lifelog"})
    ok = sum(1 for r in results if r["ok"])
    return {"items": len(results), "verified": ok, "failed": len(results) - ok}


# Safe to re-run: its items stay tied to its run id until recorded, and recording is
# an idempotent UPDATE.
@flow(name=DEPLOYMENT, log_prints=False, retries=2, retry_delay_seconds=30, timeout_seconds=600)
def lifelog_ingest_processing(
    window_start: str | None = None,
    storage_url: str | None = None,
    database_block: str | None = None,
) -> dict:
    """Verify and record every Lifelog item ingested in one window."""
    logger = get_run_logger()
    run_id = str(flow_run.id)
    items = claim_items(run_id, database_block)
    results = verify_objects(items, storage_url) if items else []
    summary = record_results(results, database_block) if results else {"items": 0}
    logger.info("window %s: %s", window_start, summary)
    return summary


if __name__ == "__main__":
    lifelog_ingest_processing.serve(name=DEPLOYMENT)
