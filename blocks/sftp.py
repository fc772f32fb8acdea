"""SFTP server block (seed 001's `sftp` section), with the host key it must present."""

from __future__ import annotations

from prefect.blocks.core import Block

from camfleet.targets import SftpSettings


class SftpServer(Block, SftpSettings):
    # Fields and describe(): camfleet.targets.SftpSettings (read without Prefect on devices).
    _block_type_name = "camfleet SFTP Server"
    _block_type_slug = "camfleet-sftp-server"
    _description = "An OpenSSH SFTP server event packages are uploaded to."
