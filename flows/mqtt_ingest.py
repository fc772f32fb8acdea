"""MQTT chunk ingest (seed 002): the flow runs behind the assembler service.

Two flows, one per ACK path of services/assembler/__init__.py (its docstring has the measured
decision):

``mqtt-ingest-record`` (default): the service has stored objects, written rows and
sent ACK_OK in its own batches (the tasks' bodies below, with their retries); one run
per interval verifies the objects of every capture ACKed since the last run and puts
its id on their rows.

``mqtt-ingest`` (``--ack-path flow``): one run per batch of finished images tells the
whole story: put every image in object storage, write their `captures` and
`sensor_readings` rows in one transaction (the run's id on each row), then publish
ACK_OK.  An image whose object could not be stored after retries gets error 2204, one
whose row could not be written 2205; neither is ACKed, so the device keeps its copy
and resends.

Why batches and never a run per image: a flow run costs ~0.2 s (async) and each task
run ~35-50 ms of Prefect-server CPU on this 2-core machine (DESIGN.md, "Prefect as
measured"), so one run per image would saturate the server at fleet rates.

The flows are called in-process by the assembler service (never through a deployment:
a deployment run spawns a process, ~2.5 s).  Image bytes stay in the process; the run's
parameters are the batch id and a manifest (device, image, sha256, bytes).
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from tasks.mqtt import (
    context,
    get_batch,
    publish_acks,
    record_captures,
    stamp_captures,
    store_objects,
    verify_objects,
)


@flow(name="mqtt-ingest", log_prints=False, persist_result=False, validate_parameters=False)
async def mqtt_ingest(batch_id: str, images: list[dict]) -> dict:
    """Store, record and ACK one batch of assembled ESP32-CAM images."""
    logger = get_run_logger()
    batch, ctx = get_batch(batch_id), context()
    batch.flow_run_id = str(flow_run.get_id())

    stored = await store_objects(batch_id, return_state=True)
    if stored.is_failed():
        for item in batch.items:
            if not item.stored:
                item.error = 2204
                ctx.on_error(2204, item, item.error_message or "store failed after retries")

    if any(i.stored for i in batch.items):
        recorded = await record_captures(batch_id, batch.flow_run_id, return_state=True)
        if recorded.is_failed():
            message = await _state_message(recorded)
            for item in batch.items:
                if item.stored and item.record_id is None:
                    item.error = 2205
                    ctx.on_error(2205, item, message)

    acked = await publish_acks(batch_id)
    summary = {
        "images": len(batch.items),
        "stored": sum(1 for i in batch.items if i.record_id and not i.duplicate),
        "duplicates": sum(1 for i in batch.items if i.duplicate),
        "quarantined": sum(1 for i in batch.items if i.record_id and not i.image.valid),
        "failed": sum(1 for i in batch.items if i.error),
        "acked": acked,
    }
    logger.info("batch %s: %s", batch_id[:8], summary)
    return summary


async def _state_message(state) -> str:
    try:
        await state.aresult()
    except Exception as exc:  # the task's final exception, without secrets (no DSN)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return state.message or "failed"


async def run_batch_direct(batch_id: str) -> dict:
    """The same steps without Prefect (``camfleet assembler --no-prefect``): the tasks'
    bodies with the same retries, no flow run, rows without flow_run_id."""
    import asyncio

    from tasks.mqtt import RETRY_BACKOFF_S, TASK_RETRIES

    batch, ctx = get_batch(batch_id), context()

    async def retried(fn, *args) -> Exception | None:
        for attempt in range(TASK_RETRIES + 1):
            try:
                await fn(*args)
                return None
            except Exception as exc:
                if attempt == TASK_RETRIES:
                    return exc
                await asyncio.sleep(RETRY_BACKOFF_S * 2**attempt)
        return None

    if await retried(store_objects.fn, batch_id) is not None:
        for item in batch.items:
            if not item.stored:
                item.error = 2204
                ctx.on_error(2204, item, item.error_message or "store failed after retries")
    if any(i.stored for i in batch.items):
        exc = await retried(record_captures.fn, batch_id, None)
        if exc is not None:
            for item in batch.items:
                if item.stored and item.record_id is None:
                    item.error = 2205
                    ctx.on_error(2205, item, f"{type(exc).__name__}")
    return {"acked": await publish_acks.fn(batch_id)}


@flow(name="mqtt-ingest-record", log_prints=False, persist_result=False, validate_parameters=False)
async def mqtt_ingest_record(records: list[dict]) -> dict:
    """The default ACK path's flow run (see services/assembler/__init__.py): the service has
    stored, recorded and ACKed these captures in its own batches; this run verifies
    their objects and puts its id on their rows, so the UI shows which run covers which
    capture without a flow run sitting between a device's last chunk and its ACK_OK."""
    logger = get_run_logger()
    run_id = str(flow_run.get_id())
    verified = await verify_objects(records)
    stamped = await stamp_captures([r["record_id"] for r in records], run_id)
    summary = {"captures": len(records), "verified": verified, "stamped": stamped}
    logger.info("recorded %s", summary)
    return summary
