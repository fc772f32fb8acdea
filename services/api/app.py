"""The device API application: one FastAPI app, one router module per device family.

Routers live in `services/api/routes_*.py`, each exposing `router`; `create_app` mounts
every one listed in ROUTER_MODULES.
"""

from __future__ import annotations

import importlib

from fastapi import FastAPI

import camfleet

ROUTER_MODULES = [
    "services.api.routes_storage",  # signed uploads to local storage
    "services.api.routes_devices",  # pairing, tokens, upload-url, ingest (seed 004)
    "services.api.routes_commands",  # SSE commands, triggers, captures (seed 003)
]


def create_app(**state) -> FastAPI:
    from services.api.db import lifespan

    app = FastAPI(
        lifespan=lifespan,  # the asyncpg pool on app.state.pool (services/api/db.py)
        title="camfleet device API",
        version=camfleet.__version__,
        description="Device-facing HTTP API of camfleet: commands over SSE, captures, "
        "pairing, presigned uploads and idempotent ingest.",
    )
    for key, value in state.items():
        setattr(app.state, key, value)

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
