"""The S3 hot paths without boto3: SigV4 URLs computed here, HEAD and GET over kept-alive
connections. Used by the device API (upload URLs, the ingest's HEAD) and the signer
(reading back what a device uploaded); everything else goes through `S3Store` (boto3).

Why: boto3 spends ~300 us of CPU per `generate_presigned_url`, ~1-3 ms per blocking
`head_object` (plus a thread hop) and ~4 ms per 50 KB `get_object`; at hundreds of
uploads per second on one process that is most of a core. A presigned URL is a handful
of SHA-256/HMAC operations: `FastS3Presigner` computes exactly the URL botocore would
(same canonical request, same query order; tests/test_api_storage_presign.py compares
them byte for byte at the same timestamp). Endpoint, bucket path and credentials come
from the store's own boto3 session and client through their public APIs, so addressing
style and region follow the store's configuration. Temporary credentials (a session
token) fall back to boto3 for everything: `FastS3Presigner` refuses them.

Every network step has a timeout, the connect included; hosts are parsed with
`urlsplit`, so IPv6 endpoints (http://[::1]:9000) work.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.client
import os
import ssl
import threading
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, urlsplit

from camfleet.keys import object_key
from camfleet.storage.base import STREAM_CHUNK_BYTES, ObjectInfo, PresignedPut, StorageError

_ALGORITHM = "AWS4-HMAC-SHA256"
# The storage HEAD of an ingest must answer fast or not at all: the device retries.
HEAD_TIMEOUT_S = 5.0
# Keep-alive connections to storage per API process: matches the pool of the database.
HEAD_CONNECTIONS = 20
# HEAD and read-back URLs are used at once; a minute covers clock skew with the store.
URL_TTL_S = 60
# A read-back streams up to the grant's size limit; 30 s without progress is a dead store.
READ_TIMEOUT_S = 30.0
# A HEAD answer is a status line and a few headers; anything longer is not storage.
MAX_HEAD_RESPONSE_BYTES = 16 * 1024
# An error answer from the store is a short XML document; a longer one is not read
# (the connection is dropped instead of drained).
MAX_ERROR_BODY_BYTES = 64 * 1024


def _uri_encode(value: str, safe: str) -> str:
    return quote(value, safe=safe)


def _tls_context() -> ssl.SSLContext:
    # AWS_CA_BUNDLE is botocore's own variable: the fast paths trust what boto3 trusts.
    return ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE"))


class _Endpoint:
    """Scheme, host and port of a store's endpoint (IPv6 literals included)."""

    def __init__(self, scheme: str, netloc: str) -> None:
        parts = urlsplit(f"{scheme}://{netloc}")
        self.netloc = netloc
        self.tls = scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.tls else 80)

    def target(self, url: str) -> str:
        """The request target (path and query) of a URL on this endpoint."""
        return url.split(self.netloc, 1)[1]


class FastS3Presigner:
    """Presigned PUT/HEAD/GET URLs for one S3Store, and an async HEAD."""

    def __init__(self, store) -> None:
        creds = store.session.get_credentials()
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
        self.endpoint = _Endpoint(self.scheme, self.netloc)
        # Everything before the key in the (already encoded) path: "/bucket/prefix/".
        self._path_prefix = parts.path[: -len(quote(store._key(probe), safe="/~"))]
        self._signing_keys: dict[str, bytes] = {}
        self._http: HeadClient | None = None

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
            self._http = HeadClient(self.endpoint)
        url = self.url("HEAD", key, URL_TTL_S)
        status, headers = await self._http.head(self.endpoint.target(url))
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


class HeadClient:
    """HEAD requests over a small pool of keep-alive HTTP/1.1 connections (asyncio).

    Why not httpx: measured in the API process, an httpx HEAD cost ~3 ms of CPU on a
    busy 2-core box, more than the rest of the ingest; this costs a fraction of that.
    A HEAD has no response body, so the protocol needed is a status line and headers.
    A connection that fails is dropped; a stale keep-alive one is retried once, fresh.
    HEAD_TIMEOUT_S bounds each attempt, connect included.
    """

    def __init__(self, endpoint: _Endpoint, size: int = HEAD_CONNECTIONS) -> None:
        self.endpoint = endpoint
        self._idle: list = []
        self._slots = asyncio.Semaphore(size)

    async def _connect(self):
        ssl_context = _tls_context() if self.endpoint.tls else None
        return await asyncio.open_connection(
            self.endpoint.host, self.endpoint.port, ssl=ssl_context
        )

    async def head(self, path: str) -> tuple[int, dict[str, str]]:
        request = f"HEAD {path} HTTP/1.1\r\nHost: {self.endpoint.netloc}\r\n\r\n".encode()
        async with self._slots:
            for attempt in (0, 1):
                reused = bool(self._idle)
                conn = None
                try:
                    async with asyncio.timeout(HEAD_TIMEOUT_S):
                        conn = self._idle.pop() if reused else await self._connect()
                        status, headers = await self._exchange(conn, request)
                except (OSError, EOFError, ValueError, TimeoutError) as exc:
                    if conn is not None:
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


class ObjectReader:
    """(size, SHA-256) of stored S3 objects: presigned GETs over kept-alive connections,
    one per calling thread (the signer verifies on several threads).

    Why not boto3's get_object: per 50 KB object it cost the signer ~4 ms of CPU
    (request signing, event hooks, response parsing) and a new-connection check; a
    presigned GET computed in-process and one HTTP/1.1 connection per thread cost a
    fraction of that. READ_TIMEOUT_S bounds the connect and every read.
    """

    def __init__(self, store) -> None:
        self._presigner = FastS3Presigner(store)  # ValueError: temporary credentials
        self.endpoint = self._presigner.endpoint
        self._local = threading.local()
        self._connections: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    @classmethod
    def for_store(cls, store) -> ObjectReader | None:
        """A reader for an S3 store with static credentials; None means use boto3."""
        from camfleet.storage.s3 import S3Store

        if not isinstance(store, S3Store):
            return None
        try:
            return cls(store)
        except ValueError:
            return None

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            host, port = self.endpoint.host, self.endpoint.port
            if self.endpoint.tls:
                conn = http.client.HTTPSConnection(
                    host, port, timeout=READ_TIMEOUT_S, context=_tls_context()
                )
            else:
                conn = http.client.HTTPConnection(host, port, timeout=READ_TIMEOUT_S)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def digest(self, key: str, max_bytes: int | None = None) -> tuple[int, str | None] | None:
        """None when absent, (size, None) when over `max_bytes`, else (size, SHA-256)."""
        url = self._presigner.url("GET", key, URL_TTL_S)
        target = self.endpoint.target(url)
        conn = self._connection()
        for attempt in (0, 1):
            reused = conn.sock is not None
            try:
                conn.request("GET", target, headers={"Host": self.endpoint.netloc})
                return self._consume(conn, conn.getresponse(), max_bytes)
            except (OSError, http.client.HTTPException) as exc:
                conn.close()  # the next request opens a fresh connection
                stale = isinstance(exc, (http.client.RemoteDisconnected, ConnectionError))
                if reused and attempt == 0 and stale:
                    continue  # the store closed an idle keep-alive connection
                raise StorageError(f"S3 GET failed: {type(exc).__name__}") from None
        raise StorageError("S3 GET failed")  # not reached

    @staticmethod
    def _consume(conn, response, max_bytes: int | None) -> tuple[int, str | None] | None:
        length = response.getheader("content-length")
        length = int(length) if length is not None else None
        if response.status != 200:
            if length is not None and length <= MAX_ERROR_BODY_BYTES:
                response.read()  # keeps the connection usable
            else:
                conn.close()
            if response.status == 404:
                return None
            raise StorageError(f"S3 GET answered {response.status}")
        if max_bytes is not None and length is not None and length > max_bytes:
            conn.close()  # not worth reading: the grant forbids it
            return length, None
        digest, size = hashlib.sha256(), 0
        while chunk := response.read(STREAM_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                conn.close()
                return size, None
        return size, digest.hexdigest()

    def close(self) -> None:
        with self._lock:
            while self._connections:
                self._connections.pop().close()
