"""The one small interface every object-storage backend implements."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import BinaryIO

# Read size when hashing or streaming files: large enough to keep syscalls rare, small
# enough that memory stays flat for any object size.
STREAM_CHUNK_BYTES = 1024 * 1024


class StorageError(RuntimeError):
    """A backend failed; the message never carries credentials."""


class PresignNotSupported(StorageError):
    """The backend cannot hand out presigned uploads (configure S3 or the device API)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str | None = None  # hex; None when the backend does not know it cheaply
    content_type: str | None = None


@dataclass(frozen=True)
class PresignedPut:
    url: str
    key: str
    expires_at: datetime
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PresignedPost:
    url: str
    key: str
    fields: dict[str, str]
    expires_at: datetime


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_stream(stream: BinaryIO) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    while chunk := stream.read(STREAM_CHUNK_BYTES):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


class ObjectStore(ABC):
    """put/get/head/delete/list plus presigned uploads, keyed by `camfleet.keys` keys."""

    scheme: str = ""

    @abstractmethod
    def put(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> ObjectInfo:
        """Store `data` durably under `key` (overwriting); returns size and sha256."""

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """Size (and sha256 when known) of `key`, or None when it does not exist."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...

    def checksum(self, key: str) -> str | None:
        """The object's SHA-256: from metadata when the backend kept it, else by reading."""
        info = self.head(key)
        if info is None:
            return None
        if info.sha256:
            return info.sha256
        return sha256_hex(self.get(key))

    def digest(self, key: str, max_bytes: int | None = None) -> tuple[int, str | None] | None:
        """(size, SHA-256) computed from the stored bytes; None when absent.

        An object larger than `max_bytes` is not read: (size, None), enough to refuse it.
        The edge signer's read-back (`camfleet.storage.fast_s3.ObjectReader` is the fast
        path for S3 with static credentials).
        """
        info = self.head(key)
        if info is None:
            return None
        if max_bytes is not None and info.size > max_bytes:
            return info.size, None
        sha = self.checksum(key)  # LocalStore streams from disk
        return (info.size, sha) if sha else None

    def presigned_put(
        self, key: str, content_type: str, expires_in: int = 300, max_bytes: int | None = None
    ) -> PresignedPut:
        raise PresignNotSupported(f"{self.scheme} storage does not presign uploads")

    def presigned_post(
        self, key: str, max_bytes: int, expires_in: int = 300, content_type: str | None = None
    ) -> PresignedPost:
        raise PresignNotSupported(f"{self.scheme} storage does not presign uploads")

    @abstractmethod
    def describe(self) -> str:
        """Where objects go, for banners and logs; never includes a secret."""
