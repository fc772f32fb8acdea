"""Any S3-compatible endpoint through boto3: AWS, MinIO, Supabase's S3 endpoint.

Objects are written with their SHA-256 both as S3's own `ChecksumSHA256` (the server
verifies the body against it) and as `x-amz-meta-sha256` metadata (so `head` returns it
on servers that do not keep checksums). Presigned URLs are signature version 4 and
cover exactly one key: a device cannot reuse one for another key.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from camfleet.keys import object_key
from camfleet.storage.base import (
    STREAM_CHUNK_BYTES,
    ObjectInfo,
    ObjectStore,
    PresignedPost,
    PresignedPut,
    StorageError,
)

# boto3's "standard" retry mode with a few attempts rides out a restarting server
# without hiding a dead one for long.
_BOTO_CONFIG = Config(
    signature_version="s3v4",
    s3={"addressing_style": "path"},
    retries={"mode": "standard", "max_attempts": 4},
    connect_timeout=5,
    read_timeout=30,
)


class S3Store(ObjectStore):
    scheme = "s3"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        create_bucket: bool = False,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        # A session of our own (not boto3's default one): its public get_credentials()
        # is what camfleet/storage/fast_s3.py signs with, the same the client uses.
        self.session = boto3.session.Session(
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=region,
        )
        self.client = self.session.client("s3", endpoint_url=endpoint_url, config=_BOTO_CONFIG)
        if create_bucket:
            self.ensure_bucket()

    def ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    def _key(self, key: str) -> str:
        key = object_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _strip(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    def put(self, key, data, content_type="application/octet-stream"):
        digest = hashlib.sha256(data).digest()
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=self._key(key),
                Body=data,
                ContentType=content_type,
                ChecksumSHA256=base64.b64encode(digest).decode(),
                Metadata={"sha256": digest.hex()},
            )
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"S3 put {key!r} failed: {exc}") from exc
        return ObjectInfo(key, len(data), digest.hex(), content_type)

    def get(self, key):
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as exc:
            if exc.response["Error"]["Code"] in {"NoSuchKey", "404"}:
                raise KeyError(key) from None
            raise StorageError(f"S3 get {key!r} failed: {exc}") from exc

    def digest(self, key, max_bytes=None):
        """One GET, hashed as it streams (the generic path would HEAD, then GET)."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response["Error"]["Code"] in {"NoSuchKey", "404", "NotFound"}:
                return None
            raise StorageError(f"S3 get {key!r} failed: {exc}") from exc
        body = response["Body"]
        if max_bytes is not None and response.get("ContentLength", 0) > max_bytes:
            body.close()
            return response["ContentLength"], None
        digest, size = hashlib.sha256(), 0
        for chunk in body.iter_chunks(STREAM_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
        return size, digest.hexdigest()

    def head(self, key):
        try:
            meta = self.client.head_object(
                Bucket=self.bucket, Key=self._key(key), ChecksumMode="ENABLED"
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise StorageError(f"S3 head {key!r} failed: {exc}") from exc
        sha = meta.get("Metadata", {}).get("sha256")
        if not sha and meta.get("ChecksumSHA256") and meta.get("ChecksumType") != "COMPOSITE":
            sha = base64.b64decode(meta["ChecksumSHA256"]).hex()
        return ObjectInfo(key, meta["ContentLength"], sha, meta.get("ContentType"))

    def delete(self, key):
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix=""):
        paginator = self.client.get_paginator("list_objects_v2")
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
            for obj in page.get("Contents", []):
                yield ObjectInfo(self._strip(obj["Key"]), obj["Size"])

    def presigned_put(self, key, content_type, expires_in=300, max_bytes=None):
        url = self.client.generate_presigned_url(
            "put_object",
            Params={"Bucket": self.bucket, "Key": self._key(key), "ContentType": content_type},
            ExpiresIn=expires_in,
        )
        expires_at = datetime.now(UTC) + timedelta(seconds=expires_in)
        return PresignedPut(url, key, expires_at, {"Content-Type": content_type})

    def presigned_post(self, key, max_bytes, expires_in=300, content_type=None):
        """A POST policy for exactly `key`, bounded in size (and type, when given)."""
        fields: dict[str, str] = {}
        conditions: list = [["content-length-range", 1, max_bytes]]
        if content_type:
            fields["Content-Type"] = content_type
            conditions.append({"Content-Type": content_type})
        post = self.client.generate_presigned_post(
            Bucket=self.bucket,
            Key=self._key(key),
            Fields=fields,
            Conditions=conditions,
            ExpiresIn=expires_in,
        )
        expires_at = datetime.now(UTC) + timedelta(seconds=expires_in)
        return PresignedPost(post["url"], key, dict(post["fields"]), expires_at)

    def describe(self):
        where = self.endpoint_url or f"AWS {self.region}"
        return f"s3://{self.bucket}/{self.prefix} at {where}"
