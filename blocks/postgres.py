"""PostgreSQL database block."""

from __future__ import annotations

from urllib.parse import quote, unquote, urlparse

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class PostgresDatabase(Block):
    _block_type_name = "camfleet PostgreSQL"
    _block_type_slug = "camfleet-postgres"
    _description = "The PostgreSQL database holding camfleet's devices, captures and triggers."

    host: str = "127.0.0.1"
    port: int = 5432
    dbname: str = "camfleet"
    user: str = "postgres"
    password: SecretStr | None = None
    sslmode: str = Field("prefer", description="libpq sslmode: disable, prefer, require, ...")

    @classmethod
    def from_url(cls, url: str) -> PostgresDatabase:
        parsed = urlparse(url)
        if parsed.scheme not in ("postgresql", "postgres"):
            raise ValueError("a PostgreSQL URL starts with postgresql://")
        return cls(
            host=parsed.hostname or "127.0.0.1",
            port=parsed.port or 5432,
            dbname=(parsed.path or "/postgres").lstrip("/") or "postgres",
            user=unquote(parsed.username or "postgres"),
            password=SecretStr(unquote(parsed.password)) if parsed.password else None,
            sslmode=dict(p.split("=", 1) for p in parsed.query.split("&") if "=" in p).get(
                "sslmode", "prefer"
            ),
        )

    @classmethod
    def from_env(cls) -> PostgresDatabase:
        from camfleet.settings import Settings

        url = Settings().database_url
        if url is None:
            raise ValueError("DATABASE_URL is not set")
        return cls.from_url(url.get_secret_value())

    def dsn(self) -> str:
        """The connection URL, password included: pass it to a driver, never to a log."""
        auth = quote(self.user)
        if self.password:
            auth += ":" + quote(self.password.get_secret_value(), safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{self.dbname}?sslmode={self.sslmode}"

    def describe(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"
