"""Credentials from a named Prefect Block, or else from the seeds' environment variables.

Every service and flow takes an optional block name; with none it falls back to the
environment (the quick start), so both deployments and `DATABASE_URL=... camfleet ...`
work. Blocks load synchronously (`_sync=True`) so these helpers behave the same when
called from an async flow, where Prefect's `Block.load` would return a coroutine.
"""

from __future__ import annotations

from pathlib import Path

from camfleet.settings import get_settings


def database_url(block_name: str | None = None) -> str:
    """The PostgreSQL DSN: the named block (or CAMFLEET_DATABASE_BLOCK), else
    DATABASE_URL, else the cluster a running `camfleet up` keeps.

    Never a command-line flag: a URL there, password included, is in the process list.
    """
    settings = get_settings()
    name = block_name or settings.database_block
    if name:
        # Only here: importing the block loads Prefect, seconds an admin command without
        # a block should not pay.
        from blocks.postgres import PostgresDatabase

        return PostgresDatabase.load(name, _sync=True).dsn()
    if settings.database_url is None:
        local = running_local_database(settings.data_dir)
        if local:
            return local
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
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value().encode()
    generated = settings.data_dir / "secret_key"  # written once by `camfleet up`
    if generated.is_file():
        return generated.read_text().strip().encode()
    raise RuntimeError("no server secret: set CAMFLEET_SECRET_KEY or a camfleet-secrets block")


def running_local_database(data_dir: Path) -> str | None:
    """The DSN of the cluster `camfleet up` runs in <data dir>/postgres, while it runs.

    So `camfleet users create-key ...` and friends work beside a running `camfleet up`
    with nothing exported. The port is the postmaster's (line 4 of postmaster.pid).
    """
    from camfleet.stack import DATABASE_NAME

    try:
        lines = (data_dir / "postgres" / "postmaster.pid").read_text().splitlines()
        port = int(lines[3])
    except (OSError, IndexError, ValueError):
        return None
    return f"postgresql://postgres@127.0.0.1:{port}/{DATABASE_NAME}"
