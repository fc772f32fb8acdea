"""The web console at /console: the fleet page, device pages and their pictures.

Server-rendered Jinja2 templates (templates/), no front-end build: the fleet table
refreshes itself by fetching its own rows fragment every REFRESH_S seconds with a few
lines of inline script, and the sensor chart is inline SVG drawn by the template. That
is all the interactivity the pages need, so no JS toolkit is shipped (htmx would be the
choice if forms grew: it needs no build step either).

Every query is scoped by the signed-in user's id (sql/queries/console.sql): a device or
capture of another user is a 404, indistinguishable from one that does not exist.
Images are served only through these routes, after the same check.
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import anyio
from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from camfleet import health
from camfleet.keys import BadName, safe_id
from camfleet.protocol.assembler import DESCRIPTION as ERROR_MEANINGS
from camfleet.protocol.triggers import BadTriggerConfig, parse_trigger_config
from services.api.console import fleet_table, session
from services.api.console.session import ConsoleUser, NotSignedIn, console_user
from services.api.console.thumbnails import NoThumbnail, ensure_thumbnail
from services.api.db import queries

router = APIRouter(prefix="/console", include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))

REFRESH_S = 15
CAPTURES_PER_PAGE = 48
LIST_LIMIT = 50
READINGS_LIMIT = 288  # a day of five-minute readings
SORTS = ("name", "kind", "health", "last_seen")
KINDS = ("esp32", "edge", "visant", "lifelog", "sftp")
IMAGE_TYPES = {"image/jpeg", "image/png", "image/webp", "image/gif"}
MAX_SCHEDULE_S = 7 * 24 * 3600
# Alerts (camfleet/alerts.py incidents): every open one, and those resolved this recently.
ALERTS_RESOLVED_WITHIN = timedelta(hours=24)
ALERTS_LIMIT = 20
# incident kind -> (what it says while open, what it says once resolved): the words of
# the notifications (camfleet.device.silent / .back, .erroring / .recovered).
INCIDENT_WORDS = {"silent": ("silent", "back"), "erroring": ("erroring", "recovered")}
# Pages allow only their own inline script (by nonce) and same-origin images.
CSP = (
    "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
    "script-src 'nonce-{nonce}'; connect-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


def _page(request: Request, name: str, context: dict, status_code: int = 200) -> HTMLResponse:
    nonce = secrets.token_urlsafe(12)
    start = time.perf_counter()
    response = templates.TemplateResponse(
        request, name, {**context, "nonce": nonce}, status_code=status_code
    )
    # Where a page's server time goes, for bench/bench_console.py and browser dev tools.
    timing = f"render;dur={(time.perf_counter() - start) * 1000:.1f}"
    if hasattr(request.state, "rows_ms"):
        timing = f"rows;dur={request.state.rows_ms:.1f}, " + timing
    if hasattr(request.state, "db_ms"):
        timing = f"db;dur={request.state.db_ms:.1f}, " + timing
    response.headers["Server-Timing"] = timing
    response.headers["Content-Security-Policy"] = CSP.format(nonce=nonce)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    return response


def _not_found() -> HTTPException:
    return HTTPException(status_code=404, detail={"error": "not_found", "reason": "no such item"})


def _device_id(value: str) -> str:
    try:
        return safe_id(value)
    except BadName:
        raise _not_found() from None


def _record_id(value: str) -> str:
    try:
        return safe_id(value, "capture id")
    except BadName:
        raise _not_found() from None


def prefect_ui_url(request: Request) -> str | None:
    """`create_app(prefect_ui_url=...)`, else Prefect's PREFECT_UI_URL setting (derived
    from PREFECT_API_URL when unset)."""
    ui = getattr(request.app.state, "prefect_ui_url", None)
    if ui is None:
        from prefect.settings import PREFECT_UI_URL

        ui = PREFECT_UI_URL.value()
    return ui.rstrip("/") if ui else None


def prefect_run_url(ui: str | None, flow_run_id: str | None) -> str | None:
    """The Prefect UI page of a flow run, when the id is a UUID and a UI is known."""
    if not (ui and flow_run_id):
        return None
    try:
        run = uuid.UUID(str(flow_run_id))
    except ValueError:
        return None
    return f"{ui}/runs/flow-run/{run}"


async def _all(rows) -> list:
    """aiosql's asyncpg select: an async generator of records, as a list."""
    return [r async for r in rows]


def _today() -> datetime:
    return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


@dataclass(slots=True)
class FleetRow:
    """One device as the fleet table shows it, every field formatted here once, so
    console/fleet_table.py only joins them (bench/bench_console.py: formatting and
    looking fields up per cell in the template was most of the 1,000-device page)."""

    device_id: str
    device_href: str  # URL-quoted, for /console/devices/<id>
    name: str
    kind: str
    health: str
    thumb_href: str | None  # URL-quoted record id of the newest stored capture
    last_contact: datetime | None
    last_contact_iso: str | None
    last_contact_text: str | None  # "YYYY-MM-DD HH:MM:SS" (UTC)
    captures_today: int
    failures_today: int  # failed captures plus device errors
    success_rate: float | None
    success_text: str | None  # "75%"


def fleet_rows(rows, now: datetime) -> list[FleetRow]:
    out = []
    classify, contact_of = health.classify, health.last_contact
    for r in rows:
        captures, errors = r["captures_today"] or 0, r["errors_today"] or 0
        contact = contact_of(r["last_seen_at"], r["latest_capture_at"])
        iso = contact.astimezone(UTC).isoformat() if contact else None
        ended = r["triggers_ended"] or 0
        rate = (r["triggers_executed"] or 0) / ended if ended else None
        record_id = r["latest_record_id"]
        out.append(
            FleetRow(
                device_id=r["device_id"],
                device_href=quote(r["device_id"], safe=""),
                name=r["friendly_name"] or r["device_id"],
                kind=r["kind"],
                health=classify(
                    now,
                    r["interval_seconds"],
                    r["last_seen_at"],
                    r["latest_capture_at"],
                    errors=errors,
                    captures=captures,
                ),
                thumb_href=quote(record_id, safe="") if record_id else None,
                last_contact=contact,
                last_contact_iso=iso,
                last_contact_text=f"{iso[:10]} {iso[11:19]}" if iso else None,
                captures_today=captures,
                failures_today=(r["failures_today"] or 0) + errors,
                success_rate=rate,
                success_text=f"{rate * 100:.0f}%" if rate is not None else None,
            )
        )
    return out


def _filtered(devices: list[FleetRow], kind: str, state: str, sort: str) -> list[FleetRow]:
    if kind in KINDS:
        devices = [d for d in devices if d.kind == kind]
    if state in health.STATES:
        devices = [d for d in devices if d.health == state]
    if sort == "kind":
        devices.sort(key=lambda d: d.kind)
    elif sort == "health":  # the unwell first
        order = {health.SILENT: 0, health.ERRORING: 1, health.LATE: 2, health.OK: 3}
        devices.sort(key=lambda d: order[d.health])
    elif sort == "last_seen":  # longest silent first
        devices.sort(key=lambda d: d.last_contact or datetime.min.replace(tzinfo=UTC))
    return devices


async def _fleet(request: Request, user: ConsoleUser, kind: str, state: str, sort: str):
    now = datetime.now(UTC)
    start = time.perf_counter()
    async with request.app.state.pool.acquire() as conn:
        rows = [
            r async for r in queries().console_fleet(conn, user_id=user.user_id, since=_today())
        ]
    request.state.db_ms = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    devices = _filtered(fleet_rows(rows, now), kind, state, sort)
    request.state.rows_ms = (time.perf_counter() - start) * 1000  # Server-Timing "rows"
    return devices, now


def _table(request: Request, devices: list[FleetRow]):
    start = time.perf_counter()
    table = fleet_table.rows_html(devices)
    request.state.rows_ms += (time.perf_counter() - start) * 1000
    return table


async def _alerts(conn, user: ConsoleUser, now: datetime, device_id: str | None = None):
    rows = queries().console_alerts(
        conn,
        user_id=user.user_id,
        since=now - ALERTS_RESOLVED_WITHIN,
        device_id=device_id,
        limit=ALERTS_LIMIT,
    )
    return [alert_view(r) async for r in rows]


def alert_view(row) -> dict:
    """An incident as the console words it: open "silent", resolved "back"."""
    a = dict(row)
    opened, resolved = INCIDENT_WORDS.get(a["kind"], (a["kind"], "resolved"))
    a["open"] = a["resolved_at"] is None
    a["state"] = opened if a["open"] else resolved
    return a


async def _fleet_alerts(request: Request, user: ConsoleUser) -> list[dict]:
    async with request.app.state.pool.acquire() as conn:
        return await _alerts(conn, user, datetime.now(UTC))


def _filters(kind: str, state: str, sort: str) -> dict:
    return {
        "kind": kind if kind in KINDS else "",
        "state": state if state in health.STATES else "",
        "sort": sort if sort in SORTS else "name",
        "kinds": KINDS,
        "states": health.STATES,
        "sorts": SORTS,
    }


@router.get("/", response_class=HTMLResponse)
async def fleet_page(
    request: Request,
    kind: str = "",
    health_state: str = "",
    sort: str = "name",
    user: ConsoleUser = Depends(console_user),
):
    devices, now = await _fleet(request, user, kind, health_state, sort)
    alerts = await _fleet_alerts(request, user)
    context = {
        "user": user,
        "fleet_table": _table(request, devices),
        "alerts": alerts,
        "now": now,
        "refresh_s": REFRESH_S,
    }
    return _page(request, "fleet.html", context | _filters(kind, health_state, sort))


@router.get("/fleet/rows", response_class=HTMLResponse)
async def fleet_rows_fragment(
    request: Request,
    kind: str = "",
    health_state: str = "",
    sort: str = "name",
    user: ConsoleUser = Depends(console_user),
):
    """The fleet table's body alone: what the page fetches to refresh itself."""
    devices, now = await _fleet(request, user, kind, health_state, sort)
    return _page(request, "_fleet_rows.html", {"fleet_table": _table(request, devices)})


@router.get("/fleet/alerts", response_class=HTMLResponse)
async def fleet_alerts_fragment(request: Request, user: ConsoleUser = Depends(console_user)):
    """The alerts list alone: the fleet page refreshes it with its rows."""
    alerts = await _fleet_alerts(request, user)
    return _page(request, "_alerts.html", {"alerts": alerts})


@router.get("/devices/{device_id}", response_class=HTMLResponse)
async def device_page(
    request: Request,
    device_id: str,
    before: str | None = None,
    user: ConsoleUser = Depends(console_user),
):
    device_id = _device_id(device_id)
    cursor = None
    if before:
        try:
            cursor = datetime.fromisoformat(before)
        except ValueError:
            raise HTTPException(400, {"error": "bad_cursor", "reason": "before"}) from None
        if cursor.tzinfo is None:
            cursor = cursor.replace(tzinfo=UTC)
    q, uid = queries(), user.user_id
    async with request.app.state.pool.acquire() as conn:
        device = await q.console_device(conn, device_id=device_id, user_id=uid)
        if device is None:
            raise _not_found()
        captures = await _all(
            q.console_device_captures(
                conn, device_id=device_id, user_id=uid, before=cursor, limit=CAPTURES_PER_PAGE
            )
        )
        errors = await _all(
            q.console_device_errors(conn, device_id=device_id, user_id=uid, limit=LIST_LIMIT)
        )
        triggers = await _all(
            q.console_device_triggers(conn, device_id=device_id, user_id=uid, limit=LIST_LIMIT)
        )
        readings = await _all(
            q.console_device_readings(conn, device_id=device_id, user_id=uid, limit=READINGS_LIMIT)
        )
        alerts = await _alerts(conn, user, datetime.now(UTC), device_id=device_id)
    ui = prefect_ui_url(request)
    captures = [dict(c) | {"run_url": prefect_run_url(ui, c["flow_run_id"])} for c in captures]
    triggers = [dict(t) | {"run_url": prefect_run_url(ui, t["flow_run_id"])} for t in triggers]
    next_before = (
        captures[-1]["created_at"].isoformat() if len(captures) == CAPTURES_PER_PAGE else None
    )
    config = device["config"] or {}
    context = {
        "user": user,
        "device": device,
        "config": config,
        "captures": captures,
        "next_before": next_before,
        "errors": errors,
        "meanings": ERROR_MEANINGS,
        "triggers": triggers,
        "alerts": alerts,
        "charts": sensor_charts(list(reversed(readings))),
        "message": request.query_params.get("saved") and "Configuration saved.",
    }
    return _page(request, "device.html", context)


def sensor_charts(readings) -> list[dict]:
    """One SVG polyline per measured quantity: points scaled into a 600x120 box."""
    charts = []
    for field, label, unit in (
        ("temperature_c", "Temperature", "°C"),
        ("humidity_pct", "Humidity", "%"),
        ("pressure_hpa", "Pressure", "hPa"),
    ):
        pts = [(r["at"], r[field]) for r in readings if r[field] is not None and r["at"]]
        if len(pts) < 2:
            continue
        t0, t1 = pts[0][0].timestamp(), pts[-1][0].timestamp()
        lo, hi = min(v for _, v in pts), max(v for _, v in pts)
        span_t, span_v = (t1 - t0) or 1.0, (hi - lo) or 1.0
        points = " ".join(
            f"{(t.timestamp() - t0) / span_t * 600:.1f},{110 - (v - lo) / span_v * 100:.1f}"
            for t, v in pts
        )
        charts.append(
            {"label": label, "unit": unit, "points": points, "lo": lo, "hi": hi, "last": pts[-1]}
        )
    return charts


@router.post("/devices/{device_id}/config")
async def update_config(
    request: Request,
    device_id: str,
    csrf: str = Form(""),
    schedule_interval_seconds: str = Form(""),
    trigger_enabled: str = Form(""),
    trigger_interval_seconds: str = Form(""),
    trigger_cron: str = Form(""),
    user: ConsoleUser = Depends(console_user),
):
    session.check_csrf(user, csrf)
    device_id = _device_id(device_id)
    async with request.app.state.pool.acquire() as conn:
        device = await queries().console_device(conn, device_id=device_id, user_id=user.user_id)
        if device is None:
            raise _not_found()
        config = device["config"] or {}
        try:
            patch = config_patch(
                config,
                schedule_interval_seconds,
                trigger_enabled,
                trigger_interval_seconds,
                trigger_cron,
            )
        except BadTriggerConfig as exc:
            raise HTTPException(422, {"error": "invalid_config", "reason": str(exc)}) from None
        await queries().console_update_config(
            conn, device_id=device_id, user_id=user.user_id, patch=patch
        )
    return RedirectResponse(f"/console/devices/{device_id}?saved=1", status_code=303)


def _int_field(value: str, name: str) -> int | None:
    value = value.strip()
    if not value:
        return None
    if not value.isdigit() or len(value) > 9:
        raise BadTriggerConfig(f'"{name}" must be a whole number of seconds')
    return int(value)


def config_patch(config: dict, schedule: str, enabled: str, interval: str, cron: str) -> dict:
    """The new "schedule" and "trigger" sections, validated as the trigger scheduler does."""
    trigger = dict(config.get("trigger") or {}) if isinstance(config.get("trigger"), dict) else {}
    trigger["enabled"] = enabled in ("on", "true", "1")
    trigger_interval = _int_field(interval, "trigger.interval_seconds")
    trigger.pop("interval_seconds", None)
    trigger.pop("cron", None)
    if trigger_interval is not None:
        trigger["interval_seconds"] = trigger_interval
    if cron.strip():
        trigger["cron"] = cron.strip()
    parse_trigger_config({"trigger": trigger})
    patch = {"trigger": trigger}
    wake = _int_field(schedule, "schedule.interval_seconds")
    section = config.get("schedule") if isinstance(config.get("schedule"), dict) else {}
    section = dict(section)
    if wake is None:
        section.pop("interval_seconds", None)
    elif not 1 <= wake <= MAX_SCHEDULE_S:
        raise BadTriggerConfig(f'"schedule.interval_seconds" must be 1-{MAX_SCHEDULE_S}')
    else:
        section["interval_seconds"] = wake
    patch["schedule"] = section
    return patch


async def _owned_capture(request: Request, record_id: str, user: ConsoleUser):
    record_id = _record_id(record_id)
    async with request.app.state.pool.acquire() as conn:
        row = await queries().console_capture(conn, record_id=record_id, user_id=user.user_id)
    if row is None or not row["storage_path"]:
        raise _not_found()
    return row


def _store(request: Request):
    from services.api.routes_devices import _store as shared_store

    return shared_store(request)


@router.get("/captures/{record_id}/thumb")
async def capture_thumbnail(
    request: Request, record_id: str, user: ConsoleUser = Depends(console_user)
):
    row = await _owned_capture(request, record_id, user)
    etag = _etag(row, "thumb")
    if request.headers.get("if-none-match") == etag:  # after the ownership check
        return Response(status_code=304, headers=_image_headers(etag))
    store = _store(request)
    try:
        data = await anyio.to_thread.run_sync(ensure_thumbnail, store, row["storage_path"])
    except NoThumbnail:
        raise _not_found() from None
    return Response(data, media_type="image/jpeg", headers=_image_headers(etag))


def _etag(row, variant: str) -> str:
    # A capture's object never changes once stored: its id (and key) identify the bytes.
    return f'"{row["record_id"]}-{variant}"'


def _image_headers(etag: str) -> dict:
    # no-cache, not max-age: a browser shared by two users (sign out, sign in as another)
    # must ask us each time, and we check ownership before answering 304 Not Modified.
    # Found by tests/test_console_browser.py: with max-age the second user saw the
    # first user's cached image.
    return {
        "Cache-Control": "private, no-cache",
        "ETag": etag,
        "X-Content-Type-Options": "nosniff",
    }


@router.get("/captures/{record_id}/image")
async def capture_image(
    request: Request, record_id: str, user: ConsoleUser = Depends(console_user)
):
    row = await _owned_capture(request, record_id, user)
    etag = _etag(row, "full")
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=_image_headers(etag))
    store = _store(request)
    exists = await anyio.to_thread.run_sync(store.head, row["storage_path"])
    if exists is None:
        raise _not_found()
    data = await anyio.to_thread.run_sync(store.get, row["storage_path"])
    # The device chose content_type: serve only image types, never HTML or script.
    media = row["content_type"] if row["content_type"] in IMAGE_TYPES else "image/jpeg"
    return Response(
        data,
        media_type=media,
        headers=_image_headers(etag) | {"Content-Security-Policy": "default-src 'none'; sandbox"},
    )


def _login_form(request: Request, error: str | None, status_code: int = 200) -> HTMLResponse:
    token, signed = session.new_login_csrf(request)
    response = _page(request, "login.html", {"error": error, "csrf": token}, status_code)
    session.set_login_cookie(request, response, signed)
    return response


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request):
    return _login_form(request, None)


@router.post("/login")
async def login(request: Request, api_key: str = Form(""), csrf: str = Form("")):
    session.check_login_csrf(request, csrf)
    key_id = await session.sign_in(request, api_key[:200])
    if key_id is None:
        return _login_form(request, "Unknown or revoked API key.", 401)
    response = RedirectResponse("/console/", status_code=303)
    session.start_session(request, response, key_id)
    return response


@router.post("/logout")
async def logout(csrf: str = Form(""), user: ConsoleUser = Depends(console_user)):
    session.check_csrf(user, csrf)
    response = RedirectResponse("/console/login", status_code=303)
    session.end_session(response)
    return response


def setup(app: FastAPI) -> None:
    async def to_login(request: Request, exc: NotSignedIn):
        if request.method == "GET" and "/captures/" not in request.url.path:
            return RedirectResponse("/console/login", status_code=303)
        return Response(status_code=401, headers={"Cache-Control": "no-store"})

    app.add_exception_handler(NotSignedIn, to_login)
