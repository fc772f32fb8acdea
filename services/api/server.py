"""Run the device API: one uvicorn process (`camfleet api --host --port`).

One process on purpose: one asyncio process already does hundreds of request pairs per
second (bench/). Run several behind a proxy for more; they share PostgreSQL (rate-limit
counters included, or Redis: services/api/counters.py) and Prefect runs per window.
uvloop and httptools are used when installed (uvicorn's "auto").

The access log never shows query strings: signed upload URLs carry their signature
there. Device tokens and pairing codes travel in headers and bodies, never logged.
"""

from __future__ import annotations

import logging


class _NoQueryStrings(logging.Filter):
    """uvicorn.access records: (client, method, path?query, http version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            record.args = (args[0], args[1], args[2].split("?", 1)[0], args[3], args[4])
        return True


def _rate_limits():
    """The configured limits, checked before binding: a typo is a clear exit 2."""
    from services.api.ratelimit import RateLimits

    try:
        return RateLimits.from_settings()
    except ValueError as exc:
        raise RuntimeError(f"rate limits (CAMFLEET_RATE_LIMIT_*): {exc}") from None


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    access_log: bool = True,
    secrets_block: str | None = None,
    database_block: str | None = None,
) -> None:
    import uvicorn

    from camfleet import resolve
    from services.api.app import create_app
    from services.api.secret_policy import require_strong_secret

    # Refuse to start without a secret or a database, with the reason, before binding;
    # a weak secret is refused too (WeakSecret is a RuntimeError: exit 2, no traceback).
    state = {
        "secret_key": require_strong_secret(resolve.secret_key(secrets_block)),
        "database_url": resolve.database_url(database_block),
        "rate_limits": _rate_limits(),
    }
    app = create_app(**state)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        loop="auto",
        http="auto",
        server_header=False,
        # Devices on weak links keep connections; a minute of idle is plenty to reuse.
        timeout_keep_alive=60,
    )
    server = uvicorn.Server(config)
    logging.getLogger("uvicorn.access").addFilter(_NoQueryStrings())
    server.run()
