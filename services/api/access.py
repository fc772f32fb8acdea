"""Who may act on which device: one place for every `/v1/*` route (issue 13, items 12, 14).

The rules, in order:

1. **Authenticate before any lookup.** A request with no usable credential gets 401
   before the device id is looked at, so unknown and existing ids answer alike and
   ids cannot be enumerated without credentials. The only exception is the seed's
   device-id-only mode (CAMFLEET_ALLOW_DEVICE_ID_ONLY=true), where the id *is* the
   credential by the operator's explicit choice.
2. **404, not 403, for what is not yours.** A device token used for another device's
   path, or a user key for a device the user does not own, gets the same 404 as an id
   that does not exist: nothing tells an outsider that the id is real.
3. **Ownerless devices belong to nobody.** Devices made by MQTT, edge or the CLI have no
   owner until an operator runs `camfleet devices assign DEVICE USER`; until then no
   user key reaches them (only device-id-only mode or the device's own token does).
4. **Listings show only the caller's devices** (`GET /v1/devices/connected`).
5. Every accepted caller is charged against its rate limit (services/api/ratelimit.py):
   command streams and captures per device, manual triggers per user.
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, Request

from camfleet import tokens
from services.api.auth import (
    DEVICE_TOKEN_HEADER,
    UserIdentity,
    current_device,
    current_user,
    server_secret,
)
from services.api.db import queries
from services.api.ratelimit import limiter


def _error(status: int, error: str, reason: str) -> HTTPException:
    return HTTPException(status_code=status, detail={"error": error, "reason": reason})


def not_found(device_id: str) -> HTTPException:
    # The same answer whether the device does not exist or is not the caller's.
    return _error(404, "unknown_device", f"no device {device_id!r} for these credentials")


def _id_only(request: Request) -> bool:
    return bool(request.app.state.command_settings.allow_device_id_only)


async def _device_row(request: Request, device_id: str) -> Any:
    async with request.app.state.pool.acquire() as conn:
        return await queries().triggers_device(conn, device_id=device_id)


async def device_caller(request: Request, device_id: str, limit: str) -> Any:
    """The device row when the caller may act as `device_id` (stream, capture).

    `limit` names the per-device rate limit charged ("stream", "capture"). The token
    hash the caller used (None in device-id-only mode) is left on `request.state` for
    the credential watch, which closes the stream when that token stops being live.
    """
    token = request.headers.get(DEVICE_TOKEN_HEADER)
    if token:
        identity = await current_device(request)  # 401 for a bad, rotated or revoked token
        if identity.device_id != device_id:
            raise not_found(device_id)
        request.state.device_token_hash = tokens.hash_device_token(server_secret(request), token)
    elif not _id_only(request):
        raise _error(
            401,
            "unauthorized",
            f"missing {DEVICE_TOKEN_HEADER}; pair the device, or let an operator enable "
            "device-id-only mode (CAMFLEET_ALLOW_DEVICE_ID_ONLY)",
        )
    else:
        request.state.device_token_hash = None
    await limiter(request).hit(limit, device_id, limit)
    row = await _device_row(request, device_id)
    if row is None:
        raise not_found(device_id)
    if not token:  # device-id-only mode: the id is the credential, unless it has a token
        if row["device_token_hash"] is not None:
            raise _error(
                401, "unauthorized", f"this device has a token: send {DEVICE_TOKEN_HEADER}"
            )
        if row["revoked_at"] is not None:
            raise _error(403, "device_revoked", "the device was revoked")
        if row["status"] != "active":
            raise _error(403, "device_not_active", f"device is {row['status']}")
    return row


async def operator(request: Request) -> UserIdentity | None:
    """The user behind the API key; None only in device-id-only mode without a key."""
    if _id_only(request) and not request.headers.get("Authorization"):
        return None
    return await current_user(request)  # 401 for a missing, bad or revoked key


def may_operate(user: UserIdentity | None, row: Any) -> bool:
    """An owner reaches its own devices; ownerless ones only in device-id-only mode."""
    if user is None:
        return True
    return row["user_id"] is not None and row["user_id"] == user.user_id


async def operated_device(request: Request, device_id: str) -> Any:
    """Authenticate the operator, charge its trigger limit, then find its device (404)."""
    user = await operator(request)
    # (a space never occurs in a user id, so the two kinds of key cannot meet)
    key = user.user_id if user is not None else f"id-only {device_id}"
    await limiter(request).hit("trigger", key, "trigger")
    row = await _device_row(request, device_id)
    if row is None or not may_operate(user, row):
        raise not_found(device_id)
    return row


async def owned_device(request: Request, device_id: str, user: UserIdentity) -> Any:
    """The device `user` owns (for /devices/{id}/revoke|rotate), else 404."""
    async with request.app.state.pool.acquire() as conn:
        row = await queries().devices_get(conn, device_id=device_id)
    if row is None or not may_operate(user, row):
        raise not_found(device_id)
    return row


async def connected_device_ids(request: Request, stale_seconds: float) -> list[str]:
    """Streaming devices the caller may see: its own, or all in device-id-only mode."""
    user = await operator(request)
    async with request.app.state.pool.acquire() as conn:
        if user is None:
            rows = queries().triggers_connected_devices(conn, stale_seconds=stale_seconds)
        else:
            rows = queries().access_connected_devices_of_user(
                conn, stale_seconds=stale_seconds, user_id=user.user_id
            )
        return [r["device_id"] async for r in rows]
