"""PostgreSQL database block."""

from __future__ import annotations

from prefect.blocks.core import Block

from camfleet.targets import PostgresSettings


class PostgresDatabase(Block, PostgresSettings):
    _block_type_name = "camfleet PostgreSQL"
    _block_type_slug = "camfleet-postgres"
    _description = "The PostgreSQL database holding camfleet's devices, captures and triggers."

    # Fields, from_url(), dsn(), describe(): camfleet.targets.PostgresSettings.

    @classmethod
    def from_env(cls) -> PostgresDatabase:
        from camfleet.settings import Settings

        url = Settings().database_url
        if url is None:
            raise ValueError("DATABASE_URL is not set")
        return cls.from_url(url.get_secret_value())
