"""SigV4 presigned S3 URLs computed here, and S3 HEAD over a minimal async client.

boto3 spends ~300 us of CPU per `generate_presigned_url` and ~1-3 ms per blocking
`head_object` (plus a thread hop); at hundreds of upload-url + ingest pairs per second
on one process that is most of a core. A presigned URL is a handful of SHA-256/HMAC
operations: `FastS3Presigner` computes exactly the URL botocore would (same canonical
request, same query order; tests/test_api_storage_presign.py compares them byte for
byte at the same timestamp), and `head` sends a presigned HEAD on the API's event
loop through `HeadClient`, a keep-alive HTTP/1.1 HEAD-only client. Endpoint, bucket
path and credentials come from the store's own boto3 client, so addressing style and
region follow the store's configuration. Temporary credentials (a session token)
fall back to boto3 for everything.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, urlsplit

from camfleet.keys import object_key
from camfleet.storage.base import ObjectInfo, PresignedPut, StorageError

_ALGORITHM = "AWS4-HMAC-SHA256"
# The storage HEAD of an ingest must answer fast or not at all: the device retries.
HEAD_TIMEOUT_S = 5.0
# Keep-alive connections to storage per API process: matches the pool of the database.
HEAD_CONNECTIONS = 20
# HEAD URLs are used at once; a minute covers clock skew between us and the server.
HEAD_URL_TTL_S = 60


def _uri_encode(value: str, safe: str) -> str:
    return quote(value, safe=safe)


class FastS3Presigner:
    """Presigned PUT/HEAD URLs for one S3Store, and an async HEAD."""

    def __init__(self, store) -> None:
        creds = store.client._request_signer._credentials
        frozen = creds.get_frozen_credentials() if creds is not None else None
        if frozen is None or frozen.token:
            raise ValueError("needs static credentials (no session token)")
        self.store = store
        self._access_key = frozen.access_key
        self._secret = frozen.secret_key.encode()
        self.region = store.client.meta.region_name
        probe = "camfleet-probe"
        url = store.client.generate_presigned_url(
            "head_object", Params={"Bucket": store.bucket, "Key": store._key(probe)}
        )
        parts = urlsplit(url)
        self.scheme, self.netloc = parts.scheme, parts.netloc
        # Everything before the key in the (already encoded) path: "/bucket/prefix/".
        self._path_prefix = parts.path[: -len(quote(store._key(probe), safe="/~"))]
        self._signing_keys: dict[str, bytes] = {}
        self._http = None

    def _signing_key(self, day: str) -> bytes:
        key = self._signing_keys.get(day)
        if key is None:
            k = hmac.new(b"AWS4" + self._secret, day.encode(), hashlib.sha256).digest()
            for part in (self.region, "s3", "aws4_request"):
                k = hmac.new(k, part.encode(), hashlib.sha256).digest()
            self._signing_keys = {day: k}  # one day at a time
            key = k
        return key

    def url(
        self,
        method: str,
        key: str,
        expires_in: int,
        content_type: str | None = None,
        now: datetime | None = None,
    ) -> str:
        now = now or datetime.now(UTC)
        amz_date = now.strftime("%Y%m%dT%H%M%SZ")
        day = amz_date[:8]
        scope = f"{day}/{self.region}/s3/aws4_request"
        path = self._path_prefix + _uri_encode(self.store._key(key), "/~")
        signed_headers = "content-type;host" if content_type else "host"
        query = (
            f"X-Amz-Algorithm={_ALGORITHM}"
            f"&X-Amz-Credential={_uri_encode(f'{self._access_key}/{scope}', '~')}"
            f"&X-Amz-Date={amz_date}"
            f"&X-Amz-Expires={expires_in}"
            f"&X-Amz-SignedHeaders={_uri_encode(signed_headers, '~')}"
        )
        headers = f"content-type:{content_type}\n" if content_type else ""
        headers += f"host:{self.netloc}\n"
        canonical = f"{method}\n{path}\n{query}\n{headers}\n{signed_headers}\nUNSIGNED-PAYLOAD"
        to_sign = (
            f"{_ALGORITHM}\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        )
        sig = hmac.new(self._signing_key(day), to_sign.encode(), hashlib.sha256).hexdigest()
        return f"{self.scheme}://{self.netloc}{path}?{query}&X-Amz-Signature={sig}"

    def presigned_put(self, key, content_type, expires_in=300, max_bytes=None) -> PresignedPut:
        object_key(key)
        now = datetime.now(UTC).replace(microsecond=0)
        url = self.url("PUT", key, expires_in, content_type, now)
        return PresignedPut(
            url, key, now + timedelta(seconds=expires_in), {"Content-Type": content_type}
        )

    async def head(self, key: str) -> ObjectInfo | None:
        """Size of `key` (sha256 when camfleet wrote it), or None when it does not exist."""
        object_key(key)
        if self._http is None:
            self._http = HeadClient(self.scheme, self.netloc)
        url = self.url("HEAD", key, HEAD_URL_TTL_S)
        status, headers = await self._http.head(url.split(self.netloc, 1)[1])
        if status == 404:
            return None
        if status != 200:
            raise StorageError(f"S3 HEAD answered {status}")
        return ObjectInfo(
            key,
            int(headers.get("content-length", 0)),
            headers.get("x-amz-meta-sha256"),
            headers.get("content-type"),
        )

    async def aclose(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None


# A HEAD answer is a status line and a few headers; anything longer is not storage.
MAX_HEAD_RESPONSE_BYTES = 16 * 1024


class HeadClient:
    """HEAD requests over a small pool of keep-alive HTTP/1.1 connections (asyncio).

    Why not httpx: measured in the API process, an httpx HEAD cost ~3 ms of CPU on a
    busy 2-core box, more than the rest of the ingest; this costs a fraction of that.
    A HEAD has no response body, so the protocol needed is a status line and headers.
    A connection that fails is dropped; a stale keep-alive one is retried once, fresh.
    """

    def __init__(self, scheme: str, netloc: str, size: int = HEAD_CONNECTIONS) -> None:
        host, _, port = netloc.rpartition(":") if ":" in netloc else (netloc, "", "")
        self.host = host or netloc
        self.tls = scheme == "https"
        self.port = int(port) if port else (443 if self.tls else 80)
        self.netloc = netloc
        self._idle: list = []
        self._slots = asyncio.Semaphore(size)

    async def _connect(self):
        ssl_context = None
        if self.tls:
            import ssl

            ssl_context = ssl.create_default_context()
        return await asyncio.open_connection(self.host, self.port, ssl=ssl_context)

    async def head(self, path: str) -> tuple[int, dict[str, str]]:
        request = f"HEAD {path} HTTP/1.1\r\nHost: {self.netloc}\r\n\r\n".encode()
        async with self._slots:
            for attempt in (0, 1):
                reused = bool(self._idle)
                try:
                    conn = self._idle.pop() if reused else await self._connect()
                except OSError as exc:
                    raise StorageError(f"S3 HEAD failed: {type(exc).__name__}") from None
                try:
                    status, headers = await asyncio.wait_for(
                        self._exchange(conn, request), HEAD_TIMEOUT_S
                    )
                except (OSError, EOFError, ValueError, TimeoutError) as exc:
                    conn[1].close()
                    if reused and attempt == 0 and not isinstance(exc, TimeoutError):
                        continue  # the server closed an idle connection: try a fresh one
                    raise StorageError(f"S3 HEAD failed: {type(exc).__name__}") from None
                if headers.get("connection", "").lower() == "close":
                    conn[1].close()
                else:
                    self._idle.append(conn)
                return status, headers
        raise StorageError("S3 HEAD failed")  # not reached

    @staticmethod
    async def _exchange(conn, request: bytes) -> tuple[int, dict[str, str]]:
        reader, writer = conn
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_HEAD_RESPONSE_BYTES:
            raise ValueError("response head too long")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ValueError("not an HTTP/1.x response")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    def close(self) -> None:
        while self._idle:
            self._idle.pop()[1].close()
