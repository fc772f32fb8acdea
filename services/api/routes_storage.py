"""Signed uploads into LOCAL storage: what makes presigned uploads work without S3.

`LocalStore.presigned_put/post` hand out URLs to this route carrying
`expires`, `max_bytes` and an HMAC `sig` over method, key, size limit and expiry
(camfleet/storage/local.py). This route checks the signature and streams the body to
disk through `LocalStore.put_stream` (atomic rename + fsync), never holding more than
one chunk in memory and stopping at `max_bytes`.

    PUT  /storage/upload/{key}?expires=..&max_bytes=..&sig=..   raw body (curl --data-binary)
    POST /storage/upload/{key}?expires=..&max_bytes=..&sig=..   multipart form, field "file"
"""

from __future__ import annotations

import anyio
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from camfleet.keys import BadName, object_key
from camfleet.storage.local import LocalStore, verify_upload_signature
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


def _verify(request: Request, method: str, key: str) -> int:
    """The URL's size limit, once its signature, expiry and key are good; else 403."""
    q = request.query_params
    try:
        object_key(key)
        expires = int(q.get("expires", ""))
        max_bytes = int(q.get("max_bytes", ""))
    except (ValueError, BadName):
        raise _error(403, "bad_signature", "malformed signed upload URL") from None
    sig = q.get("sig", "")
    if not verify_upload_signature(server_secret(request), method, key, expires, max_bytes, sig):
        raise _error(403, "bad_signature", "signature invalid or URL expired")
    return max_bytes or DEFAULT_MAX_BYTES


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not value.isdigit():
        raise _error(400, "bad_content_length", "Content-Length is not a number")
    return int(value)


class _AsyncBodyReader:
    """A blocking .read() over the request's async body, for put_stream in a thread."""

    def __init__(self, request: Request) -> None:
        self._chunks = request.stream().__aiter__()

    def read(self, _size: int = -1) -> bytes:
        async def next_chunk() -> bytes:
            try:
                while True:
                    chunk = await self._chunks.__anext__()
                    if chunk:
                        return chunk
            except StopAsyncIteration:
                return b""

        return anyio.from_thread.run(next_chunk)


def _stored(info) -> JSONResponse:
    return JSONResponse({"key": info.key, "size": info.size, "sha256": info.sha256}, 201)


@router.put("/upload/{key:path}")
async def upload_put(request: Request, key: str):
    max_bytes = _verify(request, "PUT", key)
    declared = _declared_length(request)
    if declared is not None and declared > max_bytes:
        raise _error(413, "too_large", f"upload over {max_bytes} bytes")
    store = _local_store(request)
    reader = _AsyncBodyReader(request)
    try:
        info = await anyio.to_thread.run_sync(store.put_stream, key, reader, max_bytes)
    except ValueError:
        raise _error(413, "too_large", f"upload over {max_bytes} bytes") from None
    return _stored(info)


@router.post("/upload/{key:path}")
async def upload_post(request: Request, key: str):
    max_bytes = _verify(request, "POST", key)
    declared = _declared_length(request)
    if declared is None:
        raise _error(411, "length_required", "a form upload needs Content-Length")
    if declared > max_bytes + MULTIPART_OVERHEAD_BYTES:
        raise _error(413, "too_large", f"upload over {max_bytes} bytes")
    store = _local_store(request)
    form = await request.form(max_files=1, max_fields=8)
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise _error(400, "no_file", "the form has no 'file' part")
        if form.get("key") not in (None, key):
            raise _error(403, "bad_key", "form key differs from the signed key")
        try:
            info = await run_in_threadpool(store.put_stream, key, upload.file, max_bytes)
        except ValueError:
            raise _error(413, "too_large", f"upload over {max_bytes} bytes") from None
    finally:
        await form.close()
    return _stored(info)
