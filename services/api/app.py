"""The device API application: one FastAPI app, one router module per device family.

Routers live in `services/api/routes_*.py`, each exposing `router`; `create_app` mounts
every one listed in ROUTER_MODULES.
"""

from __future__ import annotations

import importlib
import logging

import asyncpg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline

import camfleet

log = logging.getLogger("camfleet.api")

# What asyncpg raises while PostgreSQL is down or restarting: refused connects, the
# server's "starting up"/"shutting down" answers, connections cut mid-query.
DATABASE_DOWN = (
    ConnectionRefusedError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    # Right after a PostgreSQL crash a pooled connection can fail with "cannot switch
    # to state ...; another operation is in progress" (seen in tests/test_faults_api.py).
    asyncpg.InternalClientError,
)
# A restarting PostgreSQL is back within seconds; devices wait this long before retrying.
DATABASE_RETRY_AFTER_S = 2


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """503 + Retry-After: devices back off and retry, instead of a bare 500."""
    log.warning("database unavailable (%s) on %s", type(exc).__name__, request.url.path)
    pool = getattr(request.app.state, "pool", None)
    if pool is not None:  # the idle connections died with the server: replace them all
        await pool.expire_connections()
    return JSONResponse(
        {"detail": {"error": "database_unavailable", "reason": "database unreachable; retry"}},
        status_code=503,
        headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
    )


ROUTER_MODULES = [
    "services.api.bodies",  # body size/time/count limits, bad input -> 4xx (no routes)
    "services.api.routes_storage",  # signed uploads to local storage
    "services.api.routes_devices",  # pairing, tokens, upload-url, ingest (seed 004)
    "services.api.routes_commands",  # SSE commands, triggers, captures (seed 003)
    "services.api.credential_watch",  # closes streams whose token died (no routes)
    "services.api.console",  # the web console at /console (docs/console.md)
    "services.api.routes_metrics",  # GET /metrics for Prometheus (camfleet/metrics.py)
]


def create_app(**state) -> FastAPI:
    from services.api.db import lifespan

    # FastAPIOffline: /docs and /redoc serve Swagger UI/ReDoc from the package, not a CDN.
    app = FastAPIOffline(
        lifespan=lifespan,  # the asyncpg pool on app.state.pool (services/api/db.py)
        title="camfleet device API",
        version=camfleet.__version__,
        description="Device-facing HTTP API of camfleet: commands over SSE, captures, "
        "pairing, presigned uploads and idempotent ingest.",
    )
    for key, value in state.items():
        setattr(app.state, key, value)
    for exc_class in DATABASE_DOWN:
        app.add_exception_handler(exc_class, _database_unavailable)

    @app.get("/", tags=["meta"])
    async def version() -> dict:
        return {"service": "camfleet-api", "version": camfleet.__version__}

    @app.get("/health", tags=["meta"])
    async def health() -> dict:
        return {"status": "ok"}

    for name in ROUTER_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        app.include_router(module.router)
        if hasattr(module, "setup"):
            module.setup(app)
    return app
