"""Supabase Storage through the `supabase` client (seed 002's `gxp-captures` bucket).

The object's SHA-256 travels as user metadata so `head` can return it without a
download. Presigned uploads are Supabase signed upload URLs (PUT, token in the URL).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from camfleet.keys import object_key
from camfleet.storage.base import (
    ObjectInfo,
    ObjectStore,
    PresignedPut,
    StorageError,
    sha256_hex,
)

# Supabase signed upload URLs are valid for two hours; the server decides, not us.
SUPABASE_SIGNED_UPLOAD_TTL_S = 2 * 3600


class SupabaseStore(ObjectStore):
    scheme = "supabase"

    def __init__(self, url: str, service_role_key: str, bucket: str) -> None:
        from supabase import create_client

        self.url = url.rstrip("/")
        self.bucket = bucket
        self._bucket = create_client(self.url, service_role_key).storage.from_(bucket)

    def _upload(self, key, body, content_type, sha):
        from storage3.exceptions import StorageApiError

        try:
            self._bucket.upload(
                object_key(key),
                body,
                {"content-type": content_type, "upsert": "true", "metadata": {"sha256": sha}},
            )
        except StorageApiError as exc:
            raise StorageError(f"Supabase upload {key!r} failed: {exc.message}") from exc

    def put(self, key, data, content_type="application/octet-stream"):
        sha = sha256_hex(data)
        self._upload(key, data, content_type, sha)
        return ObjectInfo(key, len(data), sha, content_type)

    def get(self, key):
        from storage3.exceptions import StorageApiError

        try:
            return self._bucket.download(object_key(key))
        except StorageApiError as exc:
            if str(exc.status) == "404":
                raise KeyError(key) from None
            raise StorageError(f"Supabase download {key!r} failed: {exc.message}") from exc

    def head(self, key):
        from storage3.exceptions import StorageApiError

        try:
            info = self._bucket.info(object_key(key))
        except StorageApiError as exc:
            if str(exc.status) == "404":
                return None
            raise StorageError(f"Supabase info {key!r} failed: {exc.message}") from exc
        meta = info.get("metadata") or {}
        return ObjectInfo(
            key, int(info.get("size", 0)), meta.get("sha256"), info.get("content_type")
        )

    def delete(self, key):
        self._bucket.remove([object_key(key)])

    def list(self, prefix=""):
        folder, _, start = prefix.rpartition("/")
        for entry in self._bucket.list(folder or None, {"limit": 1000, "search": start}):
            if entry.get("id"):  # folders have no id
                key = f"{folder}/{entry['name']}" if folder else entry["name"]
                yield ObjectInfo(key, int((entry.get("metadata") or {}).get("size", 0)))

    def presigned_put(self, key, content_type, expires_in=300, max_bytes=None):
        signed = self._bucket.create_signed_upload_url(object_key(key))
        expires_at = datetime.now(UTC) + timedelta(seconds=SUPABASE_SIGNED_UPLOAD_TTL_S)
        return PresignedPut(signed["signed_url"], key, expires_at, {"Content-Type": content_type})

    def describe(self):
        return f"Supabase Storage bucket {self.bucket} at {self.url}"
