"""Tasks of the MQTT chunk-ingest flow (seed 002): store objects, write rows, publish ACK_OK.

Each task works on a whole *batch* of finished images (see flows/mqtt_ingest.py for why)
and on per-image state kept in the process (`IngestBatch`): image bytes never travel
through the Prefect API as parameters or results, only the small manifest does.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from camfleet import db
from camfleet.keys import BadName, object_key, sanitize_name
from camfleet.protocol.assembler import FinalizeImage, encode_ack, sensor_reading

# Retries of the storage and database tasks: 3 retries 0.5/1/2 s apart ride out a
# store or database restart of a few seconds while the device (which resends after its
# own ACK timeout) still holds the image.  ONE policy: the Prefect tasks below take it
# as `retries`/`retry_delay_seconds`, and the no-Prefect path (`call_with_retries`)
# waits the very same delays.
TASK_RETRIES = 3
RETRY_BACKOFF_S = 0.5
RETRY_DELAYS_S: list[float] = exponential_backoff(RETRY_BACKOFF_S)(TASK_RETRIES)
RETRY = {"retries": TASK_RETRIES, "retry_delay_seconds": RETRY_DELAYS_S}
# The error codes of a batch step that failed after its retries (docs/mqtt-ingest.md).
E_STORE = 2204
E_RECORD = 2205
# Objects of one batch are put concurrently (the store is I/O bound).
STORE_THREADS = 8
# Devices without a schedule in devices.config wake every 30 min (the seed's example
# answers "5:30PM", a half-hour slot).
DEFAULT_WAKE_INTERVAL_S = 1800


@dataclass
class Item:
    image: FinalizeImage
    key: str
    capture_id: str  # device_capture_id: the image name (name~sha12 if the name is reused)
    stored: bool = False
    record_id: str | None = None
    duplicate: bool = False  # already stored by an earlier send: ACK again, nothing new
    error: int | None = None  # 2204 / 2205 after retries
    error_message: str | None = None
    next_wake_time: str | None = None
    acked: bool = False
    finalized_at: float = 0.0  # monotonic, when the assembler finished the image


@dataclass
class IngestContext:
    """What the tasks need from the process running them (the assembler service)."""

    store: Any  # camfleet.storage.ObjectStore
    pool: db.Pool
    publish: Callable[[str, bytes], None]  # (topic, payload) -> publish QoS 1
    on_error: Callable[..., None]  # (code, item, message, details)
    on_outbound: Callable[[str, str, bytes], None] = lambda device, topic, payload: None


@dataclass
class IngestBatch:
    batch_id: str
    items: list[Item]
    created: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    flow_run_id: str | None = None


_CONTEXT: IngestContext | None = None
_OWN_CONTEXT: IngestContext | None = None  # built here from the settings (closed on replace)
_CONTEXT_LOCK = threading.Lock()
_BATCHES: dict[str, IngestBatch] = {}
_pool = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="mqtt-store")


def set_context(ctx: IngestContext | None) -> None:
    global _CONTEXT, _OWN_CONTEXT
    with _CONTEXT_LOCK:
        if _OWN_CONTEXT is not None and _OWN_CONTEXT is not ctx:
            _OWN_CONTEXT.pool.close()  # the one context_from_settings() opened here
            _OWN_CONTEXT = None
        _CONTEXT = ctx


def context() -> IngestContext:
    """The assembler's context; in any other process (a worker running the
    `mqtt-ingest-record` deployment, a run retried from the UI) one built from the
    settings: the configured object store and database, no broker."""
    global _CONTEXT, _OWN_CONTEXT
    with _CONTEXT_LOCK:
        if _CONTEXT is None:
            _CONTEXT = _OWN_CONTEXT = context_from_settings()
        return _CONTEXT


def context_from_settings() -> IngestContext:
    from camfleet import resolve
    from camfleet.storage import open_store

    def no_broker(topic: str, payload: bytes) -> None:
        raise RuntimeError("no MQTT broker in this process: only the assembler sends ACKs")

    return IngestContext(
        store=open_store(),
        pool=db.Pool(resolve.database_url(), maxconn=2),
        publish=no_broker,
        on_error=lambda *args, **kwargs: None,
    )


async def call_with_retries(fn: Callable, *args) -> Exception | None:
    """`fn(*args)` under the tasks' retry policy (RETRY) where no Prefect task runs
    (`camfleet assembler --no-prefect`); the last exception, or None once it worked."""
    for delay in [*RETRY_DELAYS_S, None]:
        try:
            await fn(*args)
            return None
        except Exception as exc:
            if delay is None:
                return exc
            await asyncio.sleep(delay)
    return None


def fail_unstored(batch: IngestBatch, ctx: IngestContext) -> None:
    """Error mapping of a store step that failed after its retries: E_STORE per image
    not stored; none is ACKed, so each device keeps its copy and resends."""
    for item in batch.items:
        if not item.stored:
            item.error = E_STORE
            ctx.on_error(E_STORE, item, item.error_message or "store failed after retries")


def fail_unrecorded(batch: IngestBatch, ctx: IngestContext, message: str) -> None:
    """Error mapping of a record step that failed after its retries: E_RECORD per
    stored image without a row (never ACKed)."""
    for item in batch.items:
        if item.stored and item.record_id is None:
            item.error = E_RECORD
            ctx.on_error(E_RECORD, item, message)


def new_batch(images: list[tuple[FinalizeImage, float]]) -> IngestBatch:
    """A batch of (image, monotonic time it was assembled)."""
    items = []
    for img, finalized_at in images:
        key = object_key("esp32", img.device_id, f"{img.sha256[:16]}-{storage_name(img)}")
        items.append(Item(img, key, img.image_name, finalized_at=finalized_at))
    batch = IngestBatch(uuid.uuid4().hex, items)
    _BATCHES[batch.batch_id] = batch
    return batch


def storage_name(img: FinalizeImage) -> str:
    """The file-name part of an image's key.  A device's name that sanitizes to nothing
    ('?', 'é', '日本', '_') gets a stand-in derived from its hash, so the image is still
    stored (and a resend maps to the same key) instead of failing the whole batch."""
    try:
        return sanitize_name(img.safe_name)
    except BadName:
        digest = hashlib.sha256(img.image_name.encode("utf-8", "surrogatepass")).hexdigest()
        return f"img-{digest[:16]}"


def get_batch(batch_id: str) -> IngestBatch:
    return _BATCHES[batch_id]


def forget_batch(batch_id: str) -> None:
    _BATCHES.pop(batch_id, None)


def manifest(batch: IngestBatch) -> list[dict]:
    """The flow-run parameters shown in the UI: which images, never their bytes."""
    return [
        {
            "device_id": i.image.device_id,
            "image_name": i.image.image_name,
            "sha256": i.image.sha256,
            "bytes": len(i.image.data),
        }
        for i in batch.items
    ]


# -- store ------------------------------------------------------------------------------


@task(
    name="store-objects",
    **RETRY,
    cache_policy=NO_CACHE,
)
async def store_objects(batch_id: str) -> int:
    """Put every image of the batch in the object store (content-addressed keys, so a
    re-put of a re-sent image writes the same object, never a second one)."""
    batch, ctx = get_batch(batch_id), context()
    todo = [i for i in batch.items if not i.stored]
    loop = asyncio.get_running_loop()
    results = await asyncio.gather(
        *(loop.run_in_executor(_pool, _put, ctx.store, i) for i in todo),
        return_exceptions=True,
    )
    failed = [(i, r) for i, r in zip(todo, results, strict=True) if isinstance(r, Exception)]
    for i, r in failed:
        i.error_message = f"{type(r).__name__}: {str(r)[:200]}"
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(todo)} objects not stored")
    return len(todo)


def _put(store, item: Item) -> None:
    info = store.put(item.key, item.image.data, content_type="image/jpeg")
    if info.sha256 and info.sha256 != item.image.sha256:
        raise RuntimeError("store returned a different sha256")
    item.stored = True


# -- database -----------------------------------------------------------------------


def _captured_at(meta: dict) -> dt.datetime | None:
    ts = meta.get("capture_timeStamp")
    if not ts:
        return None
    try:
        value = dt.datetime.fromisoformat(ts)
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def next_wake_time(config: dict | None, now: dt.datetime | None = None) -> str:
    """The ACK_OK `next_wake_time` ("5:30PM") from devices.config:

    ``{"schedule": {"interval_seconds": 1800, "timezone": "Europe/Berlin"}}`` wakes at the
    next multiple of the interval (counted from local midnight), or
    ``{"schedule": {"times": ["08:00", "17:30"], "timezone": ...}}`` at the next listed
    time.  No schedule: every DEFAULT_WAKE_INTERVAL_S, UTC.
    """
    sched = (config or {}).get("schedule") or {}
    try:
        tz = ZoneInfo(str(sched.get("timezone") or "UTC"))
    except Exception:
        tz = ZoneInfo("UTC")
    now = (now or dt.datetime.now(dt.UTC)).astimezone(tz)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    wake = None
    times = sched.get("times")
    if isinstance(times, list) and times:
        candidates = []
        for t in times:
            try:
                h, m = (int(x) for x in str(t).split(":")[:2])
                c = midnight.replace(hour=h, minute=m)
            except (ValueError, TypeError):
                continue
            candidates.append(c if c > now else c + dt.timedelta(days=1))
        if candidates:
            wake = min(candidates)
    if wake is None:
        interval = sched.get("interval_seconds")
        if not isinstance(interval, int | float) or isinstance(interval, bool) or interval < 60:
            interval = DEFAULT_WAKE_INTERVAL_S
        elapsed = (now - midnight).total_seconds()
        slots = int(elapsed // interval) + 1
        wake = midnight + dt.timedelta(seconds=slots * interval)
    return wake.strftime("%I:%M%p").lstrip("0")


def _sensor(meta: dict, key: str):
    return meta.get(key)


@task(
    name="record-captures",
    **RETRY,
    cache_policy=NO_CACHE,
)
async def record_captures(batch_id: str, flow_run_id: str | None) -> int:
    """Write `captures` (+ `sensor_readings`) for every stored image in ONE transaction;
    a re-sent image already stored is only marked duplicate (no second row)."""
    batch, ctx = get_batch(batch_id), context()
    items = [i for i in batch.items if i.stored and i.record_id is None and not i.duplicate]
    await asyncio.to_thread(_record, ctx.pool, items, flow_run_id)
    return len(items)


def _record(pool: db.Pool, items: list[Item], flow_run_id: str | None) -> None:
    q = db.queries
    with pool.connection() as conn:
        for device_id in sorted({i.image.device_id for i in items}):
            q.ingest_ensure_device(conn, device_id=device_id)
        results = []
        for item in items:
            img = item.image
            meta = dict(img.metadata)
            if not img.valid:
                meta["quarantine"] = list(img.problems)
            status = "stored" if img.valid else "quarantined"
            params = dict(
                device_id=img.device_id,
                captured_at=_captured_at(img.metadata),
                image_bytes=len(img.data),
                total_chunks=img.total_chunks,
                ingest_status=status,
                storage_path=item.key,
                sha256=img.sha256,
                metadata=meta,
                flow_run_id=flow_run_id,
            )
            capture_id, record_id, dup = item.capture_id, None, False
            for _ in range(2):
                row = q.ingest_upsert_capture(conn, device_capture_id=capture_id, **params)
                if row is not None:
                    record_id = row[0]
                    break
                prev = q.ingest_get_capture(
                    conn, device_id=img.device_id, device_capture_id=capture_id
                )
                if prev is not None and prev[1] == img.sha256:
                    record_id, dup = prev[0], True
                    break
                # the same name stored earlier with other bytes: a new capture
                capture_id = f"{img.image_name}~{img.sha256[:12]}"
            if record_id is None:
                raise RuntimeError("capture row neither written nor found")
            if not dup:
                q.ingest_upsert_sensor_reading(
                    conn,
                    device_id=img.device_id,
                    capture_id=record_id,
                    recorded_at=params["captured_at"],
                    **sensor_reading(img.metadata),
                )
            results.append((item, capture_id, record_id, dup))
        configs = {
            r[0]: r[1]
            for r in q.ingest_device_configs(
                conn, device_ids=sorted({i.image.device_id for i in items})
            )
        }
    # committed: only now is the row durable
    for item, capture_id, record_id, dup in results:
        item.capture_id, item.record_id, item.duplicate = capture_id, record_id, dup
        item.next_wake_time = next_wake_time(configs.get(item.image.device_id))


# -- ACK --------------------------------------------------------------------------------


@task(name="publish-acks", cache_policy=NO_CACHE)
async def publish_acks(batch_id: str) -> int:
    """ACK_OK for every image whose object and row are durable."""
    batch, ctx = get_batch(batch_id), context()
    n = 0
    for item in batch.items:
        if item.record_id is None or item.acked:
            continue
        img = item.image
        payload = encode_ack(img.image_name, item.next_wake_time or next_wake_time(None))
        topic = f"ESP32CAM/{img.device_id}/ack"
        ctx.publish(topic, payload)
        ctx.on_outbound(img.device_id, topic, payload)
        item.acked = True
        n += 1
    return n


# -- recording (the default ACK path: see services/assembler/__init__.py) --------------------------


@task(
    name="verify-objects",
    **RETRY,
    cache_policy=NO_CACHE,
)
async def verify_objects(records: list[dict]) -> int:
    """Every recorded capture's object exists with the recorded size."""
    ctx = context()
    loop = asyncio.get_running_loop()
    heads = await asyncio.gather(
        *(loop.run_in_executor(_pool, ctx.store.head, r["storage_path"]) for r in records)
    )
    bad = [
        r["record_id"]
        for r, h in zip(records, heads, strict=True)
        if h is None or (h.size is not None and h.size != r["bytes"])
    ]
    if bad:
        raise RuntimeError(f"{len(bad)} objects missing or of the wrong size: {bad[:5]}")
    return len(records)


@task(name="find-unrecorded", **RETRY, cache_policy=NO_CACHE)
async def find_unrecorded(min_age_s: float, max_rows: int) -> list[dict]:
    """Stored MQTT captures that no recording run stamped, as records (oldest first)."""
    ctx = context()

    def read() -> list[dict]:
        with ctx.pool.connection() as conn:
            rows = db.queries.mqtt_record_unrecorded(conn, min_age_s=min_age_s, max_rows=max_rows)
            return [{"record_id": r[0], "storage_path": r[1], "bytes": r[2]} for r in rows]

    return await asyncio.to_thread(read)


@task(
    name="stamp-captures",
    **RETRY,
    cache_policy=NO_CACHE,
)
async def stamp_captures(record_ids: list[str], flow_run_id: str) -> int:
    """Record this flow run's id on the captures it covers."""
    ctx = context()

    def stamp():
        with ctx.pool.connection() as conn:
            db.queries.ingest_stamp_flow_run(conn, flow_run_id=flow_run_id, record_ids=record_ids)

    await asyncio.to_thread(stamp)
    return len(record_ids)
