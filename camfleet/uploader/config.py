"""The DataUploader's configuration: seed 001's `uploader` dictionary, unchanged.

    {"uploader": {
        "scan_interval_seconds": 30,
        "pending_dir": "data/pending_upload",       # camfleet additions, all optional
        "uploaded_dir": "data/uploaded",
        "sftp": {"host": ..., "port": 22, "username": ..., "ssh_key_path": ...,
                 "remote_video_dir": "/srv/events/videos",
                 "remote_json_dir": "/srv/events/json",
                 "host_key_fingerprint": "SHA256:...",  # or known_hosts_path
                },
        "database": {"host": ..., "port": 5432, "dbname": ..., "user": ..., "password": ...}}}

The `sftp` and `database` sections are the `SftpServer` and `PostgresDatabase` blocks'
own fields (camfleet.targets, which the blocks subclass; reading a config file imports
no Prefect), so the same settings can come from saved blocks instead (`sftp_block`,
`database_block`), and with neither a `database` section nor a block the database is
`DATABASE_URL`. Passwords and private keys are `SecretStr`: never printed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from camfleet.targets import PostgresSettings, SftpSettings
from camfleet.uploader.jobs import DEFAULT_ORPHAN_SECONDS, DEFAULT_SETTLE_SECONDS

# Two SFTP channels keep the link busy while one waits for a reply; measured on
# loopback (bench/bench_sftp_upload.py), more lanes only add GIL contention on 2 cores.
DEFAULT_CONCURRENCY = 2
# Upper bound on lanes: each is an SFTP channel and a thread.
MAX_CONCURRENCY = 16
# Jobs one run takes on: a run over a huge backlog still ends (and reports) in minutes;
# the next run picks up the rest.
DEFAULT_MAX_JOBS_PER_RUN = 1000
# A config file is a few kilobytes; refuse to parse anything absurd.
MAX_CONFIG_BYTES = 1024 * 1024


class UploaderConfig(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    scan_interval_seconds: int = Field(60, ge=1)
    pending_dir: Path = Field(
        Path("data/pending_upload"),
        validation_alias=AliasChoices("pending_dir", "pending_upload_dir"),
    )
    uploaded_dir: Path = Path("data/uploaded")
    # Where packages that can never succeed go, each with a `<name>.reason.txt`.
    failed_dir: Path = Field(
        Path("data/failed_upload"), validation_alias=AliasChoices("failed_dir", "rejected_dir")
    )
    settle_seconds: float = Field(DEFAULT_SETTLE_SECONDS, ge=0)
    orphan_seconds: float = Field(DEFAULT_ORPHAN_SECONDS, ge=0)
    concurrency: int = Field(DEFAULT_CONCURRENCY, ge=1, le=MAX_CONCURRENCY)
    max_jobs_per_run: int = Field(DEFAULT_MAX_JOBS_PER_RUN, ge=1)
    sftp: SftpSettings | None = None
    database: PostgresSettings | None = None
    sftp_block: str | None = None
    database_block: str | None = None

    @field_validator("sftp", mode="before")
    @classmethod
    def _sftp_section(cls, value: Any) -> Any:
        return SftpSettings(**value) if isinstance(value, dict) else value

    @field_validator("database", mode="before")
    @classmethod
    def _database_section(cls, value: Any) -> Any:
        return PostgresSettings(**value) if isinstance(value, dict) else value

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> UploaderConfig:
        """The seed's whole config (with an `uploader` section) or just the section."""
        section = config.get("uploader", config) if isinstance(config, dict) else config
        if not isinstance(section, dict):
            raise ValueError("the uploader configuration must be a JSON object")
        return cls.model_validate(section)

    @classmethod
    def from_file(cls, path: str | Path) -> UploaderConfig:
        path = Path(path)
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"{path} is larger than {MAX_CONFIG_BYTES} bytes")
        config = cls.from_dict(json.loads(path.read_text()))
        # Relative directories are relative to the config file, not to wherever the
        # process happens to start (a served deployment starts in a temp directory).
        base = path.resolve().parent
        for name in ("pending_dir", "uploaded_dir", "failed_dir"):
            value = getattr(config, name)
            if not value.is_absolute():
                setattr(config, name, base / value)
        return config

    def sftp_server(self) -> SftpSettings:
        """The SFTP target: the `sftp` section, or the saved block it names."""
        if self.sftp is not None:
            return self.sftp
        if self.sftp_block:
            from blocks.sftp import SftpServer  # a saved block: Prefect's business

            return SftpServer.load(self.sftp_block)
        raise ValueError("no SFTP server configured: add an `sftp` section or `sftp_block`")

    def database_dsn(self) -> str:
        """The database URL: the `database` section, the named block, or DATABASE_URL."""
        if self.database is not None:
            return self.database.dsn()
        from camfleet import resolve

        return resolve.database_url(self.database_block)

    def describe(self) -> dict[str, Any]:
        """A loggable view: paths and endpoints, never passwords or keys."""
        return {
            "pending_dir": str(self.pending_dir),
            "uploaded_dir": str(self.uploaded_dir),
            "failed_dir": str(self.failed_dir),
            "scan_interval_seconds": self.scan_interval_seconds,
            "sftp": self.sftp.describe() if self.sftp else self.sftp_block,
            "database": self.database.describe() if self.database else self.database_block,
        }
