"""SFTP server block (seed 001's `sftp` section), with the host key it must present."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class SftpServer(Block):
    _block_type_name = "camfleet SFTP Server"
    _block_type_slug = "camfleet-sftp-server"
    _description = "An OpenSSH SFTP server event packages are uploaded to."

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
