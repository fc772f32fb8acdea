"""Who is calling: devices by `X-Device-Token`, users by `Authorization: Bearer <key>`.

Both are FastAPI dependencies used by every device router:

    from services.api.auth import DeviceIdentity, current_device
    async def handler(device: DeviceIdentity = Depends(current_device)): ...

A missing, malformed, unknown or revoked credential is a 401 with a reason; the
credential itself never appears in a response, a log line or an exception. Lookups go
by keyed hash (camfleet/tokens.py), so the database never sees a clear token.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fastapi import HTTPException, Request

from camfleet import tokens
from services.api.db import queries

DEVICE_TOKEN_HEADER = "X-Device-Token"  # noqa: S105 - a header name

# last_seen_at is written at most this often per device: a write per request would
# double the database work of every upload-url + ingest pair for a timestamp.
LAST_SEEN_RESOLUTION = timedelta(seconds=60)


@dataclass(frozen=True)
class DeviceIdentity:
    device_id: str
    user_id: str | None
    kind: str


@dataclass(frozen=True)
class UserIdentity:
    user_id: str
    key_id: str


def server_secret(request: Request) -> bytes:
    """The HMAC key: `create_app(secret_key=b"...")`, else the configured one (cached)."""
    secret = getattr(request.app.state, "secret_key", None)
    if secret is None:
        from camfleet.resolve import secret_key
        from services.api.secret_policy import require_strong_secret

        secret = require_strong_secret(secret_key())
        request.app.state.secret_key = secret
    return secret.encode() if isinstance(secret, str) else secret


def _unauthorized(reason: str, scheme: str) -> HTTPException:
    return HTTPException(
        status_code=401,
        detail={"error": "unauthorized", "reason": reason},
        headers={"WWW-Authenticate": scheme},
    )


async def current_device(request: Request) -> DeviceIdentity:
    """FastAPI dependency: the device whose live token is in `X-Device-Token`."""
    token = request.headers.get(DEVICE_TOKEN_HEADER)
    if not token:
        raise _unauthorized(f"missing {DEVICE_TOKEN_HEADER} header", DEVICE_TOKEN_HEADER)
    if not tokens.plausible_token(token, tokens.DEVICE_TOKEN_PREFIX):
        raise _unauthorized("malformed device token", DEVICE_TOKEN_HEADER)
    token_hash = tokens.hash_device_token(server_secret(request), token)
    pool = request.app.state.pool
    async with pool.acquire() as conn:
        row = await queries().devices_auth_token(conn, token_hash=token_hash)
        if row is None:
            raise _unauthorized("unknown or revoked device token", DEVICE_TOKEN_HEADER)
        seen = row["last_seen_at"]
        if seen is None or datetime.now(UTC) - seen > LAST_SEEN_RESOLUTION:
            await queries().devices_touch_last_seen(conn, device_id=row["device_id"])
    identity = DeviceIdentity(row["device_id"], row["user_id"], row["kind"])
    request.state.device = identity  # for the rate limiter and access logs
    return identity


async def current_user(request: Request) -> UserIdentity:
    """FastAPI dependency: the user whose live API key is the Bearer credential."""
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise _unauthorized("missing 'Authorization: Bearer <api key>' header", "Bearer")
    key = key.strip()
    if not tokens.plausible_token(key, tokens.USER_KEY_PREFIX):
        raise _unauthorized("malformed API key", "Bearer")
    key_hash = tokens.hash_user_key(server_secret(request), key)
    async with request.app.state.pool.acquire() as conn:
        row = await queries().devices_auth_user_key(conn, key_hash=key_hash)
    if row is None:
        raise _unauthorized("unknown or revoked API key", "Bearer")
    identity = UserIdentity(row["user_id"], str(row["key_id"]))
    request.state.user = identity
    return identity
