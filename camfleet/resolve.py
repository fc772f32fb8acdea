"""Credentials from a named Prefect Block, or else from the seeds' environment variables.

Every service and flow takes an optional block name; with none it falls back to the
environment (the quick start), so both deployments and `DATABASE_URL=... camfleet ...`
work. Blocks load synchronously (`_sync=True`) so these helpers behave the same when
called from an async flow, where Prefect's `Block.load` would return a coroutine.
"""

from __future__ import annotations

from camfleet.settings import get_settings


def database_url(block_name: str | None = None) -> str:
    from blocks.postgres import PostgresDatabase

    settings = get_settings()
    name = block_name or settings.database_block
    if name:
        return PostgresDatabase.load(name, _sync=True).dsn()
    if settings.database_url is None:
        raise RuntimeError(
            "no database configured: set DATABASE_URL, pass a camfleet-postgres block name, "
            "or run `camfleet up` which starts a local PostgreSQL"
        )
    return settings.database_url.get_secret_value()


def mqtt_broker(block_name: str | None = None):
    from blocks.mqtt import MqttBroker

    name = block_name or get_settings().mqtt_block
    return MqttBroker.load(name, _sync=True) if name else MqttBroker.from_env()


def secret_key(block_name: str | None = None) -> bytes:
    """The server HMAC key; refuses to run without one rather than using a default."""
    from blocks.secrets import CamfleetSecrets

    settings = get_settings()
    name = block_name or settings.secrets_block
    if name:
        return CamfleetSecrets.load(name, _sync=True).secret_key.get_secret_value().encode()
    if settings.secret_key is None:
        raise RuntimeError("no server secret: set CAMFLEET_SECRET_KEY or a camfleet-secrets block")
    return settings.secret_key.get_secret_value().encode()
