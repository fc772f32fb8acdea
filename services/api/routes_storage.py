"""Signed uploads into LOCAL storage: what makes presigned uploads work without S3.

`LocalStore.presigned_put/post` hand out URLs to this route carrying
`expires`, `max_bytes` and an HMAC `sig` over method, key, size limit and expiry
(camfleet/storage/local.py). This route checks the signature and streams the body to
disk through `LocalStore.put_stream` (atomic rename + fsync), stopping at `max_bytes`.

Hostile uploads (issue 13): the body is received on the event loop under the idle
timeout and deadline of services/api/bodies.py and the per-process upload slots, so a
slow sender holds no worker thread; a PUT is signed for its Content-Type, which must
match; a stored object is write-once (the same bytes again are answered 201, other bytes
409), so a replayed URL cannot change an object after ingest; keys that are directories
or lie under an object answer 409.

    PUT  /storage/upload/{key}?expires=..&max_bytes=..&sig=..   raw body (curl --data-binary)
    POST /storage/upload/{key}?expires=..&max_bytes=..&sig=..   multipart form, field "file"
"""

from __future__ import annotations

import anyio
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from camfleet.keys import BadName, object_key
from camfleet.storage.local import (
    KeyUnavailable,
    LocalStore,
    signed_content_type,
    verify_upload_signature,
)
from services.api import bodies
from services.api.auth import server_secret

router = APIRouter(prefix="/storage", tags=["storage"])

# A signed URL without a size limit (max_bytes=0) still cannot fill the disk: the
# device API's own upload limit applies (routes_devices.MAX_UPLOAD_BYTES).
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
# Multipart framing around the file (boundaries, part headers, the "key" field).
MULTIPART_OVERHEAD_BYTES = 16 * 1024


def _error(status: int, error: str, reason: str) -> HTTPException:
    return HTTPException(status, detail={"error": error, "reason": reason})


def _local_store(request: Request) -> LocalStore:
    from services.api.routes_devices import _store

    store = _store(request)
    if not isinstance(store, LocalStore):
        raise _error(404, "not_local_storage", "uploads go straight to the object store")
    return store


def _verify(request: Request, method: str, key: str, content_type: str = "") -> int:
    """The URL's size limit, once its signature, expiry and key are good; else 403."""
    q = request.query_params
    try:
        object_key(key)
        expires = int(q.get("expires", ""))
        max_bytes = int(q.get("max_bytes", ""))
    except (ValueError, BadName):
        raise _error(403, "bad_signature", "malformed signed upload URL") from None
    sig = q.get("sig", "")
    if not verify_upload_signature(
        server_secret(request), method, key, expires, max_bytes, sig, content_type
    ):
        raise _error(
            403,
            "bad_signature",
            "signature invalid, URL expired, or Content-Type not the one the URL was signed for",
        )
    return max_bytes or DEFAULT_MAX_BYTES


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not value.isdigit():
        raise _error(400, "bad_content_length", "Content-Length is not a number")
    return int(value)


def _stored(info) -> JSONResponse:
    return JSONResponse({"key": info.key, "size": info.size, "sha256": info.sha256}, 201)


@router.put("/upload/{key:path}")
async def upload_put(request: Request, key: str):
    content_type = signed_content_type(request.headers.get("content-type"))
    max_bytes = _verify(request, "PUT", key, content_type)
    declared = _declared_length(request)
    if declared is not None and declared > max_bytes:
        raise _error(413, "too_large", f"upload over {max_bytes} bytes")
    store = _local_store(request)
    # Counted per device (the key's first two parts, devices/<id>), not per URL: a device
    # holding stalled uploads on many URLs still gets only its share.
    owner = "/".join(key.split("/")[:2])
    with bodies.upload_slots(request.app).take(owner):
        spool = await bodies.spool_body(request, max_bytes)
    try:
        info = await anyio.to_thread.run_sync(_put_once, store, key, spool, max_bytes)
    finally:
        spool.close()
    return _stored(info)


def _put_once(store: LocalStore, key: str, stream, max_bytes: int):
    """Write-once: the same bytes again (a device retrying) are fine, other bytes 409."""
    try:
        return store.put_stream(key, stream, max_bytes, exclusive=True)
    except ValueError:
        raise _error(413, "too_large", f"upload over {max_bytes} bytes") from None
    except KeyUnavailable as exc:
        raise _error(409, "key_unavailable", str(exc)) from None


@router.post("/upload/{key:path}")
async def upload_post(request: Request, key: str):
    max_bytes = _verify(request, "POST", key)
    declared = _declared_length(request)
    if declared is None:
        raise _error(411, "length_required", "a form upload needs Content-Length")
    if declared > max_bytes + MULTIPART_OVERHEAD_BYTES:
        raise _error(413, "too_large", f"upload over {max_bytes} bytes")
    store = _local_store(request)
    deadline = bodies.limits(request.app).deadline_s
    try:
        with anyio.fail_after(deadline):  # a stalled form body is cut off too
            form = await request.form(max_files=1, max_fields=8)
    except TimeoutError:
        raise _error(408, "body_too_slow", f"form not received within {deadline:g} s") from None
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise _error(400, "no_file", "the form has no 'file' part")
        if form.get("key") not in (None, key):
            raise _error(403, "bad_key", "form key differs from the signed key")
        info = await run_in_threadpool(_put_once, store, key, upload.file, max_bytes)
    finally:
        await form.close()
    return _stored(info)
