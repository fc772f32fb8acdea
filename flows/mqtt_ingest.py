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

The assembler calls both flows in-process (a deployment run spawns a process, ~2.5 s,
far too slow for an ACK).  `mqtt-ingest` stays in-process only: its image bytes live in
the assembler's memory (the parameters are a batch id and a manifest), and a device
whose image was not ACKed resends it, so there is nothing a worker could redo.
`mqtt-ingest-record` is also a deployment (prefect.yaml): its parameters are the whole
story (capture ids, keys, sizes), it runs on any worker with the configured store and
database, and a failed run can be retried from the UI.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from tasks.mqtt import (
    call_with_retries,
    context,
    fail_unrecorded,
    fail_unstored,
    find_unrecorded,
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
        fail_unstored(batch, ctx)

    if any(i.stored for i in batch.items):
        recorded = await record_captures(batch_id, batch.flow_run_id, return_state=True)
        if recorded.is_failed():
            fail_unrecorded(batch, ctx, await _state_message(recorded))

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
    """The same steps without Prefect (``camfleet assembler --no-prefect``, and the
    default ACK path): the tasks' bodies under the tasks' own retry policy and error
    mapping (tasks.mqtt.RETRY, fail_unstored/fail_unrecorded), no flow run, rows
    without flow_run_id."""
    batch, ctx = get_batch(batch_id), context()
    if await call_with_retries(store_objects.fn, batch_id) is not None:
        fail_unstored(batch, ctx)
    if any(i.stored for i in batch.items):
        exc = await call_with_retries(record_captures.fn, batch_id, None)
        if exc is not None:
            fail_unrecorded(batch, ctx, f"{type(exc).__name__}")
    return {"acked": await publish_acks.fn(batch_id)}


# A run without records adopts captures stored at least this long ago that no run has
# stamped: the live recorder stamps its own within seconds (or gives up after minutes).
UNRECORDED_MIN_AGE_S = 600
UNRECORDED_MAX_ROWS = 20_000


# Flow-level retries: both steps are idempotent (a HEAD, an UPDATE setting this run's
# id), so a re-run, by Prefect or from the UI's Retry, does nothing twice.
@flow(
    name="mqtt-ingest-record",
    log_prints=False,
    persist_result=False,
    validate_parameters=False,
    retries=2,
    retry_delay_seconds=5,
    timeout_seconds=600,
)
async def mqtt_ingest_record(
    records: list[dict] | None = None,
    verify: bool = False,
    min_age_s: float = UNRECORDED_MIN_AGE_S,
    max_rows: int = UNRECORDED_MAX_ROWS,
) -> dict:
    """The default ACK path's flow run (see services/assembler/__init__.py): the service has
    stored, recorded and ACKed these captures in its own batches; this run puts its id
    on their rows, so the UI shows which run covers which capture without a flow run
    sitting between a device's last chunk and its ACK_OK.

    `verify=True` also HEADs every object (exists, recorded size).  The assembler
    leaves it off: it already checked each put's answer (size and sha256) before its
    ACK_OK, so reading every object back again only doubled the store's requests.
    A run of the `mqtt-ingest-record` deployment (prefect.yaml) may turn it on.

    Each record: {"record_id", "storage_path", "bytes"}.  Without records (the
    deployment's hourly run) it adopts the stored captures no run has stamped, older
    than `min_age_s`: those the assembler's recorder gave up on while Prefect was down.
    Outside the assembler the tasks use the configured store and database
    (tasks.mqtt.context_from_settings).
    """
    logger = get_run_logger()
    run_id = str(flow_run.get_id())
    if records is None:
        records = await find_unrecorded(min_age_s, max_rows)
    if not records:
        return {"captures": 0, "verified": 0, "stamped": 0}
    verified = await verify_objects(records) if verify else 0
    stamped = await stamp_captures([r["record_id"] for r in records], run_id)
    summary = {"captures": len(records), "verified": verified, "stamped": stamped}
    logger.info("recorded %s", summary)
    return summary
