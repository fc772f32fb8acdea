"""Object storage behind one small interface, chosen by one URL setting (STORAGE_URL).

file:///var/lib/camfleet/objects          local directory (default: <data dir>/objects)
s3://bucket/prefix?endpoint_url=http://127.0.0.1:9000&region=us-east-1
                                          any S3-compatible endpoint (credentials from
                                          AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)
supabase://bucket                         Supabase Storage (SUPABASE_URL,
                                          SUPABASE_SERVICE_ROLE)
block://camfleet-s3-bucket/<name>         a saved Prefect block (S3 or Supabase)
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from camfleet.storage.base import (
    ObjectInfo,
    ObjectStore,
    PresignedPost,
    PresignedPut,
    PresignNotSupported,
    StorageError,
)

__all__ = [
    "ObjectInfo",
    "ObjectStore",
    "PresignedPost",
    "PresignedPut",
    "PresignNotSupported",
    "StorageError",
    "open_store",
]


def open_store(url: str | None = None) -> ObjectStore:
    """The store a STORAGE_URL names (the settings' one when `url` is None)."""
    from camfleet.settings import get_settings

    settings = get_settings()
    url = url or settings.resolved_storage_url()
    parsed = urlparse(url)
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    secret = settings.secret_key.get_secret_value().encode() if settings.secret_key else None

    if parsed.scheme in ("", "file"):
        from camfleet.storage.local import LocalStore

        root = unquote(parsed.path) if parsed.scheme else url
        if parsed.netloc:  # file://relative/dir
            root = parsed.netloc + root
        return LocalStore(Path(root), public_url=settings.public_url, secret=secret)

    if parsed.scheme == "s3":
        from camfleet.storage.s3 import S3Store

        secret_key = settings.aws_secret_access_key
        return S3Store(
            bucket=parsed.netloc,
            prefix=parsed.path.strip("/"),
            endpoint_url=query.get("endpoint_url") or settings.s3_endpoint_url,
            region=query.get("region") or settings.aws_region,
            access_key_id=settings.aws_access_key_id,
            secret_access_key=secret_key.get_secret_value() if secret_key else None,
        )

    if parsed.scheme == "supabase":
        from camfleet.storage.supabase import SupabaseStore

        if not (settings.supabase_url and settings.supabase_service_role):
            raise StorageError("supabase:// storage needs SUPABASE_URL and SUPABASE_SERVICE_ROLE")
        return SupabaseStore(
            settings.supabase_url,
            settings.supabase_service_role.get_secret_value(),
            parsed.netloc or settings.supabase_storage_bucket,
        )

    if parsed.scheme == "block":
        from prefect.blocks.core import Block

        block = Block.load(f"{parsed.netloc}/{parsed.path.strip('/')}")
        return block.store()

    raise StorageError(f"unknown storage URL scheme {parsed.scheme!r} (file, s3, supabase, block)")
