"""Prefect Blocks for every credential and endpoint camfleet talks to.

`prefect block register -m blocks` (from the project root) registers them all;
`camfleet blocks from-env` saves blocks made from the seeds' environment variables.
"""

from blocks.mqtt import MqttBroker
from blocks.postgres import PostgresDatabase
from blocks.s3 import S3Bucket
from blocks.secrets import CamfleetSecrets
from blocks.sftp import SftpServer
from blocks.supabase import SupabaseProject

__all__ = [
    "CamfleetSecrets",
    "MqttBroker",
    "PostgresDatabase",
    "S3Bucket",
    "SftpServer",
    "SupabaseProject",
]
