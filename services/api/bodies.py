"""Request bodies as hostile input: bounded in size, time and count, parsed without 500s.

What a device API owes every caller, whatever route it reaches (issue 13):

* **Size**: a body is read in chunks and refused with 413 the moment it passes its cap,
  whether it declared a Content-Length or came chunked.
* **Time**: a body that stalls for CAMFLEET_BODY_IDLE_TIMEOUT_S between chunks, or is
  still arriving after CAMFLEET_CAPTURE_BODY_DEADLINE_S, is cut off with 408; reading
  happens on the event loop, so a slow sender never holds a worker thread.
* **Count**: at most CAMFLEET_MAX_CONCURRENT_UPLOADS image bodies are read at once per
  API process, and CAMFLEET_MAX_UPLOADS_PER_DEVICE per device; more answer 503/429 with
  Retry-After instead of queueing memory.
* **Shape**: JSON is parsed with a nesting limit and no NUL characters (PostgreSQL text
  and jsonb cannot hold U+0000); datetimes must convert to UTC within years 1-9999.
  Whatever still slips through as a value the database refuses (asyncpg.DataError) or a
  recursion/overflow is answered 4xx with a reason by the handlers installed here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

import anyio
import asyncpg
from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator

from camfleet.settings import Settings

log = logging.getLogger("camfleet.api.bodies")

# An empty router: this module is mounted for its setup() (services/api/app.py).
router = APIRouter()

# A device on a weak link still sends something every few seconds; 15 s of silence
# mid-body is a stalled or hostile sender.
BODY_IDLE_TIMEOUT_S = 15.0
# A 12 MiB capture body at 1 Mbit/s takes ~100 s; two minutes bounds how long any one
# body (and a signed URL replayed near its expiry) can hold a connection.
CAPTURE_BODY_DEADLINE_S = 120.0
# Image bodies read at once per process: 32 x 12 MiB caps body memory near 400 MiB.
MAX_CONCURRENT_UPLOADS = 32
# One camera uploads one picture at a time; two covers a retry racing its original.
MAX_UPLOADS_PER_DEVICE = 2
# Device JSON is flat; 32 levels is far beyond any real body, far below Python's limit.
MAX_JSON_DEPTH = 32
# Bodies spooled to disk above this many bytes (uploads on the local store).
SPOOL_MEMORY_BYTES = 1024 * 1024
RETRY_AFTER_S = 2


@dataclass(frozen=True)
class BodyLimits:
    idle_timeout_s: float = BODY_IDLE_TIMEOUT_S
    deadline_s: float = CAPTURE_BODY_DEADLINE_S
    max_concurrent_uploads: int = MAX_CONCURRENT_UPLOADS
    max_uploads_per_device: int = MAX_UPLOADS_PER_DEVICE

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> BodyLimits:
        """CAMFLEET_BODY_* / *_UPLOADS* from camfleet/settings.py; unset ones default."""
        s = settings or Settings()
        given = {
            "idle_timeout_s": s.body_idle_timeout_s,
            "deadline_s": s.capture_body_deadline_s,
            "max_concurrent_uploads": s.max_concurrent_uploads,
            "max_uploads_per_device": s.max_uploads_per_device,
        }
        return cls(**{name: value for name, value in given.items() if value is not None})


def _error(status: int, error: str, reason: str, headers: dict | None = None):
    return HTTPException(status, detail={"error": error, "reason": reason}, headers=headers)


def limits(app) -> BodyLimits:
    value = getattr(app.state, "body_limits", None)
    if value is None:
        value = app.state.body_limits = BodyLimits.from_settings()
    return value


# --- reading -----------------------------------------------------------------------------


def _declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise _error(400, "bad_content_length", "Content-Length is not a number")
        if int(declared) > limit:
            raise _error(413, "too_large", f"body larger than {limit} bytes")


async def body_chunks(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body's chunks, with the size cap, the idle timeout and the overall deadline."""
    cfg = limits(request.app)
    _declared_length(request, limit)
    seen = 0
    deadline = anyio.current_time() + cfg.deadline_s
    chunks = request.stream().__aiter__()
    while True:
        wait = min(cfg.idle_timeout_s, deadline - anyio.current_time())
        if wait <= 0:
            raise _error(408, "body_too_slow", f"body not received within {cfg.deadline_s:g} s")
        try:
            with anyio.fail_after(wait):
                chunk = await chunks.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise _error(
                408,
                "body_too_slow",
                f"no body bytes for {cfg.idle_timeout_s:g} s or body over {cfg.deadline_s:g} s",
            ) from None
        seen += len(chunk)
        if seen > limit:
            raise _error(413, "too_large", f"body larger than {limit} bytes")
        if chunk:
            yield chunk


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body in memory (JSON bodies), under every limit."""
    body = bytearray()
    async for chunk in body_chunks(request, limit):
        body += chunk
    return bytes(body)


async def spool_body(request: Request, limit: int):
    """The body in a temporary file (memory up to 1 MiB), read on the event loop under
    every limit, so the thread that stores it never waits on the network."""
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)
    try:
        async for chunk in body_chunks(request, limit):
            spool.write(chunk)
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool


# --- how many at once ----------------------------------------------------------------------


class UploadSlots:
    """Image bodies being received, per process and per device; full answers, not queues."""

    def __init__(self, total: int, per_device: int) -> None:
        self.total, self.per_device = total, per_device
        self.busy = 0
        self.by_device: Counter[str] = Counter()

    @contextlib.contextmanager
    def take(self, device: str | None = None):
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        if self.busy >= self.total:
            raise _error(503, "too_many_uploads", "the server is receiving enough uploads", retry)
        if device is not None and self.by_device[device] >= self.per_device:
            raise _error(
                429, "too_many_uploads", "this device already has uploads in progress", retry
            )
        self.busy += 1  # one event loop per process: no lock needed between checks
        if device is not None:
            self.by_device[device] += 1
        try:
            yield
        finally:
            self.busy -= 1
            if device is not None:
                self.by_device[device] -= 1
                if not self.by_device[device]:
                    del self.by_device[device]


def upload_slots(app) -> UploadSlots:
    slots = getattr(app.state, "upload_slots", None)
    if slots is None:
        cfg = limits(app)
        slots = app.state.upload_slots = UploadSlots(
            cfg.max_concurrent_uploads, cfg.max_uploads_per_device
        )
    return slots


# --- parsing --------------------------------------------------------------------------------


class BadJson(ValueError):
    pass


def _check_shape(value, depth: int = 0) -> None:
    if depth > MAX_JSON_DEPTH:
        raise BadJson(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        if "\x00" in value:
            raise BadJson("strings must not contain U+0000")
    elif isinstance(value, dict):
        for key, item in value.items():
            if "\x00" in key:
                raise BadJson("keys must not contain U+0000")
            _check_shape(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_shape(item, depth + 1)


def parse_json(raw: bytes | str):
    """json.loads with a nesting limit, no NUL anywhere and no NaN/Infinity; BadJson."""

    def no_constants(name: str):
        raise BadJson(f"{name} is not JSON")

    try:
        value = json.loads(raw, parse_constant=no_constants)
    except RecursionError:
        raise BadJson(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, BadJson):
            raise
        raise BadJson(f"body is not JSON: {exc}") from None
    _check_shape(value)
    return value


def json_object(raw: bytes) -> dict:
    """The body as a JSON object, or HTTPException 400 with the reason."""
    try:
        value = parse_json(raw)
    except BadJson as exc:
        raise _error(400, "bad_json", str(exc)) from None
    if not isinstance(value, dict):
        raise _error(400, "bad_json", "body must be a JSON object")
    return value


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("datetime is outside years 1-9999 in UTC") from None


# A timestamp from a device: naive means UTC; one that cannot be expressed in UTC
# (0001-01-01T00:00:00+05:00) is a validation error, not an overflow in the database.
UtcDatetime = Annotated[datetime, AfterValidator(_utc)]


def no_nul(value: str | None) -> str | None:
    if value is not None and "\x00" in value:
        raise ValueError("must not contain U+0000")
    return value


# A string stored as PostgreSQL text: U+0000 is a validation error.
Text = Annotated[str, AfterValidator(no_nul)]


# --- the safety net -------------------------------------------------------------------------


async def _bad_value(request: Request, exc: Exception) -> JSONResponse:
    """What the checks above missed is still the caller's bad input, never a 500."""
    log.info("bad input on %s: %s", request.url.path, type(exc).__name__)
    reason = {
        RecursionError: "input nested too deeply",
        OverflowError: "a number or date is out of range",
    }.get(type(exc), "a value the database cannot store (out of range or U+0000)")
    return JSONResponse({"detail": {"error": "bad_value", "reason": reason}}, status_code=422)


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own 422, without echoing the input: an input such as NaN (or a huge
    string) cannot be rendered as JSON, which turned the 422 into a 500."""
    errors = [
        {"type": e.get("type"), "loc": list(e.get("loc", ())), "msg": e.get("msg")}
        for e in exc.errors()[:20]
    ]
    return JSONResponse({"detail": errors}, status_code=422)


def setup(app: FastAPI) -> None:
    for exc_class in (asyncpg.DataError, RecursionError, OverflowError):
        app.add_exception_handler(exc_class, _bad_value)
    app.add_exception_handler(RequestValidationError, _invalid_request)
