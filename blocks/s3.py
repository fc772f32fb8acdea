"""S3-compatible bucket block (AWS, MinIO, Supabase's S3 endpoint)."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class S3Bucket(Block):
    _block_type_name = "camfleet S3 Bucket"
    _block_type_slug = "camfleet-s3-bucket"
    _description = "An S3-compatible bucket for captured images and video."

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = Field(None, description="Leave empty for AWS itself.")
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None

    def store(self):
        from camfleet.storage.s3 import S3Store

        secret = self.secret_access_key
        return S3Store(
            bucket=self.bucket,
            prefix=self.prefix,
            endpoint_url=self.endpoint_url,
            region=self.region,
            access_key_id=self.access_key_id,
            secret_access_key=secret.get_secret_value() if secret else None,
        )
