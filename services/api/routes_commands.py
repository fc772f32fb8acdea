"""Device commands and captures (seed 003, Visant cloud-triggered cameras).

GET  /v1/devices/{device_id}/commands   SSE: connected, pings, capture commands
POST /v1/devices/{device_id}/trigger    a manual capture trigger
GET  /v1/devices/connected              devices streaming from any API instance
POST /v1/captures                       the captured image (base64 JSON, the seed's body)

Authentication: a device sends its `X-Device-Token` (issued by pairing, seed 004) and
an operator sends `Authorization: Bearer <api key>`. The seed's device-id-only mode
(`CAMFLEET_ALLOW_DEVICE_ID_ONLY=true`) accepts devices that have no token by id, and
triggers without a key; a device that has a token must always send it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import resource
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, FastAPI, HTTPException, Path, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sse_starlette import EventSourceResponse, ServerSentEvent

from camfleet.keys import BadName, object_key, safe_id, sanitize_name
from camfleet.protocol import triggers as core
from camfleet.settings import Settings
from services.api import bodies
from services.api.bodies import Text, UtcDatetime
from services.api.command_hub import CommandHub, MqttCommandSender
from services.api.db import queries

log = logging.getLogger("camfleet.api.commands")

# A 5 MP JPEG is ~2-3 MB; base64 adds a third. 12 MiB of body leaves room for a high
# quality frame and its metadata, and bounds what one request can make us hold.
MAX_CAPTURE_BODY_BYTES = 12 * 1024 * 1024
MAX_IMAGE_BYTES = 8 * 1024 * 1024
# Device-supplied metadata is stored as jsonb: 16 KiB is far above the seed's few keys.
MAX_METADATA_BYTES = 16 * 1024
MAX_LABEL_LEN = 64
# A capture dated further ahead than this is a device with a broken clock.
MAX_CLOCK_SKEW = timedelta(days=1)
# POST .../trigger waits this long for the stream holding the device to send it, so it
# can answer "sent" as the seed does; a device that is not streaming answers "pending".
TRIGGER_SEND_WAIT_SECONDS = 2.0
# How long a write to a stalled SSE client may block before the stream is dropped.
SSE_SEND_TIMEOUT_SECONDS = 30.0
# A body for POST .../trigger is a few small fields.
MAX_TRIGGER_BODY_BYTES = 4096
MAX_TRIGGER_TTL_SECONDS = 24 * 3600

DeviceId = Annotated[
    str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
]


def _raise_nofile_limit() -> None:
    """Each SSE stream is an open socket: lift the soft open-file limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the command hub (and MQTT sender) on the pool the app lifespan opened."""
    _raise_nofile_limit()
    # Command delivery's settings (CAMFLEET_SSE_PING_SECONDS, CAMFLEET_TRIGGER_*...).
    settings = Settings()
    app.state.command_settings = settings
    from camfleet.resolve import database_url

    dsn = getattr(app.state, "database_url", None) or database_url()
    sender = None
    if settings.trigger_mqtt:
        from camfleet.resolve import mqtt_broker

        sender = MqttCommandSender(mqtt_broker(), settings.trigger_topic, app.state.pool)
        await sender.start()
    hub = CommandHub(dsn, app.state.pool, instance_id=settings.api_instance_id, mqtt_sender=sender)
    await hub.start()
    app.state.command_hub = hub
    try:
        yield
    finally:
        await hub.stop()
        if sender is not None:
            await sender.stop()


router = APIRouter(tags=["commands"], lifespan=lifespan)


def _error(status: int, error: str, reason: str) -> HTTPException:
    return HTTPException(status_code=status, detail={"error": error, "reason": reason})


def _settings(request: Request) -> Settings:
    return request.app.state.command_settings


async def _authorize_device(request: Request, device_id: str, limit: str = "capture") -> Any:
    """The device row when the caller may act as it (services/api/access.py decides)."""
    from services.api.access import device_caller

    return await device_caller(request, device_id, limit)


async def _authorize_operator(request: Request, device_id: str) -> Any:
    """The device row when the operator may trigger it (services/api/access.py decides)."""
    from services.api.access import operated_device

    return await operated_device(request, device_id)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body under the size cap, idle timeout and deadline (bodies.py)."""
    return await bodies.read_body(request, limit)


def _json_object(body: bytes) -> dict:
    # Nesting limit, no U+0000: bad JSON is a 400 with its reason, never a 500.
    return bodies.json_object(body)


def _validation_reason(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


# --- SSE commands ---------------------------------------------------------------------


@router.get("/v1/devices/connected")
async def connected_devices(request: Request) -> dict:
    """Devices holding a command stream on any live API instance."""
    from services.api.access import connected_device_ids
    from services.api.command_hub import STALE_SECONDS

    return {"connected_devices": await connected_device_ids(request, STALE_SECONDS)}


@router.get("/v1/devices/{device_id}/commands")
async def command_stream(request: Request, device_id: DeviceId) -> EventSourceResponse:
    """SSE: `connected`, then capture commands as they are due, `ping` every 30 s."""
    await _authorize_device(request, device_id, "stream")
    hub: CommandHub = request.app.state.command_hub
    settings = _settings(request)
    stream = hub.subscribe(device_id)
    request.app.state.credential_watch.bind(stream, request.state.device_token_hash)
    try:
        await hub.load_pending(stream)
    except BaseException:
        hub.unsubscribe(stream)
        raise

    async def events() -> AsyncIterator[dict]:
        try:
            yield {
                "data": json.dumps(
                    {
                        "event": "connected",
                        "device_id": device_id,
                        "ping_seconds": settings.sse_ping_seconds,
                        "server_time": datetime.now(UTC).isoformat(),
                    }
                )
            }
            while True:
                item = await stream.queue.get()
                if item is None:  # replaced by a newer stream of the same device
                    return
                trigger_id, trigger_type = item
                if await hub.claim(device_id, trigger_id):
                    yield {"data": json.dumps(core.command(trigger_id, trigger_type))}
        finally:
            hub.unsubscribe(stream)

    return EventSourceResponse(
        events(),
        ping=settings.sse_ping_seconds,
        ping_message_factory=lambda: ServerSentEvent(data=json.dumps({"event": "ping"})),
        send_timeout=SSE_SEND_TIMEOUT_SECONDS,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


class TriggerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: Text | None = Field(None, max_length=MAX_LABEL_LEN)
    ttl_seconds: int | None = Field(None, ge=1, le=MAX_TRIGGER_TTL_SECONDS)
    flow_run_id: Text | None = Field(None, max_length=64)


@router.post("/v1/devices/{device_id}/trigger")
async def manual_trigger(request: Request, device_id: DeviceId) -> dict:
    """Create a manual trigger; `sent` when a stream wrote it within 2 s, else `pending`."""
    device = await _authorize_operator(request, device_id)  # before reading the body
    body = await _read_body(request, MAX_TRIGGER_BODY_BYTES)
    try:
        params = TriggerRequest.model_validate(_json_object(body)) if body.strip() else None
    except ValidationError as exc:
        raise _error(422, "invalid_request", _validation_reason(exc)) from None
    params = params or TriggerRequest()
    pool = request.app.state.pool
    if device["status"] != "active" or device["revoked_at"] is not None:
        raise _error(409, "device_not_active", "device is not active")
    now = datetime.now(UTC)
    ttl = params.ttl_seconds or core.MANUAL_TTL_SECONDS
    async with pool.acquire() as conn:
        row = await queries().triggers_create_manual(
            conn,
            trigger_id=core.manual_trigger_id(device_id, now),
            device_id=device_id,
            label=params.label or "manual",
            expires_at=core.manual_expiry(now, ttl),
            flow_run_id=params.flow_run_id,
        )
    trigger_id = row["trigger_id"]
    status = await _wait_until_sent(pool, trigger_id)
    return {"trigger_id": trigger_id, "status": status, "expires_at": row["expires_at"].isoformat()}


async def _wait_until_sent(pool, trigger_id: str) -> str:
    deadline = anyio.current_time() + TRIGGER_SEND_WAIT_SECONDS
    status = core.PENDING
    while anyio.current_time() < deadline:
        await anyio.sleep(0.05)
        async with pool.acquire() as conn:
            status = (await queries().triggers_get(conn, trigger_id=trigger_id))["status"]
        if status != core.PENDING:
            break
    # The seed answers "sent" once the command left; a device fast enough to have
    # uploaded within the wait was sent it too, so "executed" is still "sent" here.
    return core.SENT if status == core.EXECUTED else status


# --- captures -------------------------------------------------------------------------


class CaptureUpload(BaseModel):
    """The seed's body for POST /v1/captures."""

    model_config = ConfigDict(extra="ignore")

    device_id: str = Field(min_length=1, max_length=64)
    trigger_id: str | None = Field(None, max_length=128)
    image_base64: str = Field(min_length=4)
    captured_at: UtcDatetime | None = None
    trigger_label: Text | None = Field(None, max_length=MAX_LABEL_LEN)
    metadata: dict = Field(default_factory=dict)

    @field_validator("captured_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value > datetime.now(UTC) + MAX_CLOCK_SKEW:
            raise ValueError("captured_at is in the future")
        return value

    @field_validator("metadata")
    @classmethod
    def _small(cls, value: dict) -> dict:
        if len(json.dumps(value)) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata larger than {MAX_METADATA_BYTES} bytes")
        return value


def _decode_image(b64: str) -> bytes:
    if b64.startswith("data:"):  # tolerate a data URL prefix
        b64 = b64.partition(",")[2]
    if len(b64) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise _error(413, "too_large", f"image larger than {MAX_IMAGE_BYTES} bytes")
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise _error(400, "bad_base64", "image_base64 is not valid base64") from None


def _store(request: Request):
    # One store per app, built in one place: a plain open_store() cached here first
    # would be a local store that cannot sign, and upload-url would fail until restart.
    from services.api.routes_devices import _store as shared_store

    return shared_store(request)


async def _token_device(request: Request) -> str | None:
    """Before any body byte is read: the device a token names (401 when wrong), None in
    device-id-only mode without a token; 401 when neither is possible."""
    from services.api.auth import DEVICE_TOKEN_HEADER, current_device

    if request.headers.get(DEVICE_TOKEN_HEADER):
        return (await current_device(request)).device_id
    if not _settings(request).allow_device_id_only:
        raise _error(
            401,
            "unauthorized",
            f"missing {DEVICE_TOKEN_HEADER}; pair the device, or let an operator enable "
            "device-id-only mode (CAMFLEET_ALLOW_DEVICE_ID_ONLY)",
        )
    return None


@router.post("/v1/captures", status_code=201)
async def upload_capture(request: Request) -> dict:
    """Store a captured image, write `captures`, mark its trigger executed.

    Order matters (issue 13): the token is checked before the body is read; the body is
    read under the upload slots, size cap and timeouts; the row is claimed before the
    object is written, so a duplicate never overwrites and a refusal leaves no object."""
    upload, device_id, trigger_id, image, info = await _checked_upload(request)
    pool = request.app.state.pool
    trigger = await _trigger_of(pool, trigger_id, device_id) if trigger_id else None

    sha256 = hashlib.sha256(image).hexdigest()
    captured_at = upload.captured_at or datetime.now(UTC)
    name = sanitize_name(trigger_id) if trigger_id else f"img_{sha256[:24]}"
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[info.format]
    key = object_key("captures", device_id, f"{captured_at:%Y/%m/%d}", f"{name}.{ext}")
    store = _store(request)

    metadata = {"width": info.width, "height": info.height, **upload.metadata}
    written = False
    try:
        async with pool.acquire() as conn, conn.transaction():
            # Claim first: the row (or the existing one, for a retry) decides whether
            # anything is written at all.
            row = await queries().triggers_insert_capture(
                conn,
                device_id=device_id,
                device_capture_id=trigger_id or f"sha256:{sha256[:32]}",
                captured_at=captured_at,
                image_bytes=len(image),
                content_type=info.content_type,
                storage_path=key,
                sha256=sha256,
                trigger_id=trigger_id,
                trigger_label=upload.trigger_label,
                metadata=metadata,
            )
            if row["inserted"]:
                # Then write; a failed write rolls the claim back with it.
                await anyio.to_thread.run_sync(store.put, key, image, info.content_type)
                written = True
            trigger_status = None
            if trigger_id:
                done = await queries().triggers_execute(
                    conn, trigger_id=trigger_id, device_id=device_id, record_id=row["record_id"]
                )
                trigger_status = core.EXECUTED if done else trigger["status"]
    except BaseException:
        if written:  # the row did not commit: its object must not stay behind
            with contextlib.suppress(Exception):
                await anyio.to_thread.run_sync(store.delete, key)
        raise
    answer = {
        "record_id": row["record_id"],
        "status": "uploaded" if row["inserted"] else "duplicate",
        "evaluation_status": row["evaluation_status"],
    }
    if trigger_id:
        answer["trigger_status"] = trigger_status
    return answer


async def _checked_upload(request: Request):
    """The upload's body, read and checked: (upload, device_id, trigger_id, image, info).

    The token is checked before the body is read, the body read under the device's
    upload slot and the size cap, and the image inspected in a worker thread."""
    from tasks.images import NotAnImage, inspect_image

    slots = bodies.upload_slots(request.app)
    token_device = await _token_device(request)
    with slots.take(token_device):
        body = await _read_body(request, MAX_CAPTURE_BODY_BYTES)
    try:
        upload = CaptureUpload.model_validate(_json_object(body))
    except ValidationError as exc:
        raise _error(422, "invalid_request", _validation_reason(exc)) from None
    try:
        device_id = safe_id(upload.device_id)
        trigger_id = safe_id(upload.trigger_id, "trigger id") if upload.trigger_id else None
    except BadName as exc:
        raise _error(422, "invalid_request", str(exc)) from None
    await _authorize_device(request, device_id)
    image = _decode_image(upload.image_base64)
    del body
    if len(image) > MAX_IMAGE_BYTES:
        raise _error(413, "too_large", f"image larger than {MAX_IMAGE_BYTES} bytes")
    try:
        info = await anyio.to_thread.run_sync(inspect_image, image)
    except NotAnImage as exc:
        raise _error(415, "not_an_image", str(exc)) from None
    return upload, device_id, trigger_id, image, info


async def _trigger_of(pool, trigger_id: str, device_id: str):
    """The trigger a capture answers: it must exist and belong to the uploading device."""
    async with pool.acquire() as conn:
        trigger = await queries().triggers_get(conn, trigger_id=trigger_id)
    if trigger is None:
        raise _error(404, "unknown_trigger", f"no trigger {trigger_id!r}")
    if trigger["device_id"] != device_id:
        raise _error(403, "forbidden", "the trigger belongs to another device")
    return trigger
