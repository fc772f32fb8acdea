"""Evaluation of stored captures: Pillow scores, written back in batches.

Each run takes the oldest captures with `evaluation_status='pending'` in batches of
`batch_size`; one task per batch reads the images from object storage, scores them
(`tasks/images.py`: decodes, dimensions, brightness, contrast, sharpness, blank or
covered lens, blur, exposure) and writes every result of the batch in one UPDATE.
The batch rows are locked (`FOR UPDATE SKIP LOCKED`) while they are scored, so two
runs share a backlog without scoring a capture twice. A capture whose object cannot
be read or decoded ends `failed` with the reason; nothing stays pending forever.

Other pipelines can score their own captures by id: `evaluate_captures(record_ids=[...])`.
"""

from __future__ import annotations

import json
from collections import Counter

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from camfleet import db, resolve

# Captures per task run: the Prefect server spends ~40 ms per task run, a 512 px score
# ~10-30 ms per image, so 200 images keep orchestration under a tenth of the work.
DEFAULT_BATCH_SIZE = 200
# Batches per flow run: bounds one run to a few minutes; the next run continues.
DEFAULT_MAX_BATCHES = 50
# Objects bigger than this are not scored (marked failed): the API accepts at most 8 MiB
# per image, so anything larger did not come through a camfleet ingest path.
MAX_SCORED_BYTES = 32 * 1024 * 1024


def evaluate_batch(
    dsn: str,
    store,
    limit: int = DEFAULT_BATCH_SIZE,
    record_ids: list[str] | None = None,
    failed: list[tuple[str, str]] | None = None,
) -> Counter:
    """Score one batch of pending captures; returns counts of verdicts and statuses.

    failed: when given, gets (device_id, record_id) of every capture that failed.
    """
    from tasks.images import score_image

    counts: Counter = Counter()
    with db.transaction(dsn) as conn:
        if record_ids is None:
            rows = list(db.queries.eval_pending_captures(conn, limit=limit))
        else:
            rows = list(db.queries.eval_captures_by_ids(conn, record_ids=record_ids))
        ids, statuses, results = [], [], []
        for record_id, device_id, storage_path, _content_type in rows:
            try:
                info = store.head(storage_path)
                if info is None:
                    raise FileNotFoundError("object missing from storage")
                if info.size > MAX_SCORED_BYTES:
                    raise ValueError(f"object larger than {MAX_SCORED_BYTES} bytes")
                result = score_image(store.get(storage_path))
            except Exception as exc:  # storage trouble: record it, do not stall the batch
                result = {"decodes": None, "verdict": "unreadable", "reason": type(exc).__name__}
            status = "completed" if result.get("decodes") else "failed"
            ids.append(record_id)
            statuses.append(status)
            results.append(json.dumps(result))
            counts[status] += 1
            if failed is not None and status == "failed":
                failed.append((device_id, record_id))
            counts["verdict:" + result["verdict"]] += 1
        if ids:
            db.queries.eval_save_results(conn, record_ids=ids, statuses=statuses, results=results)
    counts["scored"] = len(ids)
    return counts


# NO_CACHE: every call takes the next pending batch; a cached result would skip it.
@task(name="evaluate-capture-batch", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def evaluate_batch_task(
    dsn: str, storage_url: str | None, limit: int, record_ids: list[str] | None = None
) -> dict:
    from camfleet.storage import open_store
    from tasks.events import emit_per_device

    failed: list[tuple[str, str]] = []
    counts = evaluate_batch(dsn, open_store(storage_url), limit, record_ids, failed)
    emit_per_device("camfleet.capture.evaluation-failed", failed)  # after the commit
    return dict(counts)


# Safe to re-run: it only takes captures still pending, locked while scored.
@flow(name="evaluate-captures", retries=1, retry_delay_seconds=10, timeout_seconds=900)
def evaluate_captures(
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_batches: int = DEFAULT_MAX_BATCHES,
    record_ids: list[str] | None = None,
    storage_url: str | None = None,
    database_block: str | None = None,
) -> dict:
    """Score pending captures (or the given ones) until none are left or max_batches."""
    logger = get_run_logger()
    dsn = resolve.database_url(database_block)
    total: Counter = Counter()
    if record_ids is not None:
        for i in range(0, len(record_ids), batch_size):
            total.update(
                evaluate_batch_task(dsn, storage_url, batch_size, record_ids[i : i + batch_size])
            )
    else:
        for _ in range(max_batches):
            counts = evaluate_batch_task(dsn, storage_url, batch_size)
            total.update(counts)
            if counts.get("scored", 0) < batch_size:
                break
    logger.info("evaluated %s", dict(total))
    return dict(total)
