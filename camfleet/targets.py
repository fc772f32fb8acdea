"""Where a device-side command connects: an SFTP server and a PostgreSQL database.

Plain pydantic models, so camfleet's library code (the uploader on a device) reads its
configuration without importing Prefect. The Prefect blocks of the same name
(`blocks.sftp.SftpServer`, `blocks.postgres.PostgresDatabase`) subclass these: a saved
block and a config-file section are interchangeable wherever one of these is expected.
"""

from __future__ import annotations

from urllib.parse import quote, unquote, urlparse

from pydantic import BaseModel, Field, SecretStr


class SftpSettings(BaseModel):
    """An OpenSSH SFTP server event packages are uploaded to, with its host key."""

    host: str
    port: int = 22
    username: str
    ssh_key_path: str | None = Field(None, description="Path to the private key file.")
    private_key: SecretStr | None = Field(None, description="Private key (PEM/OpenSSH text).")
    passphrase: SecretStr | None = None
    host_key_fingerprint: str | None = Field(
        None, description="Expected host key, as `ssh-keygen -lf` prints it: SHA256:..."
    )
    known_hosts_path: str | None = Field(
        None, description="known_hosts file to check the host key against."
    )
    remote_video_dir: str = "/data/videos"
    remote_json_dir: str = "/data/json"

    def describe(self) -> str:
        return f"sftp://{self.username}@{self.host}:{self.port}"


class PostgresSettings(BaseModel):
    """A PostgreSQL database; `dsn()` carries the password, `describe()` never does."""

    host: str = "127.0.0.1"
    port: int = 5432
    dbname: str = "camfleet"
    user: str = "postgres"
    password: SecretStr | None = None
    sslmode: str = Field("prefer", description="libpq sslmode: disable, prefer, require, ...")

    @classmethod
    def from_url(cls, url: str):
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

    def dsn(self) -> str:
        """The connection URL, password included: pass it to a driver, never to a log."""
        auth = quote(self.user)
        if self.password:
            auth += ":" + quote(self.password.get_secret_value(), safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{self.dbname}?sslmode={self.sslmode}"

    def describe(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"
