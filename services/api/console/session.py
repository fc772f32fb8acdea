"""Console sign-in: a user's existing API key, exchanged for a signed session cookie.

The cookie holds the key's id and a CSRF token, signed with itsdangerous under the
server secret (never the key itself). Every request re-checks that the key is still
live, so revoking a key (`camfleet users revoke-keys`) ends its console sessions too.

CSRF: the cookies are SameSite=Strict and HttpOnly, and every POST must also carry
the session's CSRF token as a form field (the login form, before any session, carries
a token from a short-lived signed cookie of its own).
"""

from __future__ import annotations

import hmac
import secrets
import uuid
from dataclasses import dataclass

from fastapi import HTTPException, Request, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer

from camfleet import tokens
from services.api.auth import server_secret
from services.api.db import queries

SESSION_COOKIE = "camfleet_console"
LOGIN_CSRF_COOKIE = "camfleet_console_login"
COOKIE_PATH = "/console"
SESSION_MAX_AGE_S = 12 * 3600  # a working day; sign in again after
LOGIN_FORM_MAX_AGE_S = 3600


class NotSignedIn(Exception):
    """Raised by `console_user`; the app answers with a redirect to the login page."""


@dataclass(frozen=True)
class ConsoleUser:
    user_id: str
    key_id: str
    csrf: str


def _serializer(request: Request, purpose: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(server_secret(request), salt=f"camfleet-console-{purpose}")


def _set_cookie(request: Request, response: Response, name: str, value: str, max_age: int):
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


async def console_user(request: Request) -> ConsoleUser:
    """FastAPI dependency: the signed-in user, else NotSignedIn."""
    raw = request.cookies.get(SESSION_COOKIE)
    if not raw:
        raise NotSignedIn
    try:
        data = _serializer(request, "session").loads(raw, max_age=SESSION_MAX_AGE_S)
        key_id, csrf = str(data["k"]), str(data["c"])
    except (BadSignature, KeyError, TypeError):
        raise NotSignedIn from None
    try:
        key_uuid = uuid.UUID(key_id)
    except ValueError:
        raise NotSignedIn from None
    async with request.app.state.pool.acquire() as conn:
        row = await queries().console_session_user(conn, key_id=key_uuid)
    if row is None:
        raise NotSignedIn
    return ConsoleUser(row["user_id"], key_id, csrf)


async def sign_in(request: Request, api_key: str) -> str | None:
    """The key's id when `api_key` is a live user key, else None."""
    key = api_key.strip()
    if not tokens.plausible_token(key, tokens.USER_KEY_PREFIX):
        return None
    key_hash = tokens.hash_user_key(server_secret(request), key)
    async with request.app.state.pool.acquire() as conn:
        row = await queries().devices_auth_user_key(conn, key_hash=key_hash)
    return str(row["key_id"]) if row else None


def start_session(request: Request, response: Response, key_id: str) -> None:
    value = _serializer(request, "session").dumps({"k": key_id, "c": secrets.token_urlsafe(24)})
    _set_cookie(request, response, SESSION_COOKIE, value, SESSION_MAX_AGE_S)
    response.delete_cookie(LOGIN_CSRF_COOKIE, path=COOKIE_PATH)


def end_session(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)


def new_login_csrf(request: Request) -> tuple[str, str]:
    """A fresh token for the login form and its signed copy for the cookie."""
    token = secrets.token_urlsafe(24)
    return token, _serializer(request, "login").dumps(token)


def set_login_cookie(request: Request, response: Response, signed: str) -> None:
    _set_cookie(request, response, LOGIN_CSRF_COOKIE, signed, LOGIN_FORM_MAX_AGE_S)


def check_login_csrf(request: Request, submitted: str | None) -> None:
    raw = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    try:
        expected = _serializer(request, "login").loads(raw, max_age=LOGIN_FORM_MAX_AGE_S)
    except BadSignature:
        expected = None
    _compare(expected, submitted)


def check_csrf(user: ConsoleUser, submitted: str | None) -> None:
    _compare(user.csrf, submitted)


def _compare(expected: object, submitted: str | None) -> None:
    if not (
        isinstance(expected, str)
        and isinstance(submitted, str)
        and hmac.compare_digest(expected.encode(), submitted.encode())
    ):
        raise HTTPException(
            status_code=403,
            detail={"error": "csrf", "reason": "missing or wrong CSRF token; reload the page"},
        )
