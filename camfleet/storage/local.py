"""Objects as files under one directory: the default backend, durable with fsync.

Presigned uploads to local storage go through the device API's `/storage/upload/...`
route: the URL carries an HMAC signature over method, key, size limit and expiry,
made with the server secret, so it is as narrow as an S3 presigned URL.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, urlencode

from camfleet.keys import object_key
from camfleet.storage.base import (
    STREAM_CHUNK_BYTES,
    ObjectInfo,
    ObjectStore,
    PresignedPost,
    PresignedPut,
    PresignNotSupported,
    sha256_hex,
    sha256_stream,
)

UPLOAD_ROUTE = "/storage/upload/"
# Objects are written under TMP_DIR first and renamed into place (same filesystem, so
# the rename is atomic). A crash between write and rename leaves a file there, never
# beside the objects; files older than this are swept when a store opens. An hour is
# far longer than any single write takes.
TMP_DIR = ".tmp"
STALE_TMP_S = 3600


class KeyUnavailable(Exception):
    """The key cannot name a file here: it is a directory, or a parent of it is a file,
    or (write-once uploads) a different object is already stored under it."""


def upload_signature(
    secret: bytes, method: str, key: str, expires: int, max_bytes: int, content_type: str = ""
) -> str:
    # The content type is signed too (as S3 signs Content-Type in a presigned PUT): a URL
    # signed for image/jpeg cannot store an SVG or an HTML page.
    msg = f"{method}\n{key}\n{expires}\n{max_bytes}\n{content_type}".encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def verify_upload_signature(
    secret: bytes,
    method: str,
    key: str,
    expires: int,
    max_bytes: int,
    signature: str,
    content_type: str = "",
) -> bool:
    if expires < time.time():
        return False
    expected = upload_signature(secret, method, key, expires, max_bytes, content_type)
    return hmac.compare_digest(expected, signature)


def signed_content_type(value: str | None) -> str:
    """The media type as signed and compared: lower case, without parameters."""
    return (value or "").split(";", 1)[0].strip().lower()


class LocalStore(ObjectStore):
    scheme = "file"

    def __init__(
        self, root: str | Path, public_url: str | None = None, secret: bytes | None = None
    ) -> None:
        self.root = Path(root).resolve()
        self.tmp = self.root / TMP_DIR
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._sweep_stale_tmp()
        self.public_url = public_url.rstrip("/") if public_url else None
        self._secret = secret

    def _sweep_stale_tmp(self) -> None:
        cutoff = time.time() - STALE_TMP_S
        for entry in os.scandir(self.tmp):
            try:
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass  # another process swept it first

    def _path(self, key: str) -> Path:
        path = (self.root / object_key(key)).resolve()
        if self.root not in path.parents:
            raise ValueError("key escapes the storage root")
        if path == self.tmp or self.tmp in path.parents:
            raise ValueError("key lies in the store's temporary directory")
        return path

    def _write_atomically(self, key: str, write, exclusive: bool = False) -> Path:
        """Write through a temporary file renamed into place. `exclusive`: never replace
        an existing object (KeyUnavailable instead), for write-once uploads."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):  # a parent of the key is a file
            raise KeyUnavailable(f"a parent of {key!r} is an object") from None
        if path.is_dir():
            raise KeyUnavailable(f"{key!r} is a prefix of other objects")
        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                write(out)
                out.flush()
                # Data plus the metadata needed to read it back (size, blocks) of a
                # fresh file: all a full fsync would add is the timestamps. (Batching
                # the directory fsyncs of a batch was measured no faster on ext4,
                # 2026-12-03: the data flush is the cost.)
                os.fdatasync(out.fileno())
            if exclusive:
                try:
                    os.link(tmp, path)  # atomic create-if-absent
                except FileExistsError:
                    raise KeyUnavailable(f"{key!r} is already stored") from None
                os.unlink(tmp)
            else:
                os.replace(tmp, path)
        except IsADirectoryError:  # raced with a deeper key's mkdir
            Path(tmp).unlink(missing_ok=True)
            raise KeyUnavailable(f"{key!r} is a prefix of other objects") from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        # The rename is durable only once the directory entry is on disk.
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return path

    def put(self, key, data, content_type="application/octet-stream"):
        self._write_atomically(key, lambda out: out.write(data))
        return ObjectInfo(key, len(data), sha256_hex(data), content_type)

    def put_stream(self, key, stream, max_bytes: int, exclusive: bool = False) -> ObjectInfo:
        """Copy a stream (an upload body) to `key`, refusing more than `max_bytes`;
        `exclusive`: KeyUnavailable when an object is already stored there."""
        digest = hashlib.sha256()
        size = 0

        def copy(out):
            nonlocal size
            while chunk := stream.read(STREAM_CHUNK_BYTES):
                size += len(chunk)
                if size > max_bytes:
                    raise ValueError(f"upload larger than {max_bytes} bytes")
                digest.update(chunk)
                out.write(chunk)

        try:
            self._write_atomically(key, copy, exclusive=exclusive)
        except KeyUnavailable:
            if exclusive and size and self.checksum(key) == digest.hexdigest():
                return ObjectInfo(key, size, digest.hexdigest())  # a retry: same bytes
            raise
        return ObjectInfo(key, size, digest.hexdigest())

    # Only regular files are objects: a key naming a directory (a prefix of other
    # objects) or going through a file is absent, never a 4,096-byte "object".
    _ABSENT = (FileNotFoundError, NotADirectoryError, IsADirectoryError)

    def get(self, key):
        try:
            return self._path(key).read_bytes()
        except self._ABSENT:
            raise KeyError(key) from None

    def head(self, key):
        try:
            st = self._path(key).stat()
        except self._ABSENT:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return ObjectInfo(key, st.st_size)

    def read_head(self, key: str, size: int) -> bytes | None:
        """The first `size` bytes of the object (a magic-number check), or None."""
        try:
            with self._path(key).open("rb") as f:
                return f.read(size)
        except self._ABSENT:
            return None

    def checksum(self, key):
        try:
            with self._path(key).open("rb") as f:
                return sha256_stream(f)[0]
        except self._ABSENT:
            return None

    def delete(self, key):
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix=""):
        base = self.root
        for path in sorted(base.rglob("*")):
            if path.is_file() and self.tmp not in path.parents:
                key = path.relative_to(base).as_posix()
                if key.startswith(prefix):
                    yield ObjectInfo(key, path.stat().st_size)

    def _signed_url(
        self, method: str, key: str, expires_in: int, max_bytes: int, content_type: str = ""
    ) -> tuple:
        if not (self.public_url and self._secret):
            raise PresignNotSupported(
                "local storage presigns uploads through the device API: set "
                "CAMFLEET_PUBLIC_URL and CAMFLEET_SECRET_KEY (camfleet up does)"
            )
        object_key(key)
        expires = int(time.time()) + expires_in
        sig = upload_signature(self._secret, method, key, expires, max_bytes, content_type)
        query = urlencode({"expires": expires, "max_bytes": max_bytes, "sig": sig})
        url = f"{self.public_url}{UPLOAD_ROUTE}{quote(key)}?{query}"
        return url, datetime.fromtimestamp(expires, UTC)

    def presigned_put(self, key, content_type, expires_in=300, max_bytes=None):
        url, expires_at = self._signed_url(
            "PUT", key, expires_in, max_bytes or 0, signed_content_type(content_type)
        )
        return PresignedPut(url, key, expires_at, {"Content-Type": content_type})

    def presigned_post(self, key, max_bytes, expires_in=300, content_type=None):
        url, expires_at = self._signed_url("POST", key, expires_in, max_bytes)
        return PresignedPost(url, key, {"key": key}, expires_at)

    def describe(self):
        return f"local directory {self.root}"
