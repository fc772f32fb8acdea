"""Lifelog device endpoints (seed 004): pair, activate, upload-url, ingest, revoke, rotate.

    POST /devices/pair            user API key   -> {device_id, pairing_code, expires_at}
                                  (body {name, kind}: kind lifelog, the default, or visant)
    POST /devices/activate        pairing code   -> {device_id, device_token}   (once)
    POST /devices/upload-url      X-Device-Token -> {object_key, upload_url, upload_host,
                                                     upload_port, upload_path, ...}
    POST /devices/ingest          X-Device-Token -> {status: queued|duplicate, item_id,
                                                     task_id}
    POST /devices/rotate-token    X-Device-Token -> {device_id, device_token}   (old dies)
    GET  /devices                 user API key   -> the user's devices
    POST /devices/{id}/revoke     user API key   -> {device_id, revoked_at}
    POST /devices/{id}/rotate     user API key   -> {device_id, device_token}

Uploads are confined to `devices/{device_id}/`: the key is built here from a sanitized
file name, and ingest refuses any key outside the caller's prefix before it touches
storage (a presigned URL's own checks are not relied on: some S3-compatible servers
do not verify them). Ingest is idempotent on (device_id, seq) through the
`captures_device_seq_uniq` constraint: INSERT ... ON CONFLICT DO NOTHING, then a
SELECT of the winner, so concurrent retries get one `queued` and the rest `duplicate`.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal
from urllib.parse import urlsplit

import anyio
import asyncpg
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from camfleet import tokens
from camfleet.keys import BadName, key_within, object_key, sanitize_name
from camfleet.settings import Settings
from services.api.auth import DeviceIdentity, UserIdentity, server_secret
from services.api.bodies import Text, UtcDatetime, limits
from services.api.db import queries
from services.api.ratelimit import (
    activation_succeeded,
    authorized_device,
    check_activation,
    limited_device,
    limited_user,
    limiter,
)

log = logging.getLogger("camfleet.api.devices")
router = APIRouter(prefix="/devices", tags=["devices (seed 004)"])

# The image types a camera sends; anything else is not a capture (configurable with
# CAMFLEET_UPLOAD_CONTENT_TYPES, comma-separated).
DEFAULT_CONTENT_TYPES = ("image/jpeg", "image/png", "image/webp")
# An ESP32-S3 UXGA JPEG is 100-500 KB and a Pi HQ camera JPEG a few MB; 10 MiB refuses
# nothing real and bounds what one device can park in storage per seq.
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# The device asks for the URL right before streaming the file: five minutes covers a
# few MB over a weak phone hotspot and keeps a leaked URL short-lived.
UPLOAD_URL_TTL_S = 300
# A person pairs in the web app and types the code into the device's captive portal
# within minutes; ten is generous and keeps the code's guessing window short.
PAIRING_TTL_S = 600
# seq is a PostgreSQL bigint.
MAX_SEQ = 2**63 - 1
# S3 keys are at most 1,024 bytes; ours are far shorter, anything longer is not ours.
MAX_OBJECT_KEY_LEN = 1024
# Device JSON bodies are a few hundred bytes; anything bigger is refused unread.
MAX_JSON_BODY_BYTES = 8 * 1024
DEVICE_PREFIX = "devices"


@dataclass
class DeviceApiConfig:
    content_types: tuple[str, ...] = DEFAULT_CONTENT_TYPES
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    upload_url_ttl_s: int = UPLOAD_URL_TTL_S
    pairing_ttl_s: int = PAIRING_TTL_S
    # Check the object exists in storage before accepting an ingest (seed 004 issue).
    check_object: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> DeviceApiConfig:
        """CAMFLEET_UPLOAD_CONTENT_TYPES, _MAX_UPLOAD_BYTES and _INGEST_CHECK_OBJECT."""
        s = settings or Settings()
        types = s.upload_content_types
        return cls(
            content_types=tuple(t.strip() for t in types.split(",") if t.strip())
            if types
            else DEFAULT_CONTENT_TYPES,
            max_upload_bytes=s.max_upload_bytes or MAX_UPLOAD_BYTES,
            check_object=s.ingest_check_object,
        )


def _config(request: Request) -> DeviceApiConfig:
    state = request.app.state
    cfg = getattr(state, "devices_config", None)
    if cfg is None:
        cfg = state.devices_config = DeviceApiConfig.from_settings()
    return cfg


def _store(request: Request):
    """The object store (app.state.store, else STORAGE_URL); local presigning via us."""
    state = request.app.state
    store = getattr(state, "store", None)
    if store is None:
        from camfleet.settings import get_settings
        from camfleet.storage import open_store
        from camfleet.storage.local import LocalStore

        store = open_store()
        if isinstance(store, LocalStore):
            public = get_settings().public_url or str(request.base_url)
            store = LocalStore(store.root, public_url=public, secret=server_secret(request))
        state.store = store
    return store


def _presigner(request: Request):
    """For S3 storage: SigV4 URLs and async HEADs without boto3 on the hot path."""
    state = request.app.state
    if not hasattr(state, "presigner"):
        from camfleet.storage.s3 import S3Store

        store, presigner = _store(request), None
        if isinstance(store, S3Store):
            from camfleet.storage.fast_s3 import FastS3Presigner

            try:
                presigner = FastS3Presigner(store)
            except ValueError:  # temporary credentials: boto3 handles their refresh
                presigner = None
        state.presigner = presigner
    return state.presigner


# Names the task ids of items no flow run was given (no Prefect API, or Prefect down):
# the seed's clients expect a task id in every answer, and the same item always gets the
# same one until the run that adopts it is known.
_UNASSIGNED_TASK_NS = uuid.UUID("5b0f1a6e-4c2d-4e8a-9b7f-c4a3f1d2e6b8")


def unassigned_task_id(item_id: object) -> str:
    """The task id answered for an item that has no flow run (yet)."""
    return str(uuid.uuid5(_UNASSIGNED_TASK_NS, str(item_id)))


def _task_id(item_id: object, flow_run_id: object) -> str:
    """The item's flow run id, or a stable id derived from the item while it has none."""
    return str(flow_run_id) if flow_run_id is not None else unassigned_task_id(item_id)


def _processing(request: Request):
    """The window -> flow run assigner, when a Prefect API is configured."""
    # Set up by the lifespan (services/api/db.py), from the environment unless handed in.
    return getattr(request.app.state, "processing_runs", None)


def _error(status: int, error: str, reason: str, headers: dict | None = None):
    return HTTPException(status, detail={"error": error, "reason": reason}, headers=headers)


def _secret_response(body: dict) -> JSONResponse:
    # A token or code in a response must not be cached by anything in between.
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


# --- request bodies --------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)


# The kinds that authenticate with a device token, so the kinds a person pairs: a
# Lifelog camera (seed 004, whose pair body carries only a name) and a Visant camera
# whose agent holds the command stream (seed 003). ESP32-CAMs over MQTT, edge boxes and
# SFTP uploaders register through their own channels and never hold a device token.
PairableKind = Literal["lifelog", "visant"]


class PairRequest(_Body):
    name: Text | None = Field(None, max_length=64)
    kind: PairableKind = "lifelog"


class ActivateRequest(_Body):
    pairing_code: str = Field(min_length=4, max_length=32)


class UploadUrlRequest(_Body):
    filename: str = Field(min_length=1, max_length=256)
    content_type: str = Field("image/jpeg", max_length=100)
    seq: int | None = Field(None, ge=0, le=MAX_SEQ)
    # Declared size in bytes (optional): refused up front when over the limit.
    size: int | None = Field(None, ge=0)
    # When the photo was taken (optional): the key's date folder, as in the seed.
    captured_at: UtcDatetime | None = None


class IngestRequest(_Body):
    object_key: str = Field(min_length=1, max_length=MAX_OBJECT_KEY_LEN)
    seq: int = Field(ge=0, le=MAX_SEQ)
    captured_at: UtcDatetime | None = None
    content_type: str = Field("image/jpeg", max_length=100)
    ntp_synced: bool | None = None


async def parse_body(request: Request, model: type[BaseModel]):
    """Validate the JSON body with pydantic's own parser (the hot endpoints' path:
    FastAPI's body parameter costs more per request than everything else they do)."""
    raw = await request.body()
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        raise HTTPException(422, detail=errors) from None


def body_schema(model: type[BaseModel]) -> dict:
    """openapi_extra documenting a body that `parse_body` reads."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


# --- pairing -------------------------------------------------------------------------


@router.post("/pair")
async def pair(request: Request, body: PairRequest | None = None, user=Depends(limited_user)):
    await limiter(request).hit("pair", user.user_id, "pairing")
    name = body.name if body else None
    kind = body.kind if body else "lifelog"
    device_id = str(uuid.uuid4())
    secret = server_secret(request)
    async with request.app.state.pool.acquire() as conn, conn.transaction():
        await queries().devices_create_paired_device(
            conn, device_id=device_id, user_id=user.user_id, name=name, kind=kind
        )
        code = tokens.new_pairing_code()
        row = await queries().devices_create_pairing(
            conn,
            device_id=device_id,
            code_hash=tokens.hash_pairing_code(secret, code),
            created_by=user.user_id,
            ttl_s=float(_config(request).pairing_ttl_s),
        )
    log.info("device %s paired by user %s, awaiting activation", device_id, user.user_id)
    return _secret_response(
        {
            "device_id": device_id,
            "pairing_code": code,
            "expires_at": row["expires_at"].isoformat(),
        }
    )


@router.post("/activate")
async def activate(request: Request, body: ActivateRequest):
    await check_activation(request)  # charges the failure budget up front (atomic)
    secret = server_secret(request)
    code_hash = tokens.hash_pairing_code(secret, body.pairing_code)
    token = tokens.new_device_token()
    async with request.app.state.pool.acquire() as conn, conn.transaction():
        row = await queries().devices_consume_pairing(conn, code_hash=code_hash)
        if row is None:
            state = await queries().devices_pairing_state(conn, code_hash=code_hash)
        elif not await queries().devices_set_token(
            conn,
            device_id=row["device_id"],
            token_hash=tokens.hash_device_token(secret, token),
        ):  # revoked between pairing and activation: the code dies with the device
            raise _error(403, "device_revoked", "the device was revoked")
    if row is None:
        if state is None:
            raise _error(400, "invalid_pairing_code", "unknown pairing code")
        if state["used_at"] is not None:
            raise _error(409, "pairing_code_used", "pairing code already used")
        raise _error(410, "pairing_code_expired", "pairing code expired: pair again")
    await activation_succeeded(request)
    log.info("device %s activated", row["device_id"])
    return _secret_response({"device_id": row["device_id"], "device_token": token})


async def _issue_token(request: Request, device_id: str) -> JSONResponse:
    token = tokens.new_device_token()
    token_hash = tokens.hash_device_token(server_secret(request), token)
    async with request.app.state.pool.acquire() as conn:
        row = await queries().devices_set_token(conn, device_id=device_id, token_hash=token_hash)
    if row is None:  # a revoked device stays revoked: `camfleet devices reinstate` first
        raise _error(409, "device_revoked", "the device is revoked; an operator reinstates it")
    log.info("device %s token rotated", device_id)
    return _secret_response({"device_id": device_id, "device_token": token})


@router.post("/rotate-token")
async def rotate_own_token(request: Request, device: DeviceIdentity = Depends(limited_device)):
    """The device swaps its token for a new one; the old one stops working at once."""
    return await _issue_token(request, device.device_id)


async def _owned(request: Request, device_id: str, user: UserIdentity) -> None:
    from services.api.access import owned_device

    await owned_device(request, device_id, user)


@router.get("")
async def list_devices(request: Request, user: UserIdentity = Depends(limited_user)):
    async with request.app.state.pool.acquire() as conn:
        # A many-row aiosql query is an async generator, not an awaitable.
        rows = [r async for r in queries().devices_list(conn, user_id=user.user_id, kind=None)]
    return [
        {
            k: (v.isoformat() if isinstance(v, datetime) else v)
            for k, v in dict(r).items()
            if k != "user_id"
        }
        for r in rows
    ]


@router.post("/{device_id}/revoke")
async def revoke(request: Request, device_id: str, user: UserIdentity = Depends(limited_user)):
    await _owned(request, device_id, user)
    async with request.app.state.pool.acquire() as conn:
        row = await queries().devices_revoke(conn, device_id=device_id)
    log.info("device %s revoked by user %s", device_id, user.user_id)
    return {"device_id": device_id, "revoked_at": row["revoked_at"].isoformat()}


@router.post("/{device_id}/rotate")
async def rotate(request: Request, device_id: str, user: UserIdentity = Depends(limited_user)):
    await _owned(request, device_id, user)
    return await _issue_token(request, device_id)


# --- upload URL ----------------------------------------------------------------------


# The seed's file names start with the capture time: 2025-12-26T10-15-30Z_000123.jpg.
_NAME_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})")
# A capture date is trusted for the key's date folder back to this year, and up to a day
# ahead (a device clock a little fast); anything else files under the upload date.
EARLIEST_CAPTURE_YEAR = 2000
CAPTURE_DATE_SKEW = timedelta(days=1)


def capture_day(filename: str, captured_at: datetime | None, now: datetime) -> datetime:
    """The date the key is filed under: the capture date, as in the seed's example
    (`devices/<id>/2025/12/26/123-2025-12-26T10-15-30Z_000123.jpg`), from `captured_at`
    or the file name's leading date; the upload date when neither is plausible."""
    day = captured_at
    if day is None and (m := _NAME_DATE.match(filename)):
        try:
            day = datetime(int(m[1]), int(m[2]), int(m[3]), tzinfo=UTC)
        except ValueError:
            day = None
    if day is None or day.year < EARLIEST_CAPTURE_YEAR or day > now + CAPTURE_DATE_SKEW:
        return now
    return day


def build_object_key(
    device_id: str,
    filename: str,
    seq: int | None,
    now: datetime,
    captured_at: datetime | None = None,
) -> str:
    """devices/{device_id}/YYYY/MM/DD/{seq}-{filename} (capture date); a uuid stands in
    for no seq."""
    name = sanitize_name(filename)
    lead = str(seq) if seq is not None else uuid.uuid4().hex
    day = capture_day(filename, captured_at, now)
    return object_key(DEVICE_PREFIX, device_id, day.strftime("%Y/%m/%d"), f"{lead}-{name}")


def upload_target(url: str) -> dict:
    """The seed's second format: host, port and path+query of the signed URL."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return {"upload_host": parts.hostname, "upload_port": port, "upload_path": path}


@router.post("/upload-url", openapi_extra=body_schema(UploadUrlRequest))
async def upload_url(request: Request):
    device = await authorized_device(request)
    body: UploadUrlRequest = await parse_body(request, UploadUrlRequest)
    cfg = _config(request)
    content_type = body.content_type.lower()
    if content_type not in cfg.content_types:
        raise _error(
            415,
            "unsupported_content_type",
            f"content_type must be one of {', '.join(cfg.content_types)}",
        )
    if body.size is not None and body.size > cfg.max_upload_bytes:
        raise _error(413, "too_large", f"declared size over {cfg.max_upload_bytes} bytes")
    try:
        key = build_object_key(
            device.device_id, body.filename, body.seq, datetime.now(UTC), body.captured_at
        )
    except BadName as exc:
        raise _error(400, "bad_filename", str(exc)) from None
    signer = _presigner(request) or _store(request)
    signed = signer.presigned_put(
        key, content_type, expires_in=cfg.upload_url_ttl_s, max_bytes=cfg.max_upload_bytes
    )
    return JSONResponse(
        {
            "object_key": key,
            "upload_url": signed.url,
            **upload_target(signed.url),
            "method": "PUT",
            "headers": signed.headers,
            "expires_at": signed.expires_at.isoformat(),
            "max_bytes": cfg.max_upload_bytes,
        }
    )


# --- ingest -----------------------------------------------------------------------------


async def _head(request: Request, key: str):
    from camfleet.storage.local import LocalStore

    presigner = _presigner(request)
    if presigner is not None:
        return await presigner.head(key)  # async HTTP HEAD on this event loop
    store = _store(request)
    if isinstance(store, LocalStore):
        return store.head(key)  # a stat(): microseconds, no thread needed
    return await run_in_threadpool(store.head, key)  # other backends block


# The first bytes of each allowed image type: what was stored must be what is ingested.
IMAGE_MAGIC = {
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/webp": (b"RIFF",),  # + "WEBP" at offset 8, checked below
}


def looks_like(head: bytes, content_type: str) -> bool:
    """True when `head` starts like `content_type` (unknown types are not checked)."""
    magics = IMAGE_MAGIC.get(content_type)
    if magics is None:
        return True
    if content_type == "image/webp" and head[8:12] != b"WEBP":
        return False
    return head.startswith(magics)


async def _head_bytes(request: Request, key: str) -> bytes | None:
    """The object's first bytes when the store can give them cheaply (local files)."""
    from camfleet.storage.local import LocalStore

    store = _store(request)
    if _presigner(request) is None and isinstance(store, LocalStore):
        return store.read_head(key, 16)
    return None  # S3 checks the signed Content-Type itself


async def _checked_object_size(request: Request, key: str, content_type: str) -> int:
    """The stored object's size, once it is known to exist, to fit the upload cap and to
    start like the image type it claims; a refusal otherwise (503 while storage is down:
    the device retries later)."""
    cfg = _config(request)
    try:
        info = await _head(request, key)
    except Exception as exc:
        log.warning("storage HEAD failed: %s", type(exc).__name__)
        raise _error(
            503, "storage_unavailable", "object storage unreachable", {"Retry-After": "5"}
        ) from None
    if info is None:
        raise _error(404, "object_not_found", "no object at object_key: PUT it to upload_url first")
    if info.size > cfg.max_upload_bytes:
        raise _error(413, "too_large", f"object over {cfg.max_upload_bytes} bytes")
    head = await _head_bytes(request, key)
    if head is not None and not looks_like(head, content_type):
        raise _error(415, "not_an_image", f"the stored object is not {content_type}")
    return info.size


@router.post("/ingest", openapi_extra=body_schema(IngestRequest))
async def ingest(request: Request):
    device = await authorized_device(request)
    body: IngestRequest = await parse_body(request, IngestRequest)
    cfg = _config(request)
    key = body.object_key
    if not key_within(key, f"{DEVICE_PREFIX}/{device.device_id}"):
        raise _error(
            403,
            "key_outside_prefix",
            f"object_key must lie under {DEVICE_PREFIX}/<your device_id>/",
        )
    content_type = body.content_type.lower()
    if content_type not in cfg.content_types:
        raise _error(415, "unsupported_content_type", "content_type is not an allowed image type")
    size = await _checked_object_size(request, key, content_type) if cfg.check_object else None
    captured_at = body.captured_at
    if captured_at is not None and captured_at.tzinfo is None:
        captured_at = captured_at.replace(tzinfo=UTC)
    runs = _processing(request)
    run_id = await runs.run_for_now() if runs is not None else None
    metadata = {"ntp_synced": body.ntp_synced} if body.ntp_synced is not None else {}
    async with request.app.state.pool.acquire() as conn:
        try:
            row = await queries().devices_ingest_insert(
                conn,
                device_id=device.device_id,
                object_key=key,
                seq=body.seq,
                captured_at=captured_at,
                image_bytes=size,
                content_type=content_type,
                metadata=metadata,
                flow_run_id=run_id,
            )
            if row is None:
                existing = await queries().devices_ingest_existing(
                    conn, device_id=device.device_id, seq=body.seq
                )
        except asyncpg.DataError as exc:
            raise _error(422, "bad_value", type(exc).__name__) from None
    if row is not None:
        return JSONResponse(
            {
                "status": "queued",
                "item_id": row["record_id"],
                "task_id": _task_id(row["record_id"], row["flow_run_id"]),
            }
        )
    if existing is None:
        # Not this seq's row: the same object_key was ingested under another seq.
        raise _error(409, "object_already_ingested", "object_key was ingested with another seq")
    return JSONResponse(
        {
            "status": "duplicate",
            "item_id": existing["record_id"],
            "task_id": _task_id(existing["record_id"], existing["flow_run_id"]),
        }
    )


# --- request size limit ---------------------------------------------------------------


class JsonBodyLimit:
    """Pure ASGI middleware: /devices/* bodies are read here first, whole, under the size
    cap and the idle timeout (services/api/bodies.py), then replayed to the route. Reading
    first is what makes an oversized chunked body a 413: raised inside the route, FastAPI's
    own body parsing would turn it into a 400."""

    def __init__(self, app, limit: int = MAX_JSON_BODY_BYTES, prefix: str = "/devices"):
        self.app, self.limit, self.prefix = app, limit, prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.limit:
                    return await _too_large(send, self.limit)
        idle = limits(scope["app"]).idle_timeout_s if "app" in scope else 15.0
        body = bytearray()
        while True:
            try:
                with anyio.fail_after(idle):
                    message = await receive()
            except TimeoutError:
                return await _json_error(send, 408, "body_too_slow", "request body stalled")
            if message["type"] != "http.request":  # the client went away
                return None
            body += message.get("body", b"")
            if len(body) > self.limit:
                return await _too_large(send, self.limit)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: only a disconnect can come

        await self.app(scope, replay, send)


async def _too_large(send, limit: int) -> None:
    await _json_error(send, 413, "body_too_large", f"request body over {limit} bytes")


async def _json_error(send, status: int, error: str, reason: str) -> None:
    body = json.dumps({"detail": {"error": error, "reason": reason}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def setup(app) -> None:
    app.add_middleware(JsonBodyLimit)
